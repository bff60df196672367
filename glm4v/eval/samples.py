"""Small benchmark files in every supported format, with generated pictures.

The real benchmark files cannot be downloaded here, so the tests (and anyone trying the harness)
use these: a handful of questions per benchmark, laid out exactly like VLMEvalKit's TSVs (base64
JPEG pictures, pictures shared by reference to another row's index, list literals for several
pictures, MMBench rotations, MME question pairs, HallusionBench ids in the index). Each picture
is a coloured shape, so every answer can be read off it.

    python -m glm4v.eval.samples DIR     # writes DIR/<benchmark>.tsv for every benchmark
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from glm4v.eval.formats import encode_image, write_tsv

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 20)}


def picture(color: str, shape: str = "square", count: int = 1, text: str | None = None) -> Image.Image:
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    for i in range(count):
        x = 8 + (i % 3) * 28
        y = 8 + (i // 3) * 28
        box = (x, y, x + 22, y + 22)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    if text:
        draw.text((10, 70), text, fill="black")
    return image


def _b64(*args, **kwargs) -> str:
    return encode_image(picture(*args, **kwargs))


def _mcq(index, color, question, options, answer, **extra):
    row = {"index": index, "question": question, "image": _b64(color), "answer": answer, **extra}
    row.update(dict(zip("ABCD", options)))
    return row


def mmbench_rows() -> list[dict]:
    """Three questions with their rotations in the file, as MMBench_DEV_*.tsv holds them."""
    mains = [
        _mcq(0, "red", "What colour is the square?", ["red", "green", "blue", "yellow"], "A",
             hint="The picture shows one shape.", category="attribute_recognition", **{"l2-category": "finegrained_perception (instance-level)"}),
        _mcq(1, "blue", "图中正方形是什么颜色？", ["红色", "蓝色", "绿色"], "B",
             category="attribute_recognition", **{"l2-category": "finegrained_perception (instance-level)"}),
        _mcq(2, "green", "Is there a shape in the picture?", ["no", "yes"], "B",
             category="image_scene", **{"l2-category": "coarse_perception"}),
    ]
    rows = []
    for row in mains:
        row["split"] = "dev"
        letters = [k for k in "ABCD" if row.get(k) is not None]
        rows.append(row)
        for shift in range(1, len(letters)):
            rotated = {k: v for k, v in row.items() if k not in letters}
            for j, k in enumerate(letters):
                rotated[k] = row[letters[(j + shift) % len(letters)]]
            rotated["answer"] = letters[(letters.index(row["answer"]) - shift) % len(letters)]
            rotated["index"] = shift * 1_000_000 + row["index"]
            rotated["image"] = str(row["index"])  # the picture, by reference to the original row
            rows.append(rotated)
    return sorted(rows, key=lambda r: r["index"])


def seedbench_rows() -> list[dict]:
    return [
        _mcq(1, "red", "What colour is the shape?", ["red", "green", "blue", "yellow"], "A", category="Instance Attributes"),
        _mcq(2, "green", "What colour is the shape?", ["blue", "green", "red", "yellow"], "B", category="Instance Attributes"),
        _mcq(3, "blue", "How many shapes are there?", ["one", "two", "three", "four"], "A", category="Instances Counting"),
        _mcq(4, "yellow", "Where is the shape?", ["top left", "bottom right", "centre", "nowhere"], "A", category="Instance Location"),
    ]


def mmstar_rows() -> list[dict]:
    rows = [
        _mcq(0, "red", "Which colour dominates the shape?", ["green", "red", "blue", "yellow"], "B",
             category="coarse perception", l2_category="image style & quality", bench="MMBench"),
        _mcq(1, "blue", "How many squares are shown?", ["1", "2", "3", "4"], "A",
             category="fine-grained perception", l2_category="object counting", bench="SEEDBench_IMG"),
        _mcq(2, "green", "What is the shape?", ["circle", "triangle", "square", "star"], "C",
             category="fine-grained perception", l2_category="recognition", bench="AI2D"),
        _mcq(3, "yellow", "Is the background white?", ["yes", "no", "partly", "unknown"], "A",
             category="coarse perception", l2_category="image scene and topic", bench="MMMU"),
    ]
    return rows


def ai2d_rows() -> list[dict]:
    return [
        _mcq(0, "green", "Which colour is the shape in the diagram?", ["green", "red", "blue", "yellow"], "A"),
        _mcq(1, "red", "What does the diagram show?", ["a circle", "a square", "a line", "text"], "B"),
        _mcq(2, "blue", "How many shapes are in the diagram?", ["two", "three", "one", "none"], "C"),
    ]


def mmmu_rows() -> list[dict]:
    two = repr([_b64("red"), _b64("blue", "circle")])
    return [
        {**_mcq("validation_Art_1", "red", "<image 1> What colour is the square?", ["red", "blue", "green", "yellow"], "A"),
         "category": "Art", "split": "validation", "question_type": "multiple-choice"},
        {**_mcq("validation_Math_1", "green", "How many squares does <image 1> show?", ["1", "2", "3", "4"], "A"),
         "category": "Math", "split": "validation", "question_type": "multiple-choice"},
        {"index": "validation_Art_2", "question": "Which shape in <image 2> is round? Compare it with <image 1>.",
         "A": "the square", "B": "the circle", "answer": "B", "image": two,
         "category": "Art", "split": "validation", "question_type": "multiple-choice"},
        {"index": "dev_Math_1", "question": "How many shapes are in <image 1>? Answer with a number.",
         "answer": "1", "image": _b64("yellow"), "category": "Math", "split": "dev", "question_type": "open"},
    ]


def mme_rows() -> list[dict]:
    """Two questions per picture: the second row references the first's picture by index."""
    pictures = [
        ("color", "red", "Is the square red?", "Is the square blue?", "Yes", "No"),
        ("color", "blue", "Is the square green?", "Is the square blue?", "No", "Yes"),
        ("count", "green", "Is there one square in the image?", "Are there two squares in the image?", "Yes", "No"),
        ("code_reasoning", "yellow", "Does the code print 2?", "Does the code print 3?", "Yes", "No"),
    ]
    rows, index = [], 0
    for n, (category, color, q1, q2, a1, a2) in enumerate(pictures):
        path = f"{category}/{n}.jpg"
        first = index
        for k, (question, answer) in enumerate(((q1, a1), (q2, a2))):
            rows.append({"index": index, "image": _b64(color) if k == 0 else str(first), "question":
                         f"{question} Please answer yes or no.", "answer": answer, "category": category,
                         "image_path": path})
            index += 1
    return rows


