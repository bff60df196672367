"""The GPU int8/int4 GEMVs (glm4v/kernels/cuda_gemv.py): on a CUDA GPU when there is one, and under
Triton's CPU interpreter where Triton is installed (CPU builds of torch come without it: skipped)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from glm4v.quant import QuantizedLinear, dequantize, dequantize_int4, quantize_int4, quantize_int8

SHAPES = [  # N, K, token rows, int4 group: one split and several, partial int8 row blocks
    (192, 384, 1, 128), (640, 512, 2, 64), (64, 256, 5, 32), (4096, 1024, 1, 128), (1000, 256, 8, 256),
]


def _check_shapes(device: str, dtype: torch.dtype) -> None:
    from glm4v.kernels.cuda_gemv import int4_gemv, int8_gemv, relative_error

    gen = torch.Generator().manual_seed(len(SHAPES))
    for N, K, M, group in SHAPES:
        w = torch.randn(N, K, generator=gen)
        x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
        codes, scale = (t.to(device) for t in quantize_int8(w, torch.bfloat16))
        got = int8_gemv(x, codes, scale)
        assert got.dtype == dtype and got.shape == (M, N)
        assert relative_error(got, x.float() @ (codes.float() * scale.float()[:, None]).t()) < 1e-2, (N, K, M)
        if N % 64 == 0:
            packed, sz = (t.to(device) for t in quantize_int4(w, group, torch.bfloat16))
            got = int4_gemv(x, packed, sz, group)
            assert got.dtype == dtype and got.shape == (M, N)
            want = x.float() @ dequantize_int4(packed, sz, group).float().t()
            assert relative_error(got, want) < 1e-2, (N, K, M, group)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemvs_match_the_dequantised_product_on_a_gpu(dtype):
    from glm4v.kernels import cuda_gemv

    assert cuda_gemv.ready(torch.device("cuda", torch.cuda.current_device()))
    _check_shapes("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_gpu_decode_step_takes_the_gemv_and_a_prefill_the_matmul(fmt, monkeypatch):
    from glm4v.kernels import cuda_gemv

    cpu = QuantizedLinear.from_weight(torch.randn(256, 512), torch.randn(256), fmt, 128, torch.bfloat16)
    gpu = copy.deepcopy(cpu).cuda()
    calls = []
    name = f"{fmt}_gemv"
    real = getattr(cuda_gemv, name)
    monkeypatch.setattr(cuda_gemv, name, lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, cuda_gemv.GPU_GEMV_MAX_TOKENS, cuda_gemv.GPU_GEMV_MAX_TOKENS + 1, 300):
        x = torch.randn(rows, 512, dtype=torch.bfloat16)
        want = x.float() @ dequantize(cpu).float().t() + cpu.bias.float()
        assert cuda_gemv.relative_error(gpu(x.cuda()), want) < 1e-2
    assert calls == [1, cuda_gemv.GPU_GEMV_MAX_TOKENS]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_gemvs_under_the_triton_interpreter():
    # The interpreter is chosen when the kernels are defined: a fresh process with the flag set.
    code = ("import torch, tests.test_cuda_gemv as t; from glm4v.kernels import cuda_gemv as c;"
            "assert c._self_check(torch.device('cpu')); t._check_shapes('cpu', torch.bfloat16); print('ok')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_without_triton_a_gpu_is_never_said_ready(monkeypatch):
    from glm4v.kernels import cuda_gemv

    monkeypatch.setattr(cuda_gemv, "triton", None)
    cuda_gemv.ready.cache_clear()
    try:
        assert not cuda_gemv.ready(torch.device("cuda", 0))
    finally:
        cuda_gemv.ready.cache_clear()
