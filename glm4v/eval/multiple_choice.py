"""Multiple-choice benchmarks: MMBench (EN/CN, circular), SEEDBench_IMG, MMStar, AI2D, MMMU.

The prompt is VLMEvalKit's multiple-choice prompt followed by the "\\nShort Answer." the official
GLM-4V evaluation appends for multiple-choice and yes/no sets::

    Hint: {hint}                       (only when the row has one)
    Question: {question}
    Options:
    A. {A}
    B. {B}
    Please select the correct answer from the options above. 

    Short Answer.

Columns read: ``index``, ``question``, ``hint``, ``A``..``Z`` (the options present, in letter
order), ``answer`` (a letter; MMMU open questions hold the answer text), and for the breakdowns
``split``, ``l2-category`` and ``category``. MMMU questions without options are open questions.
"""

from __future__ import annotations

import re
from collections import defaultdict

from glm4v.errors import InputError
from glm4v.eval.extract import extract_choice, match_open_answer
from glm4v.eval.formats import OPTION_LETTERS, Item, Table, resolve_images
from glm4v.eval.report import Report, accuracy_table, percent

SHORT_ANSWER = "\nShort Answer."
CIRCULAR_STRIDE = 1_000_000  # MMBench: rotation k of question q has index k * 1e6 + q


def options_of(row: dict) -> dict[str, str]:
    return {letter: row[letter] for letter in OPTION_LETTERS if row.get(letter) is not None}


def mcq_text(row: dict, options: dict[str, str]) -> str:
    """VLMEvalKit's multiple-choice prompt (without the GLM-4V suffix)."""
    text = f"Hint: {row['hint']}\n" if row.get("hint") is not None else ""
    text += f"Question: {row['question']}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        text += "Please select the correct answer from the options above. \n"
    return text


def _answer_letter(row, options, path, strict=True) -> str | None:
    answer = row.get("answer")
    if answer is None:
        return None  # e.g. the MMBench test split: predictions only
    answer = answer.strip()
    if answer not in options and strict:
        raise InputError(
            f"{path}: row {row['index']}: the answer {answer!r} is not one of its options {', '.join(options)}"
        )
    return answer


def build_items(table: Table) -> list[Item]:
    """SEEDBench_IMG, MMStar, AI2D: one item per row."""
    items = []
    for row, images in resolve_images(table):
        options = options_of(row)
        if len(options) < 2:
            raise InputError(f"{table.path}: row {row['index']}: a multiple-choice question needs at least two options")
        row = dict(row, answer=_answer_letter(row, options, table.path))
        items.append(Item(row["index"], mcq_text(row, options) + SHORT_ANSWER, images[0], row))
    return items


def score(items: list[Item], predictions: dict[str, str], name: str = "multiple choice") -> Report:
    records = []
    for item in items:
        choice = extract_choice(predictions[item.index], options_of(item.row))
        records.append((item.row, choice == item.row["answer"]))
    table = accuracy_table(records)
    return Report(name, {"accuracy": table.rows[0][3]}, [table])


# -- MMBench ---------------------------------------------------------------------------------------

def build_mmbench_items(table: Table, circular: str = "auto") -> list[Item]:
    """MMBench rows, with every question's rotated variants grouped by ``index % 1e6``.

    VLMEvalKit's MMBench files already hold the rotations (indices 1e6 + q, 2e6 + q, ...).
    ``circular="auto"`` uses them, or builds them when the file has none; ``"off"`` keeps only
    the original questions (each scored on its own).
    """
    if circular not in ("auto", "off"):
        raise InputError(f"circular must be 'auto' or 'off', got {circular!r}")
    rows = []
    for row, images in resolve_images(table):
        try:
            number = int(row["index"])
        except ValueError:
            raise InputError(f"{table.path}: MMBench indices are integers, got {row['index']!r}") from None
        options = options_of(row)
        if len(options) < 2:
            raise InputError(f"{table.path}: row {row['index']}: a multiple-choice question needs at least two options")
        row = dict(row, answer=_answer_letter(row, options, table.path))
        rows.append((number, row, images[0]))
    mains = {n for n, _, _ in rows if n < CIRCULAR_STRIDE}
    if circular == "off":
        rows = [r for r in rows if r[0] < CIRCULAR_STRIDE]
    elif not any(n >= CIRCULAR_STRIDE for n, _, _ in rows):
        rows = [rotated for r in rows for rotated in _rotations(*r)]
    items = []
    for number, row, image in rows:
        group = number % CIRCULAR_STRIDE
        if group not in mains:
            continue  # VLMEvalKit only scores groups whose original question is in the file
        items.append(Item(row["index"], mcq_text(row, options_of(row)) + SHORT_ANSWER, image, row, unit=str(group)))
    return items


