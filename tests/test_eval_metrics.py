"""Answer extraction and every benchmark's metric, on hand-worked examples."""

from __future__ import annotations

import pytest

from glm4v.eval import multiple_choice, ocrbench, yes_no
from glm4v.eval.extract import extract_choice, extract_yes_no, match_open_answer
from glm4v.eval.formats import Item
from glm4v.eval.report import accuracy_table

ABCD = {"A": "red", "B": "dark red", "C": "blue", "D": "a cat"}


def item(index, unit=None, **row):
    return Item(str(index), "prompt", None, {"index": str(index), **row}, unit=unit or "")


# -- extraction ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "reply, expected",
    [
        ("B", "B"), ("(C)", "C"), (" D. ", "D"), ("【A】", "A"),
        ("B. dark red", "B"), ("(C) blue", "C"), ("A: red", "A"),
        ("The answer is C.", "C"), ("Answer: D", "D"), ("The correct option is (B)", "B"),
        ("答案是C", "C"), ("选B", "B"), ("正确选项：A", "A"),
        ("I would pick C here", "C"),
        ("A cat is sitting there", "D"),  # "A" the article, then the text of option D
        ("blue", "C"), ("It is dark red.", "B"),  # "dark red" contains "red": the longer option wins
        ("E", None),  # not an option
        ("A is the right one", "A"), ("A or B", None), ("", None), ("Cannot determine the answer", None),
        ("a long story " * 20 + "blue", None),  # far longer than all options: containment would be luck
        # the embedded model goes through the options before it answers (glm4v.train.synth.choice_question)
        ("It is dark red.\nA. red vs dark red: no\nB. dark red vs dark red: yes, so the answer is B.", "B"),
        ("是深红色的。\nA. red vs dark red：不是\nB. dark red vs dark red：是，所以答案是B。", "B"),
    ],
)
def test_extract_choice(reply, expected):
    assert extract_choice(reply, ABCD) == expected


@pytest.mark.parametrize(
    "reply, expected",
    [("Yes", "Yes"), ("yes.", "Yes"), ("No, it is not.", "No"), ("NO", "No"), ("Yes and no", "Unknown"),
     ("The answer is not clear", "Unknown"), ("Nothing", "Unknown"), ("", "Unknown")],
)
def test_extract_yes_no(reply, expected):
    assert extract_yes_no(reply) == expected


@pytest.mark.parametrize(
    "reply, answer, expected",
    [("5", "5", True), ("The answer is 5.", "5", True), ("15", "5", False), ("3.50 cm", "3.5", True),
     ("1,000 people", "1000", True), ("Paris, France", "paris", True), ("Parisian", "paris", False),
     ("", "5", False), ("5.5", "5", False)],
)
def test_match_open_answer(reply, answer, expected):
    assert match_open_answer(reply, answer) is expected


# -- multiple choice -------------------------------------------------------------------------------

def test_accuracy_with_category_breakdown():
    items = [
        item(1, A="x", B="y", answer="A", category="count", **{"l2-category": "perception"}),
        item(2, A="x", B="y", answer="B", category="count", **{"l2-category": "perception"}),
        item(3, A="x", B="y", answer="A", category="scene", **{"l2-category": "perception"}),
        item(4, A="x", B="y", answer="B", category="scene", **{"l2-category": "reasoning"}),
    ]
    predictions = {"1": "A", "2": "A", "3": "A", "4": "B. y"}
    report = multiple_choice.score(items, predictions)
    assert report.headline == {"accuracy": 75.0}
    rows = {r[0]: r[1:] for r in report.tables[0].rows}
    assert rows["Overall"] == [4, 3, 75.0]
    assert rows["category: count"] == [2, 1, 50.0]
    assert rows["category: scene"] == [2, 2, 100.0]
    assert rows["l2-category: perception"] == [3, 2, pytest.approx(200 / 3)]
    assert rows["l2-category: reasoning"] == [1, 1, 100.0]


