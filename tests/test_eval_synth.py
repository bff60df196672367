"""`glm4v eval synth` and the shipped embedded model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

import glm4v
from glm4v.engine import EMBEDDED_MODEL
from glm4v.eval import synth as eval_synth
from glm4v.eval.synth import Item, answer_items, format_table, items_from_examples, score_items
from glm4v.train import synth
from tests.conftest import TINY_DIR

REPO = Path(__file__).resolve().parents[1]
shipped = pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(), reason="embedded model not built yet")


def args(**kw):
    parser = argparse.ArgumentParser()
    eval_synth.add_arguments(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_scores_per_skill_and_language_and_multiturn_needs_every_turn():
    items = [
        Item("1", "perception", "en", None, ["q"], ["The circle is red."]),
        Item("2", "perception", "zh", None, ["q"], ["圆形是红色的。"]),
        Item("3", "multiturn", "en", None, ["q1", "q2"], ["The star is blue.", "3"]),
        Item("4", "multiturn", "zh", None, ["q1", "q2"], ["星形是蓝色的。", "3"]),
    ]
    answers = [["the circle is red"], ["圆形是绿色的。"], ["The star is blue.", "3"], ["星形是蓝色的。", "4"]]
    report = score_items(items, answers)
    assert report["overall"] == 0.5 and report["n"] == 4
    assert report["skills"] == {"perception": 0.5, "multiturn": 0.5}
    assert report["languages"] == {"en": 1.0, "zh": 0.0}
    table = format_table(report)
    assert "perception" in table and "overall" in table and "100.0" in table


def test_batched_answers_equal_one_at_a_time_on_the_tiny_model():
    pipe = glm4v.load(TINY_DIR)
    examples = synth.generate_test_split(seed=1, n=18)
    for ex in examples:  # the tiny model sees 112 px
        ex.image = ex.image.resize((112, 112))
    items = items_from_examples(examples)
    batched = answer_items(pipe.model, pipe.tokenizer, items, batch_size=18, max_new_tokens=6)
    assert [len(a) for a in batched] == [len(it.questions) for it in items]
    for i in (0, 8, 13):  # perception, multiturn (2 turns), a Chinese one
        assert answer_items(pipe.model, pipe.tokenizer, [items[i]], batch_size=1, max_new_tokens=6)[0] == batched[i]


def test_run_rejects_bad_arguments():
    with pytest.raises(glm4v.InputError):
        eval_synth.run(args(model=str(TINY_DIR), batch_size=0))


@shipped
def test_embedded_model_is_small_complete_and_answers_the_demo_question():
    files = {p.name for p in EMBEDDED_MODEL.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
            "model.safetensors.index.json"} <= files
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL.iterdir())
    assert size <= 25 * 1024 * 1024
    official = json.loads((REPO / "tests/fixtures/official_config.json").read_text())
    assert list(json.loads((EMBEDDED_MODEL / "config.json").read_text())) == list(official)
    demo = (REPO / "scripts/demo.sh").read_text()
    assert "examples/shapes.png" in demo and "What colour is the circle?" in demo
    pipe = glm4v.load()
    answer = pipe.chat([{"role": "user", "image": str(REPO / "examples/counting.png"),
                         "content": "How many stars are there in the image?"}])
    assert answer.strip() == "4"  # the reply starts with the "\n" GLM-4 puts after <|assistant|>


@shipped
def test_embedded_model_names_the_colour_of_the_circle():
    pipe = glm4v.load()
    answer = pipe.chat([{"role": "user", "image": str(REPO / "examples/shapes.png"), "content": "What colour is the circle?"}])
    assert answer.strip() == "The circle is red."
    answer = pipe.chat([{"role": "user", "image": str(REPO / "examples/shapes.png"), "content": "图中的圆形是什么颜色的？"}])
    assert answer.strip() == "圆形是红色的。"


@shipped
def test_embedded_model_answers_test_split_questions():
    """A regression guard for the shipped model (96.8 % overall, perception 100 %, counting 100 %,
    text 98 %, descriptions 100 % on the full split; 100 % on these 72): the learned skills stay
    learned, with a margin for another CPU's rounding; issue 3's bar is the slow test below."""
    pipe = glm4v.load()
    items = items_from_examples(synth.generate_test_split(n=72))
    report = score_items(items, answer_items(pipe.model, pipe.tokenizer, items))
    assert report["overall"] >= 0.90, format_table(report)
    for skill in ("perception", "counting", "text"):
        assert report["skills"][skill] >= 0.875, format_table(report)
    assert report["skills"]["description"] >= 0.875, format_table(report)


@shipped
def test_answer_caps_hold_the_longest_reference_of_each_skill():
    """A cap below a reference would cut right answers short and score them wrong."""
    from glm4v.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    longest: dict[str, int] = {}
    for item in items_from_examples(synth.generate_test_split()):
        for reference in item.references:
            longest[item.skill] = max(longest.get(item.skill, 0), len(tokenizer.encode(reference)))
    for skill, n in longest.items():
        cap = eval_synth.MAX_NEW_TOKENS.get(skill, eval_synth.DEFAULT_MAX_NEW_TOKENS)
        assert n < cap, (skill, n, cap)


@shipped
def test_embedded_model_reads_the_example_text():
    pipe = glm4v.load()
    answer = pipe.chat([{"role": "user", "image": str(REPO / "examples/text.png"), "content": "What is written in the image?"}])
    assert answer.strip() == "CAKE"


@shipped
def test_eval_synth_json_prints_exactly_one_object(capsys):
    assert eval_synth.run(args(json=True, num=36)) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert out.count("\n") == 1
    assert set(result) == {"overall", "skills", "languages", "n"}
    assert result["n"] == 36 and set(result["languages"]) == {"en", "zh"}
    assert set(result["skills"]) == set(synth.SKILLS)


@pytest.fixture(scope="module")
def full_split_report():
    started = time.perf_counter()
    pipe = glm4v.load()
    items = items_from_examples(synth.generate_test_split())
    report = score_items(items, answer_items(pipe.model, pipe.tokenizer, items))
    return report, time.perf_counter() - started


@shipped
@pytest.mark.slow
def test_full_test_split_is_scored_in_under_a_minute(full_split_report):
    report, seconds = full_split_report
    assert report["n"] >= 1000
    assert seconds < 60, seconds


@shipped
@pytest.mark.slow
def test_full_test_split_meets_the_bar(full_split_report):
    """Issue 3's bar: 90 % overall, every skill 80 %, languages within 5 points (the shipped model:
    96.8 %, multiple choice the lowest at 82.1 %, languages 1.9 apart)."""
    report, _ = full_split_report
    assert report["overall"] >= 0.9 and min(report["skills"].values()) >= 0.8, format_table(report)
    assert abs(report["languages"]["en"] - report["languages"]["zh"]) <= 0.05


def test_eval_synth_evaluates_a_quantised_model(capsys, monkeypatch):
    """--quantize loads the model as `glm4v chat --quantize` does, and the answers come from it."""
    from glm4v.quant import QuantizedLinear

    loaded = []
    real_load = glm4v.load
    monkeypatch.setattr(glm4v, "load", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    assert eval_synth.run(args(model=str(TINY_DIR), json=True, num=12, quantize="int8")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 12 and 0.0 <= result["overall"] <= 1.0
    layers = [m for m in loaded[0].model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.format == "int8" for m in layers)
    with pytest.raises(glm4v.InputError):
        eval_synth.run(args(model=str(TINY_DIR), quantize="int4", group_size=100))