def hallusion_rows() -> list[dict]:
    """Index <category>_<subcategory>_<n>_<set>_<figure>_<question>: figure 0 original, 1 edited."""
    spec = [
        ("VD", "illusion", 0, 0, 0, "Is the square red?", "Yes", "red"),
        ("VD", "illusion", 0, 0, 1, "Is the square larger than the picture?", "No", "red"),
        ("VD", "illusion", 0, 1, 0, "Is the square red?", "No", "blue"),
        ("VD", "illusion", 0, 1, 1, "Is the square larger than the picture?", "No", "blue"),
        ("VS", "chart", 1, 0, 0, "Is there exactly one shape?", "Yes", "green"),
        ("VS", "chart", 1, 1, 0, "Is there exactly one shape?", "No", "yellow"),
    ]
    rows = []
    for category, sub, set_id, figure, question, text, answer, color in spec:
        rows.append({"index": f"{category}_{sub}_0_{set_id}_{figure}_{question}", "category": category,
                     "l2-category": sub, "question": text, "answer": answer,
                     "image": _b64(color, count=1 if figure == 0 else 2)})
    return rows


def ocrbench_rows() -> list[dict]:
    return [
        {"index": 0, "question": "what is written in the image?", "answer": repr(["CENTRE"]),
         "category": "Regular Text Recognition", "image": _b64("red", text="CENTRE")},
        {"index": 1, "question": "what is written in the image?", "answer": repr(["STOP", "stop"]),
         "category": "Artistic Text Recognition", "image": _b64("blue", text="STOP")},
        {"index": 2, "question": "What colour is the square?", "answer": repr(["green"]),
         "category": "Scene Text-centric VQA", "image": _b64("green")},
        {"index": 3, "question": "What is the total?", "answer": repr(["42"]),
         "category": "Key Information Extraction", "image": _b64("yellow", text="TOTAL 42")},
        {"index": 4, "question": "Write out the expression in LaTeX.", "answer": repr(["x^{2}+1"]),
         "category": "Handwritten Mathematical Expression Recognition", "image": _b64("red", text="x2+1")},
    ]


SAMPLES = {
    "mmbench": mmbench_rows, "seedbench": seedbench_rows, "mmstar": mmstar_rows, "mmmu": mmmu_rows,
    "mme": mme_rows, "hallusionbench": hallusion_rows, "ai2d": ai2d_rows, "ocrbench": ocrbench_rows,
}


def write_samples(folder) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {name: write_tsv(folder / f"{name}.tsv", rows()) for name, rows in SAMPLES.items()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m glm4v.eval.samples DIR", file=sys.stderr)
        sys.exit(2)
    for name, path in write_samples(sys.argv[1]).items():
        print(f"{name}: {path}")
