"""The optional C++ decode kernels: same products as torch, used only where they apply."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import glm4v
from glm4v.kernels import bf16_linear, cpu_kernels
from tests.conftest import TINY_DIR

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="no AVX512-BF16 CPU or no compiler here")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(64, 4096), (67, 200), (4, 31), (300, 13696)])
def test_matches_torch_linear(rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(2, rows, k, generator=gen).to(torch.bfloat16)[:1]  # a non-trivial 3-D view
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        got = bf16_linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.shape == (1, rows, n) and got.dtype == torch.bfloat16
    # One bf16 rounding of the result (2^-8 relative) on top of fp32 accumulation.
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_declines_what_it_does_not_cover():
    w = torch.randn(8, 32).to(torch.bfloat16)
    assert bf16_linear(torch.randn(1, 32), w) is None  # fp32 activations
    assert bf16_linear(torch.randn(5, 32).to(torch.bfloat16), w) is None  # more rows than a decode step
    assert bf16_linear(torch.randn(1, 32).to(torch.bfloat16), w.t().contiguous().t()) is None  # strided weight
    trainable = torch.nn.Parameter(w.clone())
    with torch.enable_grad():
        assert bf16_linear(torch.randn(1, 32).to(torch.bfloat16), trainable) is None  # autograd needs F.linear


@needs_kernels
def test_bf16_decode_step_with_kernels_matches_torch_kernels(monkeypatch):
    """A bf16 decode step of the tiny model gives the same logits with and without the C++ kernels."""
    import glm4v.model.language as language

    pipe = glm4v.load(TINY_DIR, dtype="bfloat16")
    ids = torch.tensor([pipe.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea"}],
                                                           add_generation_prompt=True)])

    def decode_logits():
        cache = pipe.model.allocate_cache(1, 64)
        with torch.inference_mode():
            pipe.model(ids, kv_cache=cache, logits_to_keep=1)
            return pipe.model(torch.tensor([[42]]), kv_cache=cache, logits_to_keep=1).logits.float()

    used = []

    def counting(*args, **kwargs):
        out = language_kernel(*args, **kwargs)
        used.append(out is not None)
        return out

    language_kernel = language.bf16_linear
    monkeypatch.setattr(language, "bf16_linear", counting)
    with_kernels = decode_logits()
    assert sum(used) >= 4 * pipe.config.num_layers  # qkv, dense, h_to_4h, 4h_to_h of every layer
    monkeypatch.setattr(language, "bf16_linear", lambda *a, **k: None)
    without = decode_logits()
    scale = without.abs().max().item()
    assert (with_kernels - without).abs().max().item() < 0.02 * scale


def test_disabled_by_environment():
    out = subprocess.run([sys.executable, "-m", "glm4v.kernels"], env={**os.environ, "GLM4V_NO_KERNELS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "not used" in out.stdout
