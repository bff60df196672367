"""Running a benchmark: batched greedy generation, a resumable prediction cache, the results.

Every answer is appended to ``<output>/<benchmark>-<data>.predictions.jsonl`` as soon as its batch
finishes; a later run with the same output folder skips the questions already answered, so an
interrupted run loses at most one batch. Questions that share a picture (MMBench rotations, MME's
question pairs) are generated next to each other so the picture is encoded once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from glm4v.errors import Glm4vError, InputError
from glm4v.eval.formats import Item, Table, read_tsv, write_tsv
from glm4v.eval.report import Report
from glm4v.generate import GenerationConfig, generate_steps

# The official GLM-4V evaluation (VLMEvalKit) generates with max_length=2048: prompt tokens plus
# new tokens, the picture counted as its three placeholder tokens.
OFFICIAL_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    build: Callable[[Table], list[Item]]
    score: Callable[[list[Item], dict[str, str]], Report]
    submission: Callable[[list[Item], dict[str, str]], list[dict]] | None = None


class PredictionCache:
    """Predictions as JSON lines ``{"benchmark", "index", "prediction", "model"}``."""

    def __init__(self, path: Path, benchmark: str, model: str):
        self.path, self.benchmark, self.model = Path(path), benchmark, model
        self.skipped_lines = 0

    def load(self) -> dict[str, str]:
        done = {}
        if not self.path.exists():
            return done
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the prediction cache {self.path}: {e}") from None
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, text = str(record["index"]), record["prediction"]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                self.skipped_lines += 1  # e.g. the half-written last line of a killed run
                continue
            if record.get("benchmark") != self.benchmark:
                continue
            if record.get("model") != self.model:
                raise InputError(
                    f"{self.path} holds predictions of model {record.get('model')!r}, not {self.model!r}; "
                    "use another --output-dir (or delete the file) to evaluate this model"
                )
            done[key] = text
        return done

    def append(self, pairs: list[tuple[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        with open(self.path, "a", encoding="utf-8") as f:
            if needs_newline:
                f.write("\n")
            for index, text in pairs:
                record = {"benchmark": self.benchmark, "index": index, "prediction": text, "model": self.model}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


class Generator:
    """Greedy answers for a batch of items: left-padded prompts, each row with its own picture."""

    def __init__(self, pipe, max_new_tokens: int | None = None, max_length: int = OFFICIAL_MAX_LENGTH):
        if max_new_tokens is not None and max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.pipe, self.max_new_tokens, self.max_length = pipe, max_new_tokens, max_length

    def __call__(self, items: list[Item]) -> list[str]:
        tokenizer = self.pipe.tokenizer
        rows, features, budgets = [], [], []
        for item in items:
            try:
                picture = item.image.open()
            except Glm4vError as e:
                raise type(e)(f"question {item.index}: {e}") from None
            ids, _ = tokenizer.encode_chat([{"role": "user", "image": picture, "content": item.prompt}])
            rows.append(ids)
            features.append(self.pipe.image_features(picture)[0])
            budgets.append(self.max_new_tokens or max(1, self.max_length - len(ids)))

        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        config = GenerationConfig(max_new_tokens=max(budgets), do_sample=False)

        outputs = [[] for _ in items]
        finished = [False] * len(items)
        steps = generate_steps(self.pipe.model, input_ids, attention_mask=mask, config=config,
                               image_features=torch.cat(features))
        try:
            for step in steps:
                for b, token in enumerate(step.tokens):
                    if finished[b]:
                        continue
                    if step.reasons[b] == "stop":
                        finished[b] = True  # the stop token itself is not part of the answer
                        continue
                    outputs[b].append(token)
                    finished[b] = len(outputs[b]) >= budgets[b] or step.finished[b]
                if all(finished):
                    break
        finally:
            steps.close()
        # ids past the tokenizer (the embedding is padded to a multiple of 128) carry no text
        vocab = len(tokenizer)
        return [tokenizer.decode([t for t in ids if t < vocab], skip_special_tokens=True) for ids in outputs]


def select(items: list[Item], limit: int | None) -> list[Item]:
    """The first ``limit`` scoring units (questions; MMBench question groups; MME pictures)."""
    if limit is None:
        return items
    if limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    units = []
    for item in items:
        if item.unit not in units:
            if len(units) == limit:
                continue
            units.append(item.unit)
    keep = set(units)
    return [item for item in items if item.unit in keep]


def _generation_order(items: list[Item]) -> list[Item]:
    """Items of one unit next to each other (they share a picture), units in file order."""
    first = {}
    for position, item in enumerate(items):
        first.setdefault(item.unit, position)
    return sorted(items, key=lambda item: first[item.unit])


def output_stem(benchmark: str, data: Path) -> str:
    return f"{benchmark}-{Path(data).stem}"


def run_benchmark(
    benchmark: Benchmark,
    data,
    answer: Callable[[list[Item]], list[str]],
    *,
    output_dir,
    model_id: str,
    batch_size: int = 4,
    limit: int | None = None,
    settings: dict | None = None,
    progress: bool = True,
    out=None,
) -> tuple[Report, Path]:
    """Answer every question not yet in the cache, score, print the table, write the JSON."""
    out = out or sys.stdout
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    data = Path(data)
    table = read_tsv(data)
    items = select(benchmark.build(table), limit)
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {output_dir}: {e}") from None
    stem = output_stem(benchmark.name, data)
    cache = PredictionCache(output_dir / f"{stem}.predictions.jsonl", benchmark.name, model_id)
    done = cache.load()
    todo = [item for item in _generation_order(items) if item.index not in done]
    if cache.skipped_lines:
        print(f"warning: ignored {cache.skipped_lines} unreadable line(s) in {cache.path}", file=sys.stderr)
    if len(todo) < len(items):
        print(f"resuming: {len(items) - len(todo)} of {len(items)} questions already answered in {cache.path}",
              file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=benchmark.name, unit="q",
               file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = answer(batch)
            cache.append([(item.index, text) for item, text in zip(batch, texts)])
            for item, text in zip(batch, texts):
                done[item.index] = text
            bar.update(len(batch))
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {len(done)} predictions are saved in {cache.path}; run again to resume", file=sys.stderr)
        raise
    bar.close()

    predictions = {item.index: done[item.index] for item in items}
    scored = [item for item in items if item.row.get("answer") is not None]
    if scored:
        report = benchmark.score(scored, predictions)
        if len(scored) < len(items):
            report.notes.append(f"{len(items) - len(scored)} of {len(items)} questions have no answer in the file and are not scored")
    else:
        report = Report(benchmark.name, {}, notes=["the file has no answers (a server-scored split): predictions only"])
        rows = (benchmark.submission or _plain_submission)(items, predictions)
        submission = write_tsv(output_dir / f"{stem}.submission.tsv", rows)
        report.notes.append(f"submission file: {submission}")
    if table.skipped_without_image:
        report.notes.append(f"{table.skipped_without_image} row(s) without a picture skipped (as VLMEvalKit does)")
    report.benchmark = benchmark.name

    results_path = output_dir / f"{stem}.results.json"
    result = {
        "benchmark": benchmark.name,
        "title": benchmark.title,
        "data": str(data.resolve()),
        "model": model_id,
        "questions": len(items),
        "limit": limit,
        "generated_this_run": len(todo),
        "elapsed_seconds": round(time.perf_counter() - started, 3),
        "predictions_file": str(cache.path),
        "settings": settings or {},
        **{k: v for k, v in report.to_dict().items() if k != "benchmark"},
    }
    tmp = results_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, results_path)

    print(report.render(), file=out)
    print(f"\nresults: {results_path}\npredictions: {cache.path}", file=out)
    return report, results_path


def _plain_submission(items: list[Item], predictions: dict[str, str]) -> list[dict]:
    return [{"index": i.index, "question": i.row.get("question"), "prediction": predictions[i.index]} for i in items]