def test_accuracy_table_splits_only_when_there_are_several():
    one = accuracy_table([({"split": "dev"}, True)])
    assert [r[0] for r in one.rows] == ["Overall"]
    two = accuracy_table([({"split": "dev"}, True), ({"split": "test"}, False)])
    assert [r[0] for r in two.rows] == ["Overall", "split: dev", "split: test"]


def test_mmbench_question_failed_in_one_rotation_counts_as_wrong():
    options = [("w", "x", "y"), ("x", "y", "w"), ("y", "w", "x")]  # answer "y" at C, B, A
    items = []
    for q, category in ((7, "ocr"), (8, "scene")):
        for shift, (a, b, c) in enumerate(options):
            items.append(item(shift * 1_000_000 + q, unit=str(q), A=a, B=b, C=c, answer="CBA"[shift], category=category))
    predictions = {
        "7": "C", "1000007": "B", "2000007": "A",  # every rotation right
        "8": "C", "1000008": "B", "2000008": "C",  # the last rotation wrong
    }
    report = multiple_choice.score_mmbench(items, predictions)
    assert report.headline == {"accuracy (circular)": 50.0, "accuracy (original order only)": 100.0}
    rows = {r[0]: r[1:] for r in report.tables[0].rows}
    assert rows["category: ocr"] == [1, 1, 100.0]
    assert rows["category: scene"] == [1, 0, 0.0]
    assert report.notes == ["2 questions, 6 passes (3.00 per question)"]


def test_mmmu_multiple_choice_and_open_questions():
    items = [
        item("v1", A="1", B="2", answer="B", question_type="multiple-choice", category="Math", split="validation"),
        item("v2", A="1", B="2", answer="A", question_type="multiple-choice", category="Art", split="validation"),
        item("v3", answer="3.5", question_type="open", category="Math", split="validation"),
        item("d1", answer="cat", question_type="open", category="Art", split="dev"),
        item("v4", A="1", B="2", answer="['A', 'B']", question_type="multiple-choice", category="Art", split="validation"),
    ]
    predictions = {"v1": "B", "v2": "B", "v3": "It is 3.50.", "d1": "a category", "v4": "A"}
    report = multiple_choice.score_mmmu(items, predictions)
    assert report.headline == {"accuracy": 40.0}
    rows = {r[0]: r[1:] for r in report.tables[0].rows}
    assert rows["question_type: open"] == [2, 1, 50.0]
    assert rows["split: dev"] == [1, 0, 0.0]
    assert rows["category: Math"] == [2, 2, 100.0]
    assert "1 multiple-choice row(s) have an answer that is not an option letter" in report.notes[0]


# -- yes / no --------------------------------------------------------------------------------------

def test_mme_acc_and_acc_plus_differ():
    # color: picture p1 both right, p2 one of two -> acc 3/4 = 75, acc+ 1/2 = 50, score 125
    # count: one picture, both wrong -> 0; code_reasoning: one picture, both right -> 200
    rows = [
        (0, "color", "p1", "Yes", "Yes"), (1, "color", "p1", "No", "no"),
        (2, "color", "p2", "Yes", "Yes"), (3, "color", "p2", "No", "Yes"),
        (4, "count", "p3", "Yes", "No"), (5, "count", "p3", "No", "Yes, there are."),
        (6, "code_reasoning", "p4", "Yes", "yes"), (7, "code_reasoning", "p4", "No", "No."),
    ]
    items = [item(i, category=c, picture=p, answer=a) for i, c, p, a, _ in rows]
    report = yes_no.score_mme(items, {str(i): reply for i, *_, reply in rows})
    assert report.headline == {"total": 325.0, "perception": 125.0, "cognition": 200.0}
    table = {r[0]: r[1:] for r in report.tables[0].rows}
    assert table["color"] == ["perception", 4, 2, 75.0, 50.0, 125.0]
    assert table["count"] == ["perception", 2, 1, 0.0, 0.0, 0.0]
    assert table["code_reasoning"] == ["cognition", 2, 1, 100.0, 100.0, 200.0]
    assert any("perception sums 2 of its 10 sub-tasks" in n for n in report.notes)


