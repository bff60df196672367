"""``glm4v eval``: every benchmark format end to end, resuming, --limit, results, errors, synth."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

import glm4v
from glm4v.cli import main
from glm4v.engine import EMBEDDED_MODEL
from glm4v.eval.cli import BENCHMARKS, SYNTH_MODULE
from glm4v.eval.formats import read_tsv, write_tsv
from glm4v.eval.runner import Generator, run_benchmark
from glm4v.eval.samples import write_samples

TINY = Path(__file__).parent / "fixtures" / "tiny"
HEADLINES = {
    "mmbench": "accuracy (circular)", "seedbench": "accuracy", "mmstar": "accuracy", "mmmu": "accuracy",
    "mme": "total", "hallusionbench": "overall", "ai2d": "accuracy", "ocrbench": "final score",
}
SIZES = {"mmbench": 9, "seedbench": 4, "mmstar": 4, "mmmu": 4, "mme": 8, "hallusionbench": 6, "ai2d": 3, "ocrbench": 5}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_samples(tmp_path_factory.mktemp("samples"))


def eval_cli(benchmark, data, out, *extra, model=TINY):
    argv = ["eval", benchmark, "--data", str(data), "--output-dir", str(out), "--max-new-tokens", "3",
            "--batch-size", "3", "--device", "cpu"]
    if model is not None:
        argv += ["--model", str(model)]
    return main(argv + list(extra))


def results(out, benchmark, data):
    return json.loads((Path(out) / f"{benchmark}-{Path(data).stem}.results.json").read_text())


def prediction_lines(out, benchmark, data):
    return (Path(out) / f"{benchmark}-{Path(data).stem}.predictions.jsonl").read_text().splitlines()


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_every_benchmark_runs_end_to_end_on_the_tiny_model(benchmark, samples, tmp_path, capsys):
    assert eval_cli(benchmark, samples[benchmark], tmp_path) == 0
    captured = capsys.readouterr()
    assert f"== {benchmark} ==" in captured.out and "results: " in captured.out
    assert f"{benchmark}: 100%" in captured.err  # the progress bar (with its rate and ETA) went to stderr
    result = results(tmp_path, benchmark, samples[benchmark])
    assert HEADLINES[benchmark] in result["headline"] and result["questions"] == SIZES[benchmark]
    assert result["generated_this_run"] == SIZES[benchmark]
    assert result["settings"]["decoding"] == "greedy" and result["model"] == str(TINY.resolve())
    lines = [json.loads(x) for x in prediction_lines(tmp_path, benchmark, samples[benchmark])]
    assert len(lines) == SIZES[benchmark] and all(x["benchmark"] == benchmark for x in lines)
    assert all(isinstance(x["prediction"], str) for x in lines)


def test_resume_skips_answered_questions_and_needs_no_model_when_all_are_done(samples, tmp_path, capsys, monkeypatch):
    data = samples["mme"]
    assert eval_cli("mme", data, tmp_path, "--limit", "2") == 0  # two pictures = four questions
    assert results(tmp_path, "mme", data)["questions"] == 4
    first = prediction_lines(tmp_path, "mme", data)
    assert len(first) == 4
    capsys.readouterr()

    assert eval_cli("mme", data, tmp_path) == 0
    err = capsys.readouterr().err
    assert "resuming: 4 of 8 questions already answered" in err
    assert results(tmp_path, "mme", data)["generated_this_run"] == 4
    lines = prediction_lines(tmp_path, "mme", data)
    assert lines[:4] == first and len(lines) == 8

    def no_model(*args, **kwargs):
        raise AssertionError("a fully cached run must not load the model")

    monkeypatch.setattr(glm4v, "load", no_model)
    assert eval_cli("mme", data, tmp_path) == 0
    assert results(tmp_path, "mme", data)["generated_this_run"] == 0
    assert len(prediction_lines(tmp_path, "mme", data)) == 8


def test_a_half_written_cache_line_is_ignored_and_that_question_redone(samples, tmp_path, capsys):
    data = samples["ai2d"]
    assert eval_cli("ai2d", data, tmp_path) == 0
    cache = tmp_path / f"ai2d-{data.stem}.predictions.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # killed in the middle of a write
    capsys.readouterr()
    assert eval_cli("ai2d", data, tmp_path) == 0
    err = capsys.readouterr().err
    assert "ignored 1 unreadable line" in err and "resuming: 2 of 3" in err
    records = [json.loads(x) for x in cache.read_text().splitlines()[:2] + cache.read_text().splitlines()[3:]]
    assert sorted(r["index"] for r in records) == ["0", "1", "2"]


def test_a_cache_of_another_model_is_refused(samples, tmp_path, capsys):
    data = samples["ai2d"]
    cache = tmp_path / f"ai2d-{data.stem}.predictions.jsonl"
    cache.write_text(json.dumps({"benchmark": "ai2d", "index": "0", "prediction": "A", "model": "/other/model"}) + "\n")
    assert eval_cli("ai2d", data, tmp_path) == 1
    assert "holds predictions of model '/other/model'" in capsys.readouterr().err


def test_mmbench_limit_counts_questions_with_all_their_rotations(samples, tmp_path):
    assert eval_cli("mmbench", samples["mmbench"], tmp_path, "--limit", "2") == 0
    result = results(tmp_path, "mmbench", samples["mmbench"])
    assert result["questions"] == 4 + 3  # questions 0 and 1 with 4 and 3 options
    assert result["tables"][0]["rows"][0][:2] == ["Overall", 2]
    indices = {json.loads(x)["index"] for x in prediction_lines(tmp_path, "mmbench", samples["mmbench"])}
    assert indices == {"0", "1000000", "2000000", "3000000", "1", "1000001", "2000001"}


def oracle(items):
    """Replies a perfect model would give, in the form each extractor reads."""
    return [it.row["answer"][0] if isinstance(it.row["answer"], list) else f"{it.row['answer']}." for it in items]


@pytest.mark.parametrize(
    "benchmark, expected",
    [("mmbench", 100.0), ("seedbench", 100.0), ("mmstar", 100.0), ("mmmu", 100.0), ("ai2d", 100.0),
     ("mme", 600.0),  # two perception sub-tasks and one cognition sub-task, 200 each
     ("hallusionbench", 100.0), ("ocrbench", 5)],
)
def test_a_perfect_model_gets_full_marks(benchmark, expected, samples, tmp_path, capsys):
    report, path = run_benchmark(BENCHMARKS[benchmark], samples[benchmark], oracle, output_dir=tmp_path,
                                 model_id="oracle", progress=False)
    assert report.headline[HEADLINES[benchmark]] == expected
    assert json.loads(path.read_text())["headline"][HEADLINES[benchmark]] == expected


def test_the_results_table_is_printed(samples, tmp_path, capsys):
    run_benchmark(BENCHMARKS["seedbench"], samples["seedbench"], oracle, output_dir=tmp_path, model_id="o", progress=False)
    out = capsys.readouterr().out
    assert "group                          questions  correct  accuracy" in out
    assert "category: Instances Counting           1        1    100.00" in out


def test_a_file_without_answers_gives_a_submission_file(tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in read_tsv(write_samples(tmp_path)["mmbench"]).rows]
    data = write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows)
    report, path = run_benchmark(BENCHMARKS["mmbench"], data, lambda items: ["B"] * len(items),
                                 output_dir=tmp_path / "out", model_id="m", progress=False)
    assert report.headline == {}
    submission = read_tsv(tmp_path / "out" / "mmbench-MMBench_TEST_EN.submission.tsv")
    assert len(submission.rows) == 9 and submission.rows[0]["extracted"] == "B"
    assert "predictions only" in json.loads(path.read_text())["notes"][0]


def test_batched_generation_matches_one_at_a_time(samples):
    pipe = glm4v.load(TINY)
    items = BENCHMARKS["mmmu"].build(read_tsv(samples["mmmu"]))  # prompts of different lengths
    generator = Generator(pipe, max_new_tokens=4)
    together = generator(items)
    alone = [generator([it])[0] for it in items]
    assert together == alone and all(isinstance(t, str) for t in together)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "ai2d", "--data", "/nonexistent/AI2D.tsv", "--model", str(TINY)], "no such benchmark file"),
        (["eval", "ai2d", "--data", "x.tsv", "--model", "/nonexistent/model"], "no such model folder"),
        (["eval", "ai2d", "--data", "x.tsv", "--limit", "0"], "--limit must be at least 1"),
        (["eval", "ai2d", "--data", "x.tsv", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_user_errors_are_reported_clearly(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_eval_without_benchmark_prints_help(capsys):
    assert main(["eval"]) == 2
    out = capsys.readouterr().out
    assert "mmbench" in out and "ocrbench" in out and "synth" in out
    with pytest.raises(SystemExit):
        main(["eval", "vqav2", "--data", "x.tsv"])


def test_synth_fails_clearly_when_its_module_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, SYNTH_MODULE, None)  # makes the import fail as if the file were absent
    assert main(["eval", "synth", "--anything", "goes"]) == 1
    assert "the synthetic benchmark is not part of this installation" in capsys.readouterr().err


def test_synth_is_dispatched_to_its_module(monkeypatch):
    calls = []
    fake = types.ModuleType(SYNTH_MODULE)
    fake.add_arguments = lambda parser: parser.add_argument("--split", default="test")
    fake.run = lambda args: calls.append(args.split) or 0
    monkeypatch.setitem(sys.modules, SYNTH_MODULE, fake)
    assert main(["eval", "synth", "--split", "val"]) == 0
    assert calls == ["val"]


@pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(), reason="the embedded model is not built yet")
def test_the_default_model_is_the_embedded_one(samples, tmp_path, capsys):
    assert eval_cli("mme", samples["mme"], tmp_path, "--limit", "1", model=None) == 0
    result = results(tmp_path, "mme", samples["mme"])
    assert result["model"] == "embedded" and result["questions"] == 2
    assert tmp_path.name in str(result["predictions_file"])
