"""Yes/no benchmarks: MME and HallusionBench.

The prompt is the row's question (MME's already ends in "Please answer yes or no.") followed by
the "\\nShort Answer." of the official GLM-4V evaluation. A reply counts as "Yes" or "No" when
that word appears in it and the other does not; anything else is "Unknown" and wrong.

Columns read: ``index``, ``question``, ``answer`` (Yes/No), ``category``; MME groups the two
questions about one picture by ``image_path`` (or by the picture itself when the file has no
paths); HallusionBench reads ``l2-category`` and the ``set_id`` / ``figure_id`` /
``question_id`` columns, or, as VLMEvalKit does, fields 3, 4 and 5 of the ``_``-separated index.
"""

from __future__ import annotations

from collections import defaultdict

from glm4v.errors import InputError
from glm4v.eval.extract import extract_yes_no
from glm4v.eval.formats import Item, Table, image_group_key, resolve_images
from glm4v.eval.multiple_choice import SHORT_ANSWER
from glm4v.eval.report import Report, ResultTable, percent

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "ocr")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

_YES_NO = {"yes": "Yes", "no": "No", "true": "Yes", "false": "No", "1": "Yes", "0": "No"}


def _normalize_answer(row, path) -> str | None:
    answer = row.get("answer")
    if answer is None:
        return None
    normalized = _YES_NO.get(answer.strip().lower())
    if normalized is None:
        raise InputError(f"{path}: row {row['index']}: the answer of a yes/no question must be Yes or No, got {answer!r}")
    return normalized


# -- MME -------------------------------------------------------------------------------------------

def build_mme_items(table: Table) -> list[Item]:
    """MME: the scoring unit (and what --limit counts) is a picture with its two questions."""
    items = []
    for row, images in resolve_images(table):
        if row.get("category") is None:
            raise InputError(f"{table.path}: row {row['index']}: MME rows need a category (the sub-task)")
        picture = image_group_key(row, images)
        row = dict(row, answer=_normalize_answer(row, table.path), picture=picture)
        items.append(Item(row["index"], row["question"] + SHORT_ANSWER, images[0], row, unit=f"{row['category']}|{picture}"))
    return items


def _subtask(category: str) -> str:
    return category.strip().lower().replace(" ", "_").replace("-", "_")


def score_mme(items: list[Item], predictions: dict[str, str]) -> Report:
    """Per sub-task: acc (% of questions right) + acc+ (% of pictures with both questions right).

    The perception score is the sum over its 10 sub-tasks (max 2000), cognition over its 4
    (max 800); the model card's MME number is their sum.
    """
    per_task = defaultdict(lambda: defaultdict(list))  # category -> picture -> hits
    for item in items:
        hit = extract_yes_no(predictions[item.index]) == item.row["answer"]
        per_task[item.row["category"]][item.row["picture"]].append(hit)

    table = ResultTable("MME sub-tasks (acc and acc+ in %, score = acc + acc+)",
                        ["sub-task", "kind", "questions", "pictures", "acc", "acc+", "score"])
    totals = {"perception": 0.0, "cognition": 0.0}
    found = {"perception": set(), "cognition": set()}
    unknown = []
    order = {"perception": 0, "cognition": 1, None: 2}
    for category in sorted(per_task, key=lambda c: (order[_kind(c)], c)):
        pictures = per_task[category]
        hits = [h for hs in pictures.values() for h in hs]
        acc = percent(sum(hits), len(hits))
        acc_plus = percent(sum(all(hs) for hs in pictures.values()), len(pictures))
        kind = _kind(category)
        if kind is None:
            unknown.append(category)
        else:
            totals[kind] += acc + acc_plus
            found[kind].add(_subtask(category))
        table.rows.append([category, kind or "?", len(hits), len(pictures), acc, acc_plus, acc + acc_plus])

    report = Report("mme", {"total": totals["perception"] + totals["cognition"], **totals}, [table])
    for kind, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        missing = [n for n in names if n not in found[kind]]
        if missing:
            report.notes.append(f"{kind} sums {len(names) - len(missing)} of its {len(names)} sub-tasks "
                                f"(missing: {', '.join(missing)})")
    if unknown:
        report.notes.append(f"sub-tasks outside MME's perception/cognition lists, not summed: {', '.join(unknown)}")
    return report


def _kind(category: str) -> str | None:
    name = _subtask(category)
    if name in MME_PERCEPTION:
        return "perception"
    if name in MME_COGNITION:
        return "cognition"
    return None


# -- HallusionBench --------------------------------------------------------------------------------

def build_hallusion_items(table: Table) -> list[Item]:
    items = []
    for row, images in resolve_images(table):
        row = dict(row, answer=_normalize_answer(row, table.path))
        ids = [row.get(k) for k in ("set_id", "figure_id", "question_id")]
        if any(v is None for v in ids):
            parts = row["index"].split("_")
            if len(parts) < 6:
                raise InputError(
                    f"{table.path}: row {row['index']}: HallusionBench needs set_id/figure_id/question_id columns or "
                    "an index of the form <category>_<subcategory>_<n>_<set>_<figure>_<question>"
                )
            ids = parts[3:6]
        row["set_id"], row["figure_id"], row["question_id"] = ids
        items.append(Item(row["index"], row["question"] + SHORT_ANSWER, images[0], row))
    return items


def hallusion_accuracies(records) -> tuple[float, float, float]:
    """(aAcc, fAcc, qAcc) in % from (row, hit) pairs.

    aAcc: per question. fAcc: per figure (same l2-category, set and figure), right only if all its
    questions are. qAcc: per question asked of several figures (same l2-category, set and
    question id), right only if answered right for all of them.
    """
    figures, questions = defaultdict(list), defaultdict(list)
    for row, hit in records:
        l2 = row.get("l2-category", "")
        figures[(l2, row["set_id"], row["figure_id"])].append(hit)
        questions[(l2, row["set_id"], row["question_id"])].append(hit)
    a = percent(sum(h for _, h in records), len(records))
    f = percent(sum(all(v) for v in figures.values()), len(figures))
    q = percent(sum(all(v) for v in questions.values()), len(questions))
    return a, f, q


def score_hallusion(items: list[Item], predictions: dict[str, str]) -> Report:
    records = [(i.row, extract_yes_no(predictions[i.index]) == i.row["answer"]) for i in items]
    table = ResultTable("HallusionBench (%): overall = mean of aAcc, fAcc, qAcc",
                        ["split", "questions", "aAcc", "fAcc", "qAcc", "overall"])

    def add(name, subset):
        a, f, q = hallusion_accuracies(subset)
        table.rows.append([name, len(subset), a, f, q, (a + f + q) / 3])
        return a, f, q

    a, f, q = add("Overall", records)
    for column in ("category", "l2-category"):
        values = sorted({r.get(column) for r, _ in records if r.get(column) is not None})
        for value in values:
            add(f"{column}: {value}", [(r, h) for r, h in records if r.get(column) == value])
    return Report("hallusionbench", {"overall": (a + f + q) / 3, "aAcc": a, "fAcc": f, "qAcc": q}, [table])
