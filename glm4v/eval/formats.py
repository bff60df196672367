"""The benchmark file format: VLMEvalKit's TSV with base64 images.

VLMEvalKit (the toolkit the OpenCompass leaderboard and the GLM-4V model card numbers come from)
ships every benchmark as one tab-separated file written by pandas, one row per question:

* ``index`` — the question id (an integer for most sets; strings such as
  ``VD_chart_0_1_0_1`` for HallusionBench). Predictions are keyed by it.
* ``question``, optional ``hint``, option columns ``A``, ``B``, ... (empty when absent),
  ``answer``, ``category``, ``l2-category`` (MMStar spells it ``l2_category``), ``split``.
* ``image`` — the picture as base64, or, to save space, the ``index`` of another row that holds
  the same picture (any value of at most 64 characters is such a reference), or a Python list
  literal of base64 strings for questions with several pictures (MMMU).
* ``image_path`` — a file name; used instead of ``image`` by "meta only" files, and by MME to
  tell which questions share a picture.

Rows without a picture are skipped, as VLMEvalKit does. Column names are matched
case-insensitively except the single-letter option columns. Only an empty field (or pandas'
``nan``) counts as missing: a literal option "None" stays an option.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from glm4v.errors import ImageError, InputError

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MISSING = {"", "nan", "NaN"}
_COLUMN_ALIASES = {"l2_category": "l2-category"}
REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an ``image`` value this short names another row

try:  # a base64 image is far longer than csv's default 128 KiB field limit
    csv.field_size_limit(sys.maxsize)
except OverflowError:  # C long is 32 bits on some platforms
    csv.field_size_limit(2**31 - 1)


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[dict[str, str | None]]
    skipped_without_image: int = 0


@dataclass
class Item:
    """One question ready for the model: its prompt, its picture and the row the metrics read."""

    index: str
    prompt: str
    image: "ImageSource"
    row: dict
    unit: str = ""  # the scoring unit --limit counts (a question group, an image, ...)

    def __post_init__(self):
        self.unit = self.unit or self.index


@dataclass(frozen=True)
class ImageSource:
    """Where a row's picture is: base64 text in the file, or a path next to it."""

    data: str | None = None
    path: Path | None = None

    def open(self) -> Image.Image:
        return decode_image(self.data) if self.data is not None else open_image_file(self.path)


def normalize_column(name: str) -> str:
    name = name.strip()
    if len(name) == 1 and name in OPTION_LETTERS:
        return name
    name = name.lower()
    return _COLUMN_ALIASES.get(name, name)


def read_tsv(path, required=("index", "question")) -> Table:
    """Read a VLMEvalKit TSV; rows keep only their non-missing fields."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such benchmark file")
    if not path.is_file():
        raise InputError(f"{path}: not a file (expected a VLMEvalKit .tsv benchmark file)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            records = list(csv.reader(f, delimiter="\t"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e}); expected a VLMEvalKit .tsv file") from None
    except csv.Error as e:
        raise InputError(f"{path}: malformed TSV ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not records:
        raise InputError(f"{path}: the file is empty")
    header = [normalize_column(c) for c in records[0]]
    # pandas writes its own row number as an unnamed first column when index=True
    keep = [i for i, name in enumerate(header) if name and not name.startswith("unnamed:")]
    columns = [header[i] for i in keep]
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'} "
            "(expected a VLMEvalKit benchmark TSV)"
        )
    rows, seen = [], {}
    for line_no, record in enumerate(records[1:], start=2):
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise InputError(f"{path}, line {line_no}: {len(record)} fields, the header has {len(header)}")
        row = {}
        for i in keep:
            value = record[i]
            if value not in _MISSING:
                row[header[i]] = value
        index = row.get("index")
        if index is None:
            raise InputError(f"{path}, line {line_no}: the row has no index")
        index = index.strip()
        if index.endswith(".0") and index[:-2].lstrip("-").isdigit():
            index = index[:-2]  # pandas may write an integer column holding a gap as floats
        row["index"] = index
        if index in seen:
            raise InputError(f"{path}, line {line_no}: index {index} repeats line {seen[index]}")
        seen[index] = line_no
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: the file has a header but no rows")
    return Table(path, columns, rows)


def resolve_images(table: Table) -> list[tuple[dict, list[ImageSource]]]:
    """Pair each row with its picture(s); rows without one are dropped (and counted)."""
    by_index = {row["index"]: row for row in table.rows}
    base_dir = table.path.parent
    out, skipped = [], 0
    for row in table.rows:
        sources = _row_images(row, by_index, base_dir, table.path)
        if not sources:
            skipped += 1
            continue
        out.append((row, sources))
    table.skipped_without_image = skipped
    if not out:
        raise InputError(f"{table.path}: no row has an image (columns 'image' or 'image_path')")
    return out


def _row_images(row, by_index, base_dir, path) -> list[ImageSource]:
    value = row.get("image")
    if value is not None:
        if len(value) <= REFERENCE_MAX_CHARS:
            target = by_index.get(value.strip())
            if target is None or len(target.get("image", "")) <= REFERENCE_MAX_CHARS:
                raise InputError(
                    f"{path}: row {row['index']}: the image field {value!r} is too short to be an image and does "
                    "not name another row that holds one"
                )
            value = target["image"]
        datas = _literal_list(value, row, path) if value.lstrip().startswith("[") else [value]
        return [ImageSource(data=d) for d in datas]
    value = row.get("image_path")
    if value is None:
        return []
    paths = _literal_list(value, row, path) if value.lstrip().startswith("[") else [value]
    return [ImageSource(path=(base_dir / p).resolve()) for p in paths]


def _literal_list(value, row, path) -> list[str]:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise InputError(f"{path}: row {row['index']}: an image field starting with '[' is not a list literal") from None
    if not isinstance(parsed, (list, tuple)) or not parsed or not all(isinstance(x, str) for x in parsed):
        raise InputError(f"{path}: row {row['index']}: expected a non-empty list of strings in the image field")
    return list(parsed)


def image_group_key(row: dict, sources: list[ImageSource]) -> str:
    """Which picture a question is about: ``image_path`` when the file has it, else the shared data."""
    if row.get("image_path"):
        return row["image_path"]
    first = sources[0]
    if first.data is None:
        return str(first.path)
    return hashlib.sha1(first.data.encode()).hexdigest()


def decode_image(data: str) -> Image.Image:
    """base64 text -> RGB picture, converted the way the official evaluation does (``.convert('RGB')``)."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the image field is not valid base64 ({e})") from None
    return _open(io.BytesIO(raw), "the base64 image")


def open_image_file(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    return _open(path, str(path))


def _open(fp, name) -> Image.Image:
    try:
        with Image.open(fp) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name} cannot be decoded as a picture ({e})") from None


def encode_image(image: Image.Image, format: str = "JPEG") -> str:
    """A picture as base64 text, as VLMEvalKit stores it (JPEG by default)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_tsv(path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write rows in the same TSV dialect pandas writes (quoted only where needed, '\\n' line ends)."""
    path = Path(path)
    if columns is None:
        columns = []
        for row in rows:
            columns += [c for c in row if c not in columns]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else str(row[c]) for c in columns])
    return path