def test_mme_category_names_match_case_insensitively_and_unknown_ones_are_not_summed():
    items = [item(0, category="OCR", picture="a", answer="Yes"), item(1, category="Commonsense Reasoning", picture="b", answer="No"),
             item(2, category="weather", picture="c", answer="Yes")]
    report = yes_no.score_mme(items, {"0": "Yes", "1": "No", "2": "Yes"})
    assert report.headline == {"total": 400.0, "perception": 200.0, "cognition": 200.0}
    assert any("not summed: weather" in n for n in report.notes)


def test_hallusionbench_aacc_facc_qacc():
    # set 0 of "illusion": figures 0 and 1, questions 0 and 1 asked of both
    hits = {("0", "0"): True, ("0", "1"): True, ("1", "0"): False, ("1", "1"): True}
    items = [item(f"VD_illusion_0_0_{f}_{q}", category="VD", set_id="0", figure_id=f, question_id=q,
                  answer="Yes", **{"l2-category": "illusion"}) for f, q in hits]
    items.append(item("VS_chart_0_0_0_0", category="VS", set_id="0", figure_id="0", question_id="0",
                      answer="No", **{"l2-category": "chart"}))
    predictions = {i.index: ("Yes" if hits.get((i.row["figure_id"], i.row["question_id"])) else "No") for i in items[:4]}
    predictions["VS_chart_0_0_0_0"] = "No"
    report = yes_no.score_hallusion(items, predictions)
    # aAcc: 4 of 5 right = 80. fAcc: figures (illusion,0,0) ok, (illusion,0,1) no, (chart,0,0) ok = 2/3.
    # qAcc: questions (illusion,0,0) no (wrong on figure 1), (illusion,0,1) ok, (chart,0,0) ok = 2/3.
    a, f, q = 80.0, 200 / 3, 200 / 3
    assert report.headline == pytest.approx({"overall": (a + f + q) / 3, "aAcc": a, "fAcc": f, "qAcc": q})
    rows = {r[0]: r[1:] for r in report.tables[0].rows}
    assert rows["category: VS"] == [1, 100.0, 100.0, 100.0, 100.0]
    assert rows["l2-category: illusion"] == pytest.approx([4, 75.0, 50.0, 50.0, 175 / 3])


# -- OCRBench --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "reply, answers, category, expected",
    [
        ("The word is centre.", ["CENTRE"], "Regular Text Recognition", True),
        ("cent", ["CENTRE"], "Regular Text Recognition", False),
        ("line one\nSTOP sign", ["stop sign"], "Artistic Text Recognition", True),
        ("x ^ { 2 } + 1", ["x^{2}+1"], ocrbench.HME, True),
        ("X^{2}+1", ["x^{2}+1"], ocrbench.HME, False),  # case-sensitive for expressions
        ("none of these", ["a", "b", "c", "d"], "Doc-oriented VQA", False),
        ("it says b", ["zz", "b"], "Doc-oriented VQA", True),
    ],
)
def test_ocrbench_containment(reply, answers, category, expected):
    assert ocrbench.is_correct(reply, answers, category) is expected


def test_ocrbench_score_by_group():
    spec = [
        ("Regular Text Recognition", "CENTRE", "centre"), ("Digit String Recognition", "123", "12"),
        ("Scene Text-centric VQA", "green", "Green."), ("Doc-oriented VQA", "2019", "In 2019"),
        (ocrbench.HME, "a+b", "a + b"), ("Key Information Extraction", "42", "none"),
    ]
    items = [item(n, category=c, answer=[a]) for n, (c, a, _) in enumerate(spec)]
    report = ocrbench.score(items, {str(n): reply for n, (*_, reply) in enumerate(spec)})
    assert report.headline["final score"] == 4
    assert report.headline["scaled to 1000 questions"] == pytest.approx(4000 / 6)
    groups = {r[0]: r[1:] for r in report.tables[0].rows}
    assert groups["Text Recognition"] == [2, 1]
    assert groups["Key Information Extraction"] == [1, 0]
    assert groups[ocrbench.HME] == [1, 1]
