"""GPU decode GEMVs at the official GLM-4-9B decoder widths: achieved GB/s of bf16 (cuBLAS), int8 and
int4 (glm4v/kernels/cuda_gemv.py) against the card's measured copy bandwidth, for the kernels'
block settings. One token row; CUDA events; the median of many launches, rotating over enough
layer copies that the weights never sit in L2. Run on a lent GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from glm4v.kernels import cuda_gemv
from glm4v.quant import quantize_int4, quantize_int8

LAYERS = {"qkv": (4608, 4096), "dense": (4096, 4096), "h_to_4h": (27392, 4096), "4h_to_h": (4096, 13696)}
L2_BYTES = 60 << 20


def timed(fn, repeats: int = 20) -> float:
    """Median seconds of one call, eager (launch costs included)."""
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def timed_graph(calls: list, replays: int = 15) -> float:
    """Median seconds of one call inside a CUDA graph of ``calls`` (no launch gaps): the kernels'
    own speed. Each call uses its own copy of the layer, so the weights come from memory, not L2."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return timed(graph.replay, replays) / len(calls)


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / timed(lambda: b.copy_(a), 20) / 1e9


def copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(2, -(-4 * L2_BYTES // nbytes)))]


def main() -> None:
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = []
    defaults = cuda_gemv.INT8_BLOCK_N, cuda_gemv.INT8_BLOCK_K, cuda_gemv.PROGRAMS_PER_SM
    x = torch.randn(1, 13696, device="cuda", dtype=torch.bfloat16)
    for name, (N, K) in LAYERS.items():
        w = torch.randn(N, K, device="cuda") * 0.02
        xk = x[:, :K].contiguous()
        bf16 = copies(lambda: w.to(torch.bfloat16), 2 * N * K)
        q8 = copies(lambda: quantize_int8(w, torch.bfloat16), N * K)
        q4 = copies(lambda: quantize_int4(w, 128, torch.bfloat16), N * K // 2)

        def calls(fn, pool):
            return [functools.partial(fn, *(p if isinstance(p, tuple) else (p,))) for p in pool * max(1, 64 // len(pool))]

        t = timed_graph(calls(lambda w_: F.linear(xk, w_), bf16))
        rows.append((name, "bf16 cuBLAS", "graph", 2 * N * K / t / 1e9))
        t = timed(lambda: F.linear(xk, bf16[0]))
        rows.append((name, "bf16 cuBLAS", "eager", 2 * N * K / t / 1e9))
        for block_n, block_k in ((8, 256), (16, 256), (16, 512), (32, 256), (32, 128)):
            cuda_gemv.INT8_BLOCK_N, cuda_gemv.INT8_BLOCK_K = block_n, block_k
            t = timed_graph(calls(lambda c, s: cuda_gemv.int8_gemv(xk, c, s), q8))
            rows.append((name, "int8", f"{block_n}x{block_k}", (N * K + 2 * N) / t / 1e9))
        for per_sm in (1, 2, 4, 8):
            cuda_gemv.PROGRAMS_PER_SM = per_sm
            t = timed_graph(calls(lambda p, sz: cuda_gemv.int4_gemv(xk, p, sz, 128), q4))
            rows.append((name, "int4", f"{per_sm}/SM", (N * K // 2 + N * K // 32) / t / 1e9))
        cuda_gemv.INT8_BLOCK_N, cuda_gemv.INT8_BLOCK_K, cuda_gemv.PROGRAMS_PER_SM = defaults
        t = timed(lambda: cuda_gemv.int4_gemv(xk, *q4[0], 128))
        rows.append((name, "int4", "eager", (N * K // 2 + N * K // 32) / t / 1e9))
        del bf16, q8, q4, w
        torch.cuda.empty_cache()
    print(f"copy bandwidth (read + write): {bw:.0f} GB/s")
    print(f"{'layer':10}{'kernel':14}{'setting':>10}{'GB/s':>8}{'% of copy':>11}")
    for name, kernel, setting, gbs in rows:
        print(f"{name:10}{kernel:14}{setting:>10}{gbs:8.0f}{gbs / bw:11.0%}")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"copy_gbs": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
