"""The synthetic visual-QA generator: determinism, split disjointness, format, scoring."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
from PIL import Image

from glm4v.train import synth
from glm4v.train.data import read_jsonl


def test_same_seed_same_example_and_different_index_differs():
    a = synth.make_example(7, "train", 11)
    b = synth.make_example(7, "train", 11)
    assert a.messages == b.messages and a.image.tobytes() == b.image.tobytes()
    c = synth.make_example(8, "train", 11)
    assert c.image.tobytes() != a.image.tobytes()
    d = synth.make_example(7, "test", 11)  # the split is part of the seed
    assert d.image.tobytes() != a.image.tobytes()


def test_every_skill_and_language_is_balanced_in_the_test_split():
    examples = synth.generate_test_split(seed=3, n=180)
    pairs = Counter((ex.skill, ex.lang) for ex in examples)
    assert set(pairs) == {(s, lang) for s in synth.SKILLS for lang in synth.LANGS}
    assert set(pairs.values()) == {10}
    for ex in examples:
        assert ex.image.size == (synth.CANVAS, synth.CANVAS) and ex.image.mode == "RGB"
        roles = [m["role"] for m in ex.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert (len(roles) == 4) == (ex.skill == "multiturn")
        text = "".join(m["content"] for m in ex.messages)
        if ex.lang == "zh" and ex.skill not in ("text", "chart", "counting"):
            assert any("\u4e00" <= ch <= "\u9fff" for ch in text), text


def test_written_dataset_is_deterministic_official_format_and_splits_share_no_image(tmp_path):
    sizes = {"test": 27, "val": 9, "train": 36}
    paths = synth.write_dataset(tmp_path / "a", sizes, seed=5)
    synth.write_dataset(tmp_path / "b", sizes, seed=5)
    for split in sizes:
        a = (tmp_path / "a" / f"{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    digests = {}
    for split, path in paths.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == sizes[split]
        raw = json.loads(lines[0])
        assert set(raw) == {"messages", "id", "skill", "lang", "scene"}  # extra keys the official code ignores
        assert raw["messages"][0]["role"] == "user" and raw["messages"][0]["image"].startswith(f"images/{split}/")
        records = read_jsonl(path)  # the trainer's own reader accepts it
        digests[split] = set()
        for r in records:
            with Image.open(r.image) as im:
                digests[split].add(hashlib.sha256(im.convert("RGB").tobytes()).hexdigest())
            other = tmp_path / "b" / r.image.relative_to(tmp_path / "a")
            assert other.read_bytes() == r.image.read_bytes()
        assert len(digests[split]) == sizes[split]  # no duplicate inside a split either
    assert not digests["test"] & digests["val"]
    assert not digests["test"] & digests["train"]
    assert not digests["val"] & digests["train"]


def test_an_image_already_in_an_earlier_split_is_drawn_again():
    first = synth.make_example(9, "val", 0)
    seen = {synth.pixel_digest(first.image)}
    again = next(synth.generate_split(9, "val", 1, seen))
    assert synth.pixel_digest(again.image) != synth.pixel_digest(first.image)
    assert again.skill == first.skill and again.lang == first.lang
    assert len(seen) == 2


@pytest.mark.parametrize("skill,prediction,reference,ok", [
    ("perception", "the circle is red", "The circle is red.", True),
    ("perception", "  The circle is red。 ", "The circle is red.", True),
    ("perception", "The circle is blue.", "The circle is red.", False),
    ("counting", "4", "4", True),
    ("counting", "14", "4", False),
    ("choice", "The circle is red.\na. blue vs red: no\nb. red vs red: yes, so the answer is b",
     "The circle is red.\nA. blue vs red: no\nB. red vs red: yes, so the answer is B.", True),
    ("choice", "The circle is red.\nA. blue vs red: yes, so the answer is A.",
     "The circle is red.\nA. blue vs red: no\nB. red vs red: yes, so the answer is B.", False),
    ("yesno", "圆形是红色的，所以有。", "圆形是红色的，所以有。", True),
    ("yesno", "圆形是红色的，所以没有。", "圆形是红色的，所以有。", False),
    ("description", "The image shows a blue square and a red circle.",
     "The image shows a red circle and a blue square.", True),
    ("description", "The image shows a red circle.", "The image shows a red circle and a blue square.", False),
    ("description", "The image shows a red circle, a blue square and a red circle.",
     "The image shows a red circle and a blue square.", False),
    ("description", "图中有一个蓝色的正方形和一个红色的圆形。", "图中有一个红色的圆形和一个蓝色的正方形。", True),
    ("description", "图中有一个蓝色的三角形和一个红色的圆形。", "图中有一个红色的圆形和一个蓝色的正方形。", False),
])
def test_scoring(skill, prediction, reference, ok):
    assert synth.score_answer(skill, prediction, reference) is ok


def test_answers_agree_with_the_scene():
    # counting answers are the number of objects drawn, chart answers name a real bar
    for index in range(1, 400, 9):  # skill index 1 = counting
        ex = synth.make_example(1, "train", index)
        assert ex.skill == "counting" and 1 <= int(ex.messages[1]["content"]) <= 6
    for index in range(4, 400, 9):
        ex = synth.make_example(1, "train", index)
        assert ex.skill == "chart"
        answer = ex.messages[1]["content"]
        assert answer in synth.BAR_LETTERS or 1 <= int(answer) <= synth.CHART_MAX


def test_training_examples_may_carry_extra_questions_about_the_same_image():
    plain = [synth.make_example(2, "train", i) for i in range(36)]
    extra = [synth.make_example(2, "train", i, extra_turns=2) for i in range(36)]
    assert any(len(e.messages) > len(p.messages) for p, e in zip(plain, extra))
    for p, e in zip(plain, extra):
        assert p.image.tobytes() == e.image.tobytes()
        assert e.messages[: len(p.messages)] == p.messages
        assert len(e.messages) <= len(p.messages) + 4
    # evaluation splits never get them
    assert synth.make_example(2, "test", 5, extra_turns=2).messages == synth.make_example(2, "test", 5).messages


def test_example_pictures_in_the_repository_are_the_generators():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples"
    for name, (image, question, answer) in synth.example_images().items():
        with Image.open(folder / name) as shipped:
            assert shipped.convert("RGB").tobytes() == image.tobytes(), name
        assert question and answer
    assert synth.example_images()["shapes.png"][1] == "What colour is the circle?"


def _letter(answer: str) -> str:
    """'...\nB. red vs red: yes, so the answer is B.' / '...，所以答案是B。' -> 'B'."""
    return answer.rstrip(".。")[-1]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_multiple_choice_answers_set_each_option_against_the_value_up_to_the_right_one(lang):
    import random

    rng = random.Random(11)
    seen = set()
    for _ in range(40):
        question, answer = synth.choice_question(rng, "Q", "red", ["red", "blue", "green", "pink", "grey"], lang,
                                                 "The circle is red." if lang == "en" else "圆形是红色的。")
        options = [line.split(". ", 1)[1] for line in question.split("\n")[1:5]]
        right = options.index("red")
        seen.add(right)
        lines = answer.split("\n")
        assert lines[0] == ("The circle is red." if lang == "en" else "圆形是红色的。")
        assert len(lines) == right + 2  # the statement, then one line per option up to the right one
        no, yes = ("no", "yes") if lang == "en" else ("不是", "是")
        sep = ": " if lang == "en" else "："
        for k, line in enumerate(lines[1:-1]):
            assert line == f"{'ABCD'[k]}. {options[k]} vs red{sep}{no}"
        letter = "ABCD"[right]
        assert lines[-1] == (f"{letter}. red vs red: yes, so the answer is {letter}." if lang == "en"
                             else f"{letter}. red vs red：是，所以答案是{letter}。")
        assert _letter(answer) == letter
    assert seen == {0, 1, 2, 3}


def test_extra_questions_ask_for_comparisons_with_the_right_answers():
    import random

    rng = random.Random(5)
    objs = synth.distinct_objects(rng, 3)
    pool = synth.extra_questions(rng, ("objects", objs), "en")
    present = {synth.thing(o, "en") for o in objs}
    choices = [(q, a) for q, a in pool if "\nA. " in q]
    is_colour = [(q, a) for q, a in pool if q.startswith("Is the ") and " in the image" not in q]
    assert len(choices) == len(objs) and len(is_colour) == len(objs)
    for q, a in choices:  # the option under the letter answers the question about a drawn object
        options = dict(line.split(". ", 1) for line in q.split("\n")[1:5])
        subject = q.split("\n")[0]
        picked = options[_letter(a)]
        assert a.endswith(f"{_letter(a)}. {picked} vs {picked}: yes, so the answer is {_letter(a)}.")
        assert picked in a.split("\n")[0]  # the look-up first
        assert any(picked in name and (name.split()[0] in subject or name.split()[1] in subject) for name in present)
    for q, a in is_colour:
        shape, colour = q[len("Is the "):-1].split(" ")
        actual = next(name.split()[0] for name in present if name.endswith(shape))
        assert a == f"The {shape} is {actual}, so {'yes' if actual == colour else 'no'}."
    text_pool = synth.extra_questions(rng, ("text", "CAKE", []), "zh")
    assert len(text_pool) == 1 and "CAKE" in text_pool[0][0] and text_pool[0][1].startswith("写的是CAKE。\n")
    count_pool = synth.extra_questions(rng, ("count", objs[:2]), "en")
    q, a = count_pool[0]
    assert a.startswith("I count 2.\n") and dict(line.split(". ", 1) for line in q.split("\n")[1:5])[_letter(a)] == "2"


def test_spatial_answers_name_both_cells_and_the_relation_the_picture_was_drawn_with():
    words = {"left": "on the left", "right": "on the right", "above": "above", "below": "below"}
    zh = {"left": "左边", "right": "右边", "above": "上面", "below": "下面"}
    seen = set()
    for index in range(2, 800, 9):  # skill index 2 = spatial
        ex = synth.make_example(4, "train", index)
        assert ex.skill == "spatial"
        rng_scene = synth.make_spatial(__import__("random").Random(f"glm4v-synth/4/train/{index}/0"), ex.lang)[2]
        (o1, o2), relation = rng_scene[1], rng_scene[2]
        answer = ex.messages[1]["content"]
        (r1, c1), (r2, c2) = synth.grid_cell(o1), synth.grid_cell(o2)
        assert f"({r1}, {c1})" in answer and f"({r2}, {c2})" in answer
        assert answer.endswith(f"so it is {words[relation]}." if ex.lang == "en" else f"所以它在{zh[relation]}。")
        seen.add(relation)
    assert seen == set(words)


def test_existence_answers_find_the_shape_then_compare_the_colour():
    objs = [synth.Obj(0, 0, 28, 28, 20), synth.Obj(2, 1, 140, 84, 20)]  # red circle, blue square
    assert synth.answer_exists(synth.Obj(0, 0, 0, 0, 0), objs, "en") == "The circle is red, so yes."
    assert synth.answer_exists(synth.Obj(2, 0, 0, 0, 0), objs, "en") == "The circle is red, so no."
    assert synth.answer_exists(synth.Obj(2, 3, 0, 0, 0), objs, "en") == "There is no star, so no."
    assert synth.answer_exists(synth.Obj(2, 1, 0, 0, 0), objs, "zh") == "正方形是蓝色的，所以有。"
    assert synth.answer_exists(synth.Obj(2, 2, 0, 0, 0), objs, "zh") == "图中没有三角形，所以没有。"