def _rotations(number, row, image):
    """The question itself and its n-1 circular shifts of the options (the answer moves along)."""
    options = options_of(row)
    letters = list(options)
    texts = [options[k] for k in letters]
    n = len(letters)
    out = [(number, row, image)]
    for shift in range(1, n):
        rotated = {k: v for k, v in row.items() if k not in options}
        for j, letter in enumerate(letters):
            rotated[letter] = texts[(j + shift) % n]
        if row.get("answer") is not None:
            rotated["answer"] = letters[(letters.index(row["answer"]) - shift) % n]
        index = shift * CIRCULAR_STRIDE + number
        rotated["index"] = str(index)
        out.append((index, rotated, image))
    return out


def score_mmbench(items: list[Item], predictions: dict[str, str]) -> Report:
    """Circular evaluation: a question counts only if every rotation of it is answered right."""
    groups = defaultdict(list)
    for item in items:
        groups[item.unit].append(item)
    circular, first_pass = [], []
    for unit, members in groups.items():
        hits = [extract_choice(predictions[m.index], options_of(m.row)) == m.row["answer"] for m in members]
        main = next(m for m in members if int(m.index) < CIRCULAR_STRIDE)
        circular.append((main.row, all(hits)))
        first_pass.append((main.row, hits[members.index(main)]))
    table = accuracy_table(circular, title="circular accuracy (%): a question counts if all its rotations are right")
    passes = len(items) / max(len(groups), 1)
    vanilla = percent(sum(h for _, h in first_pass), len(first_pass))
    return Report(
        "mmbench",
        {"accuracy (circular)": table.rows[0][3], "accuracy (original order only)": vanilla},
        [table],
        [f"{len(groups)} questions, {len(items)} passes ({passes:.2f} per question)"],
    )


# -- MMMU ------------------------------------------------------------------------------------------

_IMAGE_TAG = re.compile(r"<image (\d+)>")


def build_mmmu_items(table: Table) -> list[Item]:
    """MMMU: multiple-choice and open questions; one picture per question.

    Questions refer to their pictures as ``<image k>``. GLM-4V takes one picture, so (as
    VLMEvalKit does for single-image models) the picture of the first tag in the prompt is used
    and each tag becomes a line break; without a tag, the first picture.
    """
    items = []
    for row, images in resolve_images(table):
        row = dict(row)
        options = options_of(row)
        is_open = not options  # as VLMEvalKit decides: an open question has no option columns
        if is_open:
            if row.get("answer") is not None:
                row["answer"] = row["answer"].strip()
        else:
            # not strict: a malformed answer is scored wrong (and counted) instead of stopping the run
            row["answer"] = _answer_letter(row, options, table.path, strict=False)
        row["question_type"] = "open" if is_open else "multiple-choice"
        text = mcq_text(row, options)
        tags = _IMAGE_TAG.findall(text)
        picture = int(tags[0]) - 1 if tags else 0
        if not 0 <= picture < len(images):
            raise InputError(
                f"{table.path}: row {row['index']}: the question refers to <image {picture + 1}> but the row has "
                f"{len(images)} picture(s)"
            )
        prompt = "\n".join(_IMAGE_TAG.split(text)[::2]) + SHORT_ANSWER
        items.append(Item(row["index"], prompt, images[picture], row))
    return items


def score_mmmu(items: list[Item], predictions: dict[str, str]) -> Report:
    records = []
    for item in items:
        prediction = predictions[item.index]
        if item.row["question_type"] == "open":
            hit = match_open_answer(prediction, item.row["answer"])
        else:
            hit = extract_choice(prediction, options_of(item.row)) == item.row["answer"]
        records.append((item.row, hit))
    table = accuracy_table(records, groups=("split", "question_type", "l2-category", "category"))
    report = Report("mmmu", {"accuracy": table.rows[0][3]}, [table])
    odd = [i.index for i in items if i.row["question_type"] != "open" and i.row["answer"] not in options_of(i.row)]
    if odd:
        report.notes.append(f"{len(odd)} multiple-choice row(s) have an answer that is not an option letter "
                            f"(scored wrong): {', '.join(odd[:5])}")
    return report


def submission_rows(items: list[Item], predictions: dict[str, str]) -> list[dict]:
    """Rows for a server-scored split (e.g. MMBench test): the question, options and the reply."""
    out = []
    for item in items:
        options = options_of(item.row)
        row = {"index": item.index, "question": item.row.get("question"), "hint": item.row.get("hint")}
        row.update(options)
        row["prediction"] = predictions[item.index]
        row["extracted"] = extract_choice(predictions[item.index], options) or ""
        out.append(row)
    return out
