"""OCRBench: 1000 questions in 10 categories, one point per question answered right.

The prompt is the question alone (OCRBench is an open-answer set, so the official GLM-4V
evaluation adds no "Short Answer."). Columns read: ``index``, ``question``, ``answer`` (a Python
list literal of accepted answers, e.g. ``['CENTRE', 'centre']``, or one plain answer) and
``category``.

A reply is right when one accepted answer is contained in it: case-insensitively, after trimming
and turning line breaks into spaces; for handwritten mathematical expressions case-sensitively
with all spaces removed (LaTeX spacing is arbitrary). The final score is the number of right
answers (out of 1000 for the full set), also reported in OCRBench's five groups.
"""

from __future__ import annotations

import ast
from collections import defaultdict

from glm4v.errors import InputError
from glm4v.eval.formats import Item, Table, resolve_images
from glm4v.eval.report import Report, ResultTable

TEXT_RECOGNITION = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
)
HME = "Handwritten Mathematical Expression Recognition"
GROUPS = {
    "Text Recognition": TEXT_RECOGNITION,
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    HME: (HME,),
}
FULL_SIZE = 1000


def parse_answers(value: str | None, where: str) -> list[str] | None:
    if value is None:
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise InputError(f"{where}: the answer {text[:60]!r} starts like a list but is not a list literal") from None
        if not isinstance(parsed, (list, tuple)) or not parsed:
            raise InputError(f"{where}: expected a non-empty list of accepted answers, got {text[:60]!r}")
        return [str(a) for a in parsed]
    return [value]


def build_items(table: Table) -> list[Item]:
    items = []
    for row, images in resolve_images(table):
        if row.get("category") is None:
            raise InputError(f"{table.path}: row {row['index']}: OCRBench rows need a category")
        row = dict(row, answer=parse_answers(row.get("answer"), f"{table.path}: row {row['index']}"))
        items.append(Item(row["index"], row["question"], images[0], row))
    return items


def is_correct(prediction: str, answers: list[str], category: str) -> bool:
    prediction = str(prediction or "")
    if category == HME:
        reply = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in reply for a in answers)
    reply = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in reply for a in answers)


def score(items: list[Item], predictions: dict[str, str]) -> Report:
    right, asked = defaultdict(int), defaultdict(int)
    for item in items:
        category = item.row["category"]
        asked[category] += 1
        right[category] += is_correct(predictions[item.index], item.row["answer"], category)

    by_category = ResultTable("OCRBench categories", ["category", "questions", "right"])
    known = [c for names in GROUPS.values() for c in names]
    for category in known + sorted(c for c in asked if c not in known):
        if category in asked:
            by_category.rows.append([category, asked[category], right[category]])
    by_group = ResultTable("OCRBench groups (the final score is their sum)", ["group", "questions", "right"])
    for group, names in GROUPS.items():
        by_group.rows.append([group, sum(asked[c] for c in names), sum(right[c] for c in names)])

    total_right, total = sum(right[c] for c in known), len(items)
    headline = {"final score": total_right}
    report = Report("ocrbench", headline, [by_group, by_category])
    if total != FULL_SIZE:
        headline[f"scaled to {FULL_SIZE} questions"] = FULL_SIZE * total_right / total if total else 0.0
        report.notes.append(f"{total} questions, not the full {FULL_SIZE}: the final score counts right answers")
    other = [c for c in asked if c not in known]
    if other:
        report.notes.append(f"categories outside OCRBench's ten (not in the final score): {', '.join(other)}")
    return report
