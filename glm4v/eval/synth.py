"""``glm4v eval synth``: accuracy on the synthetic test split, per skill and per language.

The test split is regenerated in memory from its seed (no files needed), or read from a JSONL
written by ``glm4v.train.synth``. Questions are answered greedily in left-padded batches sorted by
length; each image is encoded once. A multi-turn conversation is answered turn by turn with the
model's own earlier answers in the history, and counts as right only if every turn is right.

Scoring (``glm4v.train.synth.score_answer``): exact match after normalising case, whitespace and
trailing punctuation; a one-sentence description is right when it names exactly the objects in the
picture (its colour/shape pairs).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
import torch

from glm4v.engine import add_quantize_arguments
from glm4v.errors import InputError
from glm4v.generate import GenerationConfig, generate_steps
from glm4v.image import ImageProcessor, load_image
from glm4v.train.synth import DEFAULT_SEED, DEFAULT_SIZES, LANGS, SKILLS, generate_test_split, score_answer

# Answer length caps (tokens), above the longest reference of each skill in the test split
# (description 93, spatial 72, choice 145): Chinese characters take ~3 tokens each in a small vocabulary.
MAX_NEW_TOKENS = {"description": 128, "spatial": 96, "choice": 176}
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class Item:
    id: str
    skill: str
    lang: str
    image: object  # path or PIL image
    questions: list[str]
    references: list[str]


def items_from_examples(examples) -> list[Item]:
    return [Item(ex.id, ex.skill, ex.lang, ex.image, [m["content"] for m in ex.messages if m["role"] == "user"],
                 [m["content"] for m in ex.messages if m["role"] == "assistant"]) for ex in examples]


def items_from_records(records) -> list[Item]:
    """Records of glm4v.train.data.read_jsonl; conversations must alternate user/assistant."""
    items = []
    for r in records:
        roles = [m["role"] for m in r.messages]
        if roles != ["user", "assistant"] * (len(roles) // 2) or not roles:
            raise InputError(f"line {r.line}: evaluation needs alternating user/assistant turns, got {roles}")
        items.append(Item(str(r.meta.get("id", r.line)), str(r.meta.get("skill", "all")), str(r.meta.get("lang", "all")),
                          r.image, [m.get("content", "") for m in r.messages[0::2]],
                          [m.get("content", "") for m in r.messages[1::2]]))
    return items


def _conversation(item: Item, answers: list[str], turn: int) -> list[dict]:
    conv = []
    for k in range(turn + 1):
        user = {"role": "user", "content": item.questions[k]}
        if k == 0 and item.image is not None:
            user["image"] = "image"  # only its presence matters to the template
        conv.append(user)
        if k < turn:
            conv.append({"role": "assistant", "content": answers[k]})
    return conv


def answer_items(model, tokenizer, items: list[Item], batch_size: int = 64,
                 max_new_tokens: int | None = None) -> list[list[str]]:
    """The model's answer to every turn of every item (greedy, batched, in the model's dtype)."""
    processor = ImageProcessor(tokenizer.image_size)
    features: list[torch.Tensor | None] = [None] * len(items)
    with torch.inference_mode():
        imaged = [i for i, it in enumerate(items) if it.image is not None]
        for start in range(0, len(imaged), batch_size):
            chunk = imaged[start:start + batch_size]
            pixels = torch.cat([processor(load_image(items[i].image)) for i in chunk])
            encoded = model.encode_images(pixels)
            for row, i in enumerate(chunk):
                features[i] = encoded[row]

    answers: list[list[str]] = [[] for _ in items]
    for turn in range(max(len(it.questions) for it in items)):
        active = [i for i, it in enumerate(items) if len(it.questions) > turn]
        prompts = {i: tokenizer.encode_chat(_conversation(items[i], answers[i], turn))[0] for i in active}
        # batches share a cap and whether they hold images; similar lengths keep padding small
        groups: dict[tuple, list[int]] = {}
        for i in active:
            cap = max_new_tokens or MAX_NEW_TOKENS.get(items[i].skill, DEFAULT_MAX_NEW_TOKENS)
            groups.setdefault((cap, features[i] is not None), []).append(i)
        for (cap, has_image), members in groups.items():
            members.sort(key=lambda i: len(prompts[i]))
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                texts = _generate(model, tokenizer, [prompts[i] for i in chunk],
                                  [features[i] for i in chunk] if has_image else None, cap)
                for i, text in zip(chunk, texts):
                    answers[i].append(text)
    return answers


def _generate(model, tokenizer, prompts: list[list[int]], features, cap: int) -> list[str]:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    image_features = torch.stack(features).to(model.dtype) if features is not None else None
    config = GenerationConfig(max_new_tokens=cap, do_sample=False)
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(model.config.eos_token_ids)
    with torch.inference_mode():
        for step in generate_steps(model, ids, attention_mask=mask, config=config, image_features=image_features,
                                   vocab_limit=len(tokenizer)):
            for row, token in enumerate(step.tokens):
                if len(out[row]) and out[row][-1] in stops:
                    continue
                out[row].append(token)
    return [tokenizer.decode([t for t in row if t < tokenizer.vocab_size]).strip() for row in out]


def score_items(items: list[Item], answers: list[list[str]]) -> dict:
    """Accuracy overall, per skill, per language and per (skill, language)."""
    per = []
    for it, ans in zip(items, answers):
        ok = len(ans) == len(it.references) and all(
            score_answer(it.skill, a, r) for a, r in zip(ans, it.references))
        per.append(ok)

    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    skills = [s for s in SKILLS if any(it.skill == s for it in items)] + sorted(
        {it.skill for it in items} - set(SKILLS))
    langs = [lang for lang in LANGS if any(it.lang == lang for it in items)] + sorted(
        {it.lang for it in items} - set(LANGS))
    return {
        "overall": mean(per),
        "skills": {s: mean([ok for ok, it in zip(per, items) if it.skill == s]) for s in skills},
        "languages": {lang: mean([ok for ok, it in zip(per, items) if it.lang == lang]) for lang in langs},
        "n": len(items),
        "table": {s: {lang: mean([ok for ok, it in zip(per, items) if it.skill == s and it.lang == lang])
                      for lang in langs} for s in skills},
        "counts": {s: {lang: sum(1 for it in items if it.skill == s and it.lang == lang) for lang in langs}
                   for s in skills},
        "correct": per,
    }


def evaluate_records(model, tokenizer, records, batch_size: int = 64) -> dict:
    items = items_from_records(records)
    return score_items(items, answer_items(model, tokenizer, items, batch_size))


def format_table(report: dict) -> str:
    langs = list(report["languages"])
    head = f"{'skill':<12}" + "".join(f"{lang:>8}" for lang in langs) + f"{'all':>8}{'n':>6}"
    lines = [head, "-" * len(head)]
    for skill, acc in report["skills"].items():
        cells = "".join(f"{_pct(report['table'][skill][lang]):>8}" for lang in langs)
        n = sum(report["counts"][skill].values())
        lines.append(f"{skill:<12}{cells}{_pct(acc):>8}{n:>6}")
    lines.append("-" * len(head))
    cells = "".join(f"{_pct(report['languages'][lang]):>8}" for lang in langs)
    lines.append(f"{'overall':<12}{cells}{_pct(report['overall']):>8}{report['n']:>6}")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


# ------------------------------------------------------------------------------------------------
# command line

def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--lora", default=None, help="LoRA adapter folder to apply to the model")
    parser.add_argument("--data", default=None,
                        help="test JSONL (default: regenerate the synthetic test split in memory)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the synthetic data set")
    parser.add_argument("-n", "--num", type=int, default=DEFAULT_SIZES["test"], help="questions to generate")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N conversations")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (weights and activations)")
    add_quantize_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--show-errors", type=int, default=0, metavar="N", help="print N wrong answers")


def run(args) -> int:
    import glm4v

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    kwargs = {"lora": args.lora} if args.lora else {}
    pipe = glm4v.load(args.model, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size, **kwargs)
    if args.data:
        from glm4v.train.data import read_jsonl

        items = items_from_records(read_jsonl(args.data))
    else:
        if args.num < 1:
            raise InputError(f"-n must be >= 1, got {args.num}")
        items = items_from_examples(generate_test_split(args.seed, args.num))
    if args.limit is not None:
        items = items[: max(0, args.limit)]
    if not items:
        raise InputError("nothing to evaluate")
    answers = answer_items(pipe.model, pipe.tokenizer, items, args.batch_size)
    report = score_items(items, answers)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({k: report[k] for k in ("overall", "skills", "languages", "n")}))
    else:
        print(format_table(report))
        print(f"\n{report['n']} conversations in {seconds:.1f} s ({pipe.path})")
    if args.show_errors:
        shown = 0
        for it, ans, ok in zip(items, answers, report["correct"]):
            if not ok and shown < args.show_errors:
                print(json.dumps({"id": it.id, "skill": it.skill, "q": it.questions, "ref": it.references, "got": ans},
                                 ensure_ascii=False), file=sys.stderr)
                shown += 1
    return 0


def main(argv=None) -> int:  # pragma: no cover - convenience until glm4v eval dispatches here
    import argparse

    parser = argparse.ArgumentParser(prog="glm4v eval synth")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
