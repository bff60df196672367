"""Results of one benchmark run: the headline numbers, breakdown tables, and how to show them."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field


@dataclass
class ResultTable:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)


@dataclass
class Report:
    benchmark: str
    headline: dict[str, float]  # the number(s) the model card reports, first is the main one
    tables: list[ResultTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [f"== {self.benchmark} =="]
        width = max(len(k) for k in self.headline) if self.headline else 0
        for name, value in self.headline.items():
            lines.append(f"{name:<{width}}  {_fmt(value)}")
        for table in self.tables:
            lines += ["", table.title, *_grid(table.columns, table.rows)]
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _grid(columns, rows) -> list[str]:
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r):
        # first column (the group name) left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]


def percent(hits: int, total: int) -> float:
    return 100.0 * hits / total if total else 0.0


def accuracy_table(records, groups=("split", "l2-category", "category"), title="accuracy (%)") -> ResultTable:
    """Overall accuracy, then one row per value of each grouping column the rows have.

    ``records`` is a list of (row, hit). This is VLMEvalKit's ``report_acc`` layout: overall, then
    l2-category and category breakdowns (and one per split when the file has several splits).
    """
    table = ResultTable(title, ["group", "questions", "correct", "accuracy"])
    hits = sum(bool(h) for _, h in records)
    table.rows.append(["Overall", len(records), hits, percent(hits, len(records))])
    for column in groups:
        buckets = defaultdict(list)
        for row, hit in records:
            if row.get(column) is not None:
                buckets[row[column]].append(bool(hit))
        if not buckets or (column == "split" and len(buckets) < 2):
            continue
        for value in sorted(buckets):
            b = buckets[value]
            table.rows.append([f"{column}: {value}", len(b), sum(b), percent(sum(b), len(b))])
    return table
