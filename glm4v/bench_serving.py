"""``glm4v bench serving``: what continuous batching and prefix reuse buy, measured on this machine.

    python -m glm4v.bench_serving [--model PATH] [--concurrency 8] [--tokens 64] [--json]

1. Aggregate decode throughput with N concurrent requests vs one request (goal: >= 3x at N = 8).
   "Decode throughput" is tokens produced by decode steps per second spent in decode steps (the
   engine's own counters), so prefills interleaved while the batch fills up are not counted; the
   end-to-end rate (all tokens / wall time, prefills included) is reported next to it.
2. Time to first token of turn 2 of an image conversation with the prefix cache vs turn 1 (goal:
   <= 20%). Turn 1 starts cold (a new picture: vision encoding + full prefill); turn 2 resends the
   history plus a new question. Turn 2 without the prefix cache (image features still cached) is
   shown too, to separate the two caches' shares.

The engine is driven in-process (no HTTP), so the numbers are the scheduler's, not the network's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from glm4v.generate import GenerationConfig
from glm4v.image import image_digest
from glm4v.scheduler import Scheduler


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent requests for the throughput run")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request in the throughput run")
    parser.add_argument("--repeats", type=int, default=3, help="image conversations for the time-to-first-token run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _random_picture(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _submit(scheduler, pipe, conversation, max_new_tokens, **kwargs):
    ids, image = pipe.tokenizer.encode_chat(conversation)
    return scheduler.submit(ids, GenerationConfig(max_new_tokens=max_new_tokens), image=image,
                            image_key=image_digest(image) if image is not None else None, **kwargs)


def _decode_run(scheduler, pipe, n: int, tokens: int) -> dict:
    before = scheduler.snapshot()
    started = time.perf_counter()
    requests = [_submit(scheduler, pipe, [{"role": "user", "content": f"Request {i}: write a long story."}], tokens,
                        ignore_eos=True) for i in range(n)]
    for request in requests:
        request.text(timeout=3600)
    wall = time.perf_counter() - started
    after = scheduler.snapshot()
    decode_tokens = after["decode_tokens"] - before["decode_tokens"]
    decode_seconds = after["decode_seconds"] - before["decode_seconds"]
    return {"requests": n, "tokens_per_request": tokens, "decode_tokens": decode_tokens,
            "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else float("nan"),
            "end_to_end_tokens_per_s": sum(r.completion_tokens for r in requests) / wall,
            "steps": after["decode_steps"] - before["decode_steps"], "wall_s": wall}


def measure_throughput(pipe, concurrency: int, tokens: int) -> dict:
    with Scheduler(pipe, max_batch=concurrency, prefix_cache_bytes=0) as scheduler:
        _decode_run(scheduler, pipe, 1, 4)  # warm-up: first calls allocate and pick kernels
        solo = _decode_run(scheduler, pipe, 1, tokens)
        batch = _decode_run(scheduler, pipe, concurrency, tokens)
    return {"solo": solo, "batch": batch, "speedup": batch["decode_tokens_per_s"] / solo["decode_tokens_per_s"],
            "end_to_end_speedup": batch["end_to_end_tokens_per_s"] / solo["end_to_end_tokens_per_s"]}


def _ttft(request) -> tuple[float, str]:
    text = request.text(timeout=3600)
    return request.first_token_at - request.submitted_at, text


def measure_ttft(pipe, repeats: int) -> dict:
    size = pipe.tokenizer.image_size
    rows = []
    with Scheduler(pipe, max_batch=1) as cached, Scheduler(pipe, max_batch=1, prefix_cache_bytes=0) as uncached:
        _ttft(_submit(cached, pipe, [{"role": "user", "content": "warm up", "image": _random_picture(size, 10**6)}], 1))
        for i in range(repeats):
            picture = _random_picture(size, i)  # never seen: turn 1 encodes it
            turn1 = [{"role": "user", "image": picture, "content": "What is in this picture? Describe it in detail."}]
            first = _submit(cached, pipe, turn1, 32)
            t1, answer = _ttft(first)
            # the client resends the answer it was given, as chat clients do
            turn2 = turn1 + [{"role": "assistant", "content": answer},
                             {"role": "user", "content": "What colour is the top left corner?"}]
            second = _submit(cached, pipe, turn2, 1)
            t2, _ = _ttft(second)
            t2_plain, _ = _ttft(_submit(uncached, pipe, turn2, 1))
            rows.append({"turn1_s": t1, "turn2_s": t2, "turn2_without_prefix_cache_s": t2_plain,
                         "turn1_prompt_tokens": first.prompt_tokens, "turn2_prompt_tokens": second.prompt_tokens,
                         "turn2_prefilled_tokens": second.prefilled_tokens})
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"runs": rows, "median": median, "ratio": median["turn2_s"] / median["turn1_s"]}


def run(args) -> int:
    from glm4v.engine import load

    pipe = load(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty())
    where = f"{pipe.path} ({str(pipe.dtype).removeprefix('torch.')}, {pipe.device}, {torch.get_num_threads()} threads)"
    throughput = measure_throughput(pipe, args.concurrency, args.tokens)
    ttft = measure_ttft(pipe, args.repeats)
    if args.json:
        print(json.dumps({"model": str(pipe.path), "dtype": str(pipe.dtype), "device": str(pipe.device),
                          "threads": torch.get_num_threads(), "throughput": throughput, "ttft": ttft}, indent=2))
        return 0
    solo, batch, m = throughput["solo"], throughput["batch"], ttft["median"]
    print(f"model: {where}")
    print(f"decode throughput, {args.tokens} tokens per request:")
    print(f"  1 request              {solo['decode_tokens_per_s']:9.1f} tok/s  (end to end {solo['end_to_end_tokens_per_s']:.1f})")
    print(f"  {args.concurrency} concurrent requests  {batch['decode_tokens_per_s']:9.1f} tok/s  "
          f"(end to end {batch['end_to_end_tokens_per_s']:.1f})")
    print(f"  speed-up               {throughput['speedup']:9.2f}x  (goal >= 3x at 8; end to end "
          f"{throughput['end_to_end_speedup']:.2f}x)")
    print(f"time to first token, image conversation (median of {args.repeats}):")
    print(f"  turn 1 (cold image, {m['turn1_prompt_tokens']:.0f} prompt tokens)      {m['turn1_s'] * 1000:9.1f} ms")
    print(f"  turn 2 with prefix cache ({m['turn2_prefilled_tokens']:.0f} of {m['turn2_prompt_tokens']:.0f} tokens prefilled) "
          f"{m['turn2_s'] * 1000:9.1f} ms  = {ttft['ratio'] * 100:.1f}% of turn 1 (goal <= 20%)")
    print(f"  turn 2 without prefix cache          {m['turn2_without_prefix_cache_s'] * 1000:9.1f} ms")
    return 0


if __name__ == "__main__":
    import argparse

    from glm4v.errors import Glm4vError

    parser = argparse.ArgumentParser(prog="python -m glm4v.bench_serving", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        sys.exit(run(parser.parse_args()))
    except Glm4vError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
