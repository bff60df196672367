"""The optional C++ decode kernels: same products as torch, used only where they apply."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import glm4v
from glm4v.kernels import bf16_linear, build, cpu_kernels, runnable_kernel_sets
from glm4v.quant import QuantizedLinear, dequantize
from tests.conftest import TINY_DIR

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="no AVX512-BF16 or AVX2 CPU, or no compiler here")
# Every build this CPU can run is checked, not only the one it uses: an AVX-512 machine checks the
# AVX2 build too (one more ~40 s compile, cached), so a change to the shared header is caught on either.
every_build = pytest.mark.parametrize("kernel_set", runnable_kernel_sets() or ["none"])


def kernels_of(kernel_set: str):
    if cpu_kernels() is None or kernel_set == "none":
        pytest.skip("no AVX512-BF16 or AVX2 CPU, or no compiler here")
    return build(kernel_set)


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


@every_build
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("n,k", [(67, 200), (300, 4096 + 17)])
def test_bf16_gemv_of_every_build_matches_torch(kernel_set, rows, n, k):
    gen = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    got = kernels_of(kernel_set).bf16_gemv(x, w)
    want = x.float() @ w.float().t()
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@every_build
def test_stream_read_reads_every_byte(kernel_set):
    """The bench's memory probe: 64-bit words of each whole MB summed, then the tail's bytes."""
    import numpy as np

    data = torch.randint(0, 256, ((2 << 20) + 13,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    words = data[: 2 << 20].numpy().view(np.uint64)
    want = (int(words.sum(dtype=np.uint64)) + int(data[2 << 20 :].sum())) % (1 << 64)
    assert kernels_of(kernel_set).stream_read(data) % (1 << 64) == want


def test_the_build_this_cpu_uses_comes_first():
    from glm4v.kernels import kernel_set

    runnable = runnable_kernel_sets()
    assert (runnable[0] if runnable else None) == kernel_set()
    if kernel_set() == "avx512bf16":
        assert runnable == ["avx512bf16", "avx2"]


def _quantised(fmt: str, n: int, k: int, group: int, seed: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)  # rows of different scales
    return QuantizedLinear.from_weight(w.to(dtype), None, fmt, group, dtype), gen


@every_build
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(64, 4096), (67, 200), (5, 29), (300, 13696), (9, 4096 + 45)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_gemv_matches_the_dequantised_product(kernel_set, rows, n, k, dtype):
    layer, gen = _quantised("int8", n, k, 128, rows * 100 + n, dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    got = kernels_of(kernel_set).int8_gemv(x, layer.weight, layer.weight_scale)
    want = x.float() @ dequantize(layer).float().t()
    assert got.shape == (rows, n) and got.dtype == dtype
    # activations rounded to 16-bit integers per row (<= 1/65534 of the row's largest value) and,
    # for bf16, one rounding of the result
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@every_build
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
# 64-row blocks go through the AVX-512 loop several at a time (4 for one token row, 2 for two):
# 192 and 576 rows leave blocks over, 576 splits into runs on both threads
@pytest.mark.parametrize(
    "n,k,group", [(64, 4096, 128), (192, 256, 32), (128, 13696 - 13696 % 64, 64), (64, 512, 256), (576, 512, 16)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_gemv_matches_the_dequantised_product(kernel_set, rows, n, k, group, dtype):
    layer, gen = _quantised("int4", n, k, group, rows * 100 + n + group, dtype)
    assert layer.bits == 4
    x = torch.randn(rows, k, generator=gen).to(dtype)
    x[0, 3] = 20.0  # an outlier: activations are rounded per group, so it costs only its own group
    got = kernels_of(kernel_set).int4_gemv(x, layer.weight, layer.weight_scales_zeros, group)
    assert got.shape == (rows, n) and got.dtype == dtype
    # The kernel rounds the activations to int8, one scale (max |x| / 127) per row and group, and
    # is exact from there on (integer products, fp32 folding): compare with that product in fp32.
    xg = x.float().view(rows, k // group, group)
    step = xg.abs().amax(-1, keepdim=True) / 127
    rounded = ((xg / step).round().clamp(-127, 127) * step).view(rows, k)
    want = rounded @ dequantize(layer).float().t()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    # and the rounding itself stays small next to the product
    exact = x.float() @ dequantize(layer).float().t()
    err = (got.float() - exact).abs().max().item()
    assert 0 < err < 0.05 * exact.abs().max().item(), err


@every_build
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bf16_results_are_the_float32_results_rounded_as_torch_rounds(kernel_set, fmt):
    # bf16 activations are widened exactly, so a bf16 call computes the float32 call's products and
    # only rounds them: that rounding must be torch's (ties to even, NaN, huge and subnormal values)
    layer, gen = _quantised(fmt, 4096 + 64, 256, 64, 7, torch.bfloat16)
    x = (torch.randn(3, 256, generator=gen) * torch.logspace(-30, 30, 256)).to(torch.bfloat16)
    x[1, 5], x[2, 9] = float("inf"), float("nan")  # whole rows of inf/NaN products
    x[0, :] = x[0, :] * 1e-6  # tiny products, some subnormal after the scale
    module = kernels_of(kernel_set)
    if fmt == "int8":
        run = lambda v: module.int8_gemv(v, layer.weight, layer.weight_scale)  # noqa: E731
    else:
        run = lambda v: module.int4_gemv(v, layer.weight, layer.weight_scales_zeros, 64)  # noqa: E731
    got, full = run(x), run(x.float())
    assert got.dtype == torch.bfloat16 and full.dtype == torch.float32
    want = full.to(torch.bfloat16)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantised_layers_use_the_gemv_for_decode_steps(fmt, monkeypatch):
    layer, gen = _quantised(fmt, 128, 256, 64, 7)
    module = cpu_kernels()
    calls = []
    name = f"{fmt}_gemv"
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    with torch.inference_mode():
        x = torch.randn(1, 6, 256, generator=gen).to(torch.bfloat16)  # six token rows: two calls
        got = layer(x)
        assert calls == [4, 2]
        want = F.linear(x.float(), dequantize(layer).float())
        assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        calls.clear()
        # a prefill: expand and matmul (the AVX2 build's GEMV keeps up to 128 rows, quant.py)
        layer(torch.randn(200, 256, generator=gen).to(torch.bfloat16))
        assert calls == []


@needs_kernels
@pytest.mark.parametrize("rows", [5, 8, 23, 48])
def test_avx2_build_takes_short_bf16_prefills_in_passes(rows, monkeypatch):
    """With the AVX2 build (bf16 emulated) a few-token step of a bf16 layer runs the GEMV 4 rows a
    pass, faster there than widening the weight to float32; other builds leave it to the matmul."""
    import glm4v.kernels as k

    module = cpu_kernels()
    calls = []
    real = module.bf16_gemv
    monkeypatch.setattr(module, "bf16_gemv", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 200, generator=gen).to(torch.bfloat16)
    w = torch.randn(67, 200, generator=gen).to(torch.bfloat16)
    b = torch.randn(67, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        got = k.linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.shape == (1, rows, 67) and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    if module.kernel_set == "avx2":
        assert calls == [4] * (rows // 4) + ([rows % 4] if rows % 4 else [])
    else:
        assert calls == []


def test_declines_what_it_does_not_cover():
    w = torch.randn(8, 32).to(torch.bfloat16)
    assert bf16_linear(torch.randn(1, 32), w) is None  # fp32 activations
    many = glm4v.kernels.gemv_max_tokens("bf16") + 1
    assert bf16_linear(torch.randn(many, 32).to(torch.bfloat16), w) is None  # a prefill's rows
    assert bf16_linear(torch.randn(1, 32).to(torch.bfloat16), w.t().contiguous().t()) is None  # strided weight
    trainable = torch.nn.Parameter(w.clone())
    with torch.enable_grad():
        assert bf16_linear(torch.randn(1, 32).to(torch.bfloat16), trainable) is None  # autograd needs F.linear
        # nor when only the activations carry a gradient (a frozen layer under LoRA)
        assert bf16_linear(torch.randn(1, 32).to(torch.bfloat16).requires_grad_(), w) is None


@needs_kernels
def test_bf16_decode_step_with_kernels_matches_torch_kernels(monkeypatch):
    """A bf16 decode step of the tiny model gives the same logits with and without the C++ kernels."""
    import glm4v.kernels as kernels

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

    language_kernel = kernels.bf16_linear
    monkeypatch.setattr(kernels, "bf16_linear", counting)  # kernels.linear, the model's linear, calls it
    with_kernels = decode_logits()
    assert sum(used) >= 4 * pipe.config.num_layers  # qkv, dense, h_to_4h, 4h_to_h of every layer
    monkeypatch.setattr(kernels, "bf16_linear", lambda *a, **k: None)
    without = decode_logits()
    scale = without.abs().max().item()
    assert (with_kernels - without).abs().max().item() < 0.02 * scale


def _reference_rms_norm(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (weight * (x * torch.rsqrt(variance + eps))).to(x.dtype)


@every_build
@pytest.mark.parametrize("shape", [(1, 4096), (4, 200), (2, 1, 64)])
def test_rms_norm_of_every_build_matches_the_model_norm(kernel_set, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=gen) * 3).to(torch.bfloat16)
    x.view(-1)[5] = 80.0  # one outlier dominates the mean square
    weight = (torch.randn(shape[-1], generator=gen) * 0.2 + 1).to(torch.bfloat16)
    got = kernels_of(kernel_set).rms_norm(x, weight, 1.5625e-07)
    want = _reference_rms_norm(x, weight, 1.5625e-07)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    # the same fp32 steps; only the summation order of the mean square differs, so at most a
    # rare element lands on the neighbouring bf16 value
    assert (got != want).float().mean().item() <= 0.01
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0)


@needs_kernels
def test_model_norm_uses_the_kernel_for_decode_rows_only(monkeypatch):
    import glm4v.model.language as language
    from glm4v.kernels import decode_rms_norm

    calls = []
    monkeypatch.setattr(language, "decode_rms_norm", lambda *a: calls.append(a[0].shape) or decode_rms_norm(*a))
    norm = language.RMSNorm(64, 1e-5).to(torch.bfloat16)
    norm.weight.requires_grad_(False)
    with torch.inference_mode():
        decode = norm(torch.randn(1, 1, 64).to(torch.bfloat16))
        prefill = norm(torch.randn(1, 9, 64).to(torch.bfloat16))
    assert len(calls) == 2  # both ask; only the decode step's rows are taken
    assert decode_rms_norm(torch.randn(1, 9, 64).to(torch.bfloat16), norm.weight, 1e-5) is None
    assert decode_rms_norm(torch.randn(1, 1, 64), norm.weight.float(), 1e-5) is None  # fp32 stays on torch
    trainable = torch.nn.Parameter(norm.weight.detach().clone())
    with torch.enable_grad():
        assert decode_rms_norm(torch.randn(1, 1, 64).to(torch.bfloat16), trainable, 1e-5) is None
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.allclose(norm(x).float(), _reference_rms_norm(x, norm.weight, 1e-5).float(), rtol=2 ** -7, atol=0)
    assert decode.shape == (1, 1, 64) and prefill.shape == (1, 9, 64)


@every_build
@pytest.mark.parametrize("batch,tokens", [(1, 1), (2, 3)])
def test_rope_of_every_build_is_bitwise_the_model_rope(kernel_set, batch, tokens, monkeypatch):
    import glm4v.model.language as language

    gen = torch.Generator().manual_seed(tokens)
    heads, head_dim, half = 34, 128, 32
    qkv = (torch.randn(batch, tokens, heads, head_dim, generator=gen) * 4).to(torch.bfloat16)
    x = qkv.transpose(1, 2)  # the strided view the attention layer passes
    angles = torch.rand(batch, tokens, half, generator=gen) * 50
    rope = torch.stack([angles.cos(), angles.sin()], dim=-1).to(torch.bfloat16)
    got = kernels_of(kernel_set).rope(x, rope)
    monkeypatch.setattr(language, "decode_rope", lambda *a: None)
    want = language.apply_rope(x, rope)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)


@every_build
@pytest.mark.parametrize("batch,tokens,slot", [(1, 1, 7), (2, 3, 0)])
def test_rope_into_cache_is_bitwise_the_model_steps(kernel_set, batch, tokens, slot, monkeypatch):
    """q rotated, k rotated into the cache, v copied into it: as apply_rope and the slice writes do."""
    import glm4v.model.language as language

    gen = torch.Generator().manual_seed(tokens)
    heads, groups, head_dim, half, slots = 8, 2, 128, 32, 12
    qkv = (torch.randn(batch, tokens, (heads + 2 * groups) * head_dim, generator=gen) * 4).to(torch.bfloat16)
    angles = torch.rand(batch, tokens, half, generator=gen) * 50
    rope = torch.stack([angles.cos(), angles.sin()], dim=-1).to(torch.bfloat16)
    caches = torch.randn(2, 3, batch, groups, slots, head_dim, generator=gen).to(torch.bfloat16)  # [k | v], 3 layers
    got_k, got_v = caches[0].clone(), caches[1].clone()
    q = kernels_of(kernel_set).rope_into_cache(qkv, rope, got_k[1], got_v[1], slot, heads, groups)

    monkeypatch.setattr(language, "decode_rope", lambda *a: None)
    want_k, want_v = caches[0].clone(), caches[1].clone()
    qk, v = qkv.split([(heads + groups) * head_dim, groups * head_dim], dim=-1)
    qk = language.apply_rope(qk.view(batch, tokens, heads + groups, head_dim).transpose(1, 2), rope)
    want_k[1][:, :, slot : slot + tokens] = qk[:, heads:]
    want_v[1][:, :, slot : slot + tokens] = v.view(batch, tokens, groups, head_dim).transpose(1, 2)
    assert q.shape == (batch, heads, tokens, head_dim) and q.is_contiguous()
    assert torch.equal(q, qk[:, :heads])
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)  # and nothing outside the slots
    with pytest.raises(RuntimeError, match="slots past the cache"):
        kernels_of(kernel_set).rope_into_cache(qkv, rope, got_k[1], got_v[1], slots - tokens + 1, heads, groups)


@every_build
@pytest.mark.parametrize("rows,features", [(1, 13696), (4, 40), (2, 7)])
def test_swiglu_matches_the_model_activation(kernel_set, rows, features):
    from glm4v.kernels import decode_swiglu

    gen = torch.Generator().manual_seed(features)
    h = (torch.randn(1, rows, 2 * features, generator=gen) * 4).to(torch.bfloat16)
    h.view(-1)[:4] = torch.tensor([100.0, -100.0, 0.0, -20.0])  # exp over- and underflow, silu(0) = 0
    got = kernels_of(kernel_set).swiglu(h)
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    # torch's e^x and ours differ by an ulp or two of fp32, so a rare element rounds the other way
    assert (got != want).float().mean().item() <= 0.01
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-30)
    assert decode_swiglu(torch.randn(1, 5, 8).to(torch.bfloat16)) is None  # more rows than a decode step
    if kernel_set == cpu_kernels().kernel_set:
        assert torch.equal(decode_swiglu(h), got)  # the model's entry takes this CPU's build


def test_disabled_by_environment():
    out = subprocess.run([sys.executable, "-m", "glm4v.kernels"], env={**os.environ, "GLM4V_NO_KERNELS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "not used" in out.stdout


# -- float32 for prefill-sized bf16 products on CPUs that emulate bf16 --------------------------------

@pytest.fixture
def emulated_bf16(monkeypatch):
    import glm4v.kernels as kernels

    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: False)
    return kernels


def test_prefill_sized_bf16_products_run_in_float32_where_bf16_is_emulated(emulated_bf16, monkeypatch):
    from glm4v.model.language import Linear

    k = emulated_bf16
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=gen).to(torch.bfloat16)
    b = torch.randn(40, generator=gen).to(torch.bfloat16)
    # more rows than the AVX2 bf16 GEMV takes in passes, over a batch of 2
    x = torch.randn(2, k.GEMV_MAX_TOKENS["avx2"]["bf16"] // 2 + 1, 96, generator=gen).to(torch.bfloat16)
    want = F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(k.upcast_linear(x, w, b), want)
        layer = Linear(96, 40).to(torch.bfloat16)
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        assert torch.equal(layer(x), want)
        # a weight wider than one slice goes through the reused buffer in pieces, same result
        monkeypatch.setattr(k, "UPCAST_CHUNK_ELEMENTS", 96 * 16)  # slices of 16, 16 and 8 rows
        monkeypatch.setattr(k, "UPCAST_MIN_SLICE_ROWS", 1)
        assert torch.equal(k.upcast_linear(x, w, b), want)
        assert torch.equal(k.upcast_linear(x, w), F.linear(x.float(), w.float()).to(torch.bfloat16))
        # decode-sized products and other dtypes keep their own kernels
        assert k.upcast_linear(x[:1, :1], w, b) is None
        assert k.upcast_linear(x.float(), w.float()) is None
    # under autograd a float32 copy of the weight would stay alive for backward
    w.requires_grad_(True)
    assert k.upcast_linear(x, w) is None
    monkeypatch.setattr(k, "cpu_has_native_bf16", lambda: True)
    with torch.inference_mode():
        assert k.upcast_linear(x, w.detach()) is None


def test_prefill_attention_runs_in_float32_and_decode_attention_does_not(emulated_bf16, monkeypatch):
    from glm4v.model.language import grouped_attention

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 12, 16, generator=gen).to(torch.bfloat16)
    kv = torch.randn(2, 1, 2, 12, 16, generator=gen).to(torch.bfloat16)
    want = F.scaled_dot_product_attention(q.float(), kv[0].float(), kv[1].float(), is_causal=True, enable_gqa=True)
    with torch.inference_mode():
        got = grouped_attention(q, kv[0], kv[1], None, causal=True)
        assert torch.equal(got, want.to(torch.bfloat16))
        calls = []
        monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **kw: calls.append(self.shape) or self.to(torch.float32))
        grouped_attention(q[:, :, :1], kv[0], kv[1], None, causal=False)  # decode: 1 query token, 2x2 folded rows
        assert calls == []


def test_bf16_model_on_a_cpu_that_emulates_bf16_is_closer_to_float32(emulated_bf16, monkeypatch):
    """The tiny model in bf16, prefill with an image: float32 products keep it at least as close to fp32."""
    from safetensors.torch import load_file

    from tests.conftest import CASES_DIR

    case = load_file(str(CASES_DIR / "02_image_single" / "tensors.safetensors"))
    ids, pixels = case["input_ids"], case["pixel_values"]
    fp32 = glm4v.load(TINY_DIR, dtype="float32").model
    bf16 = glm4v.load(TINY_DIR, dtype="bfloat16").model
    with torch.inference_mode():
        ref = fp32(ids, pixel_values=pixels).logits
        up = bf16(ids, pixel_values=pixels).logits.float()
        monkeypatch.setattr(emulated_bf16, "cpu_has_native_bf16", lambda: True)
        plain = bf16(ids, pixel_values=pixels).logits.float()
    assert torch.allclose(case["logits"], ref, atol=1e-4, rtol=1e-4)
    err_up, err_plain = (up - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert not torch.equal(up, plain)  # the two paths really differ
    assert err_up <= err_plain * 1.05 + 1e-3, (err_up, err_plain)


def _amx_kernels():
    module = cpu_kernels()
    return module if module is not None and hasattr(module, "amx_available") and module.amx_available() else None


needs_amx = pytest.mark.skipif(_amx_kernels() is None, reason="no AVX-512 build with AMX here")


def _attention_kernels() -> list[str]:
    """Every decode attention that runs here: each build's ``decode_attention`` (the AVX-512 one
    with AMX where the CPU has it) and, on an AVX-512 CPU, that build's FMA path on its own, the one
    a CPU without AMX (Zen 4) runs."""
    if cpu_kernels() is None:
        return []
    sets = runnable_kernel_sets()
    return sets + [f"{s}-fma" for s in sets if s == "avx512bf16"]


every_attention_kernel = pytest.mark.parametrize("kernel", _attention_kernels() or ["none"])


def attention_of(kernel: str):
    if kernel.endswith("-fma"):
        return kernels_of(kernel.removesuffix("-fma")).decode_attention_fma
    return kernels_of(kernel).decode_attention


def _cache_views(batch, groups, keys, dim, gen, spare=5):
    """Keys and values as the model passes them: the first ``keys`` slots of a larger cache."""
    cache = torch.randn(2, batch, groups, keys + spare, dim, generator=gen).to(torch.bfloat16)
    return cache[0, :, :, :keys], cache[1, :, :, :keys]


def _queries(batch, heads, groups, tokens, dim, gen, scale=1.0):
    """Query heads as the model passes them: a transposed view of the rotated [q | k] heads."""
    qk = (torch.randn(batch, tokens, heads + groups, dim, generator=gen) * scale).to(torch.bfloat16)
    return qk.transpose(1, 2)[:, :heads]


def _attention_fp32(q, k, v):
    B, H, L, D = q.shape
    rep = H // k.shape[1]
    out = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1))
    return out.transpose(1, 2).reshape(B, L, H * D)


@every_attention_kernel
@pytest.mark.parametrize(
    "batch,heads,groups,tokens,keys,dim",
    [(1, 32, 2, 1, 1669, 128), (1, 32, 2, 1, 1, 128), (1, 32, 2, 1, 2, 128), (1, 32, 2, 3, 77, 128),
     (2, 4, 2, 4, 9, 32), (1, 40, 2, 2, 17, 128), (3, 8, 1, 4, 129, 64), (1, 6, 3, 1, 300, 96)],
)
def test_decode_attention_is_as_exact_as_sdpa(kernel, batch, heads, groups, tokens, keys, dim):
    """Grouped heads, several tokens, more than 16 rows per group, key counts off the 16/32 blocks."""
    gen = torch.Generator().manual_seed(keys)
    q = _queries(batch, heads, groups, tokens, dim, gen)
    k, v = _cache_views(batch, groups, keys, dim, gen)
    got = attention_of(kernel)(q, k, v, dim**-0.5)
    assert got.shape == (batch, tokens, heads * dim) and got.dtype == torch.bfloat16
    want = _attention_fp32(q, k, v)
    folded = q.reshape(batch, groups, heads // groups * tokens, dim)
    sdpa = F.scaled_dot_product_attention(folded, k, v).view(batch, heads, tokens, dim).transpose(1, 2)
    sdpa = sdpa.reshape(batch, tokens, heads * dim).float()
    got_error, sdpa_error = (got.float() - want).abs(), (sdpa - want).abs()
    assert got_error.max() <= max(2 * sdpa_error.max().item(), 2**-9 * want.abs().max().item())
    assert got_error.mean() <= 1.25 * sdpa_error.mean() + 1e-6


@every_attention_kernel
@pytest.mark.parametrize("threads", [4, 16])
def test_decode_attention_split_over_key_ranges_is_as_exact(kernel, threads):
    """More threads than (row, group) tasks: the keys are split in ranges of at least 512 and the
    parts merged; the result is as exact as SDPA's."""
    gen = torch.Generator().manual_seed(threads)
    q = _queries(1, 32, 2, 1, 128, gen)
    k, v = _cache_views(1, 2, 5000, 128, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = attention_of(kernel)(q, k, v, 128**-0.5).float()
    finally:
        torch.set_num_threads(before)
    want = _attention_fp32(q, k, v)
    sdpa = F.scaled_dot_product_attention(q.reshape(1, 2, 16, 128), k, v).view(1, 32, 1, 128).transpose(1, 2)
    sdpa_error = (sdpa.reshape(1, 1, 4096).float() - want).abs()
    assert (got - want).abs().max() <= 2 * sdpa_error.max()
    assert (got - want).abs().mean() <= 1.25 * sdpa_error.mean()


@every_attention_kernel
def test_decode_attention_survives_peaked_scores(kernel):
    """Scores in the hundreds (one key takes all the weight) neither overflow nor lose that key."""
    gen = torch.Generator().manual_seed(1)
    q = _queries(1, 4, 2, 1, 64, gen, scale=30.0)
    k, v = _cache_views(1, 2, 50, 64, gen)
    got = attention_of(kernel)(q, k, v, 64**-0.5).float()
    want = _attention_fp32(q, k, v)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 2**-7 * want.abs().max()


@needs_amx
def test_decode_attention_leaves_torchs_amx_products_working():
    """torch's bf16 matmul (AMX through oneDNN) before and after the kernel gives the same result."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    b = torch.randn(256, 64, generator=gen).to(torch.bfloat16)
    before = a @ b
    q = _queries(1, 4, 2, 1, 64, gen)
    k, v = _cache_views(1, 2, 40, 64, gen)
    _amx_kernels().decode_attention(q, k, v, 64**-0.5)
    assert torch.equal(a @ b, before)
    assert torch.equal(F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)),
                       F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))


def _vision_qkv(batch, heads, groups, tokens, dim, gen, scale=1.0):
    """q [B, H, L, D] and k, v [B, G, L, D] as VisionAttention passes them: views of one QKV output."""
    qkv = (torch.randn(batch, tokens, heads + 2 * groups, dim, generator=gen) * scale).to(torch.bfloat16)
    heads_first = qkv.transpose(1, 2)
    return heads_first[:, :heads], heads_first[:, heads : heads + groups], heads_first[:, heads + groups :]


@needs_amx
@pytest.mark.parametrize(
    "batch,heads,groups,tokens,keys,dim",
    # the vision tower's heads (112 wide: 3.5 chunks of 32) over one and several 512-key blocks,
    # queries off the 64-row tasks, keys off the 16/32/512 blocks, grouped heads, narrow heads, a
    # head width off the 16/32 tiles
    [(1, 4, 4, 700, 700, 112), (1, 2, 2, 1, 1, 112), (2, 4, 2, 70, 300, 112), (1, 3, 3, 129, 1300, 64),
     (1, 2, 1, 64, 1025, 128), (1, 2, 2, 33, 600, 16), (1, 2, 2, 5, 7, 32), (1, 2, 2, 20, 100, 34)],
)
def test_vision_attention_is_as_exact_as_sdpa(batch, heads, groups, tokens, keys, dim):
    from glm4v.kernels import vision_attention

    gen = torch.Generator().manual_seed(tokens + keys)
    q = _vision_qkv(batch, heads, groups, tokens, dim, gen)[0]
    _, k, v = _vision_qkv(batch, heads, groups, keys, dim, gen, scale=2.0)
    got = vision_attention(q, k, v)
    assert got.shape == (batch, tokens, heads * dim) and got.dtype == torch.bfloat16
    want = _attention_fp32(q, k, v)
    rep = heads // groups
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    sdpa = sdpa.transpose(1, 2).reshape(batch, tokens, heads * dim).float()
    got_error, sdpa_error = (got.float() - want).abs(), (sdpa - want).abs()
    assert got_error.max() <= max(2 * sdpa_error.max().item(), 2**-8 * want.abs().max().item())
    assert got_error.mean() <= 1.25 * sdpa_error.mean() + 1e-6


@needs_amx
def test_vision_attention_survives_peaked_and_rising_scores():
    """Scores in the hundreds, and maxima that rise block after block (the lazy maximum has to
    rescale what it summed): finite, and as close to fp32 as a bf16 result can be."""
    from glm4v.kernels import vision_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v = _vision_qkv(1, 2, 2, 100, 64, gen, scale=6.0)
    ramp = torch.linspace(0.2, 3.0, 100).view(1, 1, 100, 1)  # later keys score ever higher
    k = (k.float() * ramp).to(torch.bfloat16)
    k = torch.cat([k] * 12, dim=2)  # 1,200 keys: three blocks
    v = torch.cat([v] * 12, dim=2)
    got = vision_attention(q, k, v).float()
    want = _attention_fp32(q, k, v)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 2**-7 * want.abs().max()


@needs_amx
def test_vision_attention_leaves_torchs_amx_products_working():
    """Each task loads its own tile configuration and puts back the one it found: torch's bf16
    matmul (AMX through oneDNN) gives the same result before and after."""
    from glm4v.kernels import vision_attention

    gen = torch.Generator().manual_seed(7)
    a = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    b = torch.randn(256, 64, generator=gen).to(torch.bfloat16)
    before = a @ b
    vision_attention(*_vision_qkv(1, 2, 2, 100, 112, gen))
    assert torch.equal(a @ b, before)


@needs_amx
def test_vision_tower_attention_takes_the_kernel_and_matches_sdpa(monkeypatch):
    """VisionAttention runs the kernel on bf16 CPU inference and gives SDPA's result within its error."""
    from glm4v.config import VisionConfig
    from glm4v.model import vision

    config = VisionConfig(hidden_size=448, num_hidden_layers=1, num_heads=4, intermediate_size=64, patch_size=14,
                          image_size=56, num_positions=17)
    torch.manual_seed(0)
    attention = vision.VisionAttention(config).to(torch.bfloat16).eval()
    x = torch.randn(2, 300, 448).to(torch.bfloat16)
    calls = []
    kernel = vision.vision_attention
    monkeypatch.setattr(vision, "vision_attention", lambda *a: calls.append(1) or kernel(*a))
    with torch.inference_mode():
        got = attention(x)
        assert calls
        monkeypatch.setattr(vision, "vision_attention", lambda *a: None)
        sdpa = attention(x)
        want = attention.float()(x.float())
    assert (got.float() - want).abs().mean() <= 1.25 * (sdpa.float() - want).abs().mean() + 1e-6


def test_vision_attention_declines_what_it_does_not_cover():
    from glm4v.kernels import vision_attention

    gen = torch.Generator().manual_seed(6)
    q, k, v = _vision_qkv(1, 2, 2, 20, 32, gen)
    assert vision_attention(q.float(), k.float(), v.float()) is None
    assert vision_attention(q[..., :31], k[..., :31], v[..., :31]) is None  # odd head width
    assert vision_attention(q.transpose(-1, -2), k, v) is None
    assert vision_attention(q[:, :, :0], k, v) is None and vision_attention(q, k[:, :, :0], v[:, :, :0]) is None
    trained = q.detach().clone().requires_grad_()
    assert vision_attention(trained, k, v) is None  # autograd keeps SDPA's backward


def test_decode_attention_declines_what_it_does_not_cover():
    from glm4v.kernels import decode_attention

    gen = torch.Generator().manual_seed(3)
    k, v = _cache_views(1, 2, 10, 32, gen)
    q = _queries(1, 4, 2, 1, 32, gen)
    assert decode_attention(q.float(), k.float(), v.float()) is None  # fp32
    assert decode_attention(_queries(1, 4, 2, 5, 32, gen), k, v) is None  # more tokens than a decode step
    k16, v16 = _cache_views(1, 2, 10, 16, gen)
    assert decode_attention(_queries(1, 4, 2, 1, 16, gen), k16, v16) is None  # head_dim not a multiple of 32
    with torch.enable_grad():
        assert decode_attention(q.clone().requires_grad_(), k, v) is None  # training needs SDPA's backward


def _tiny_model_with_32_wide_heads():
    """The tiny golden config with 32-wide heads (the embedded model's; the decode kernels need a
    multiple of 32), random bf16 weights; returns (config, model)."""
    import json

    from glm4v.config import GLM4VConfig
    from glm4v.model.glm4v import GLM4VForConditionalGeneration

    config = json.loads((TINY_DIR / "config.json").read_text())
    config.update(kv_channels=32, num_attention_heads=4)
    cfg = GLM4VConfig.from_dict(config, "tiny config, 32-wide heads")
    torch.manual_seed(0)
    return cfg, GLM4VForConditionalGeneration(cfg).to(torch.bfloat16).eval()


def _greedy_decode(model, prompt, steps=3):
    """Prefill ``prompt`` [B, T] into a fresh 40-slot cache, then ``steps`` greedy decode steps;
    returns (their last-position logits stacked [steps * B, 1, vocab], the cache)."""
    cache = model.allocate_cache(prompt.shape[0], 40)
    out = []
    with torch.inference_mode():
        logits = model(prompt, kv_cache=cache, logits_to_keep=1).logits
        for _ in range(steps):
            token = logits[:, -1].float().argmax(-1, keepdim=True)
            logits = model(token, kv_cache=cache, logits_to_keep=1).logits
            out.append(logits)
    return torch.cat(out), cache


@needs_kernels
def test_decode_steps_use_the_attention_kernel_and_match_sdpa(monkeypatch):
    """A bf16 model with 32-wide heads (the embedded model's): decode logits with the kernel match
    those with SDPA, and the kernel ran in every layer of every decode step."""
    import glm4v.model.language as language

    cfg, model = _tiny_model_with_32_wide_heads()
    prompt = torch.randint(0, 1000, (1, 21))

    def decode_logits():
        return _greedy_decode(model, prompt)[0].float()

    outputs = []
    kernel = language.decode_attention
    monkeypatch.setattr(language, "decode_block", lambda *a: None)  # the layers as modules, so that the call is seen
    monkeypatch.setattr(language, "decode_attention", lambda *a: outputs.append(kernel(*a)) or outputs[-1])
    with_kernel = decode_logits()
    assert len(outputs) == 3 * cfg.num_layers and all(out is not None for out in outputs)
    monkeypatch.setattr(language, "decode_attention", lambda *a: None)
    with_sdpa = decode_logits()
    assert (with_kernel - with_sdpa).abs().max() <= 0.02 * with_sdpa.abs().max()


def _transparent_huge_pages_on() -> bool:
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def test_importing_glm4v_first_puts_large_tensors_on_huge_pages():
    """glm4v asks torch's allocator for transparent huge pages (a user's own setting wins)."""
    code = ("import glm4v, os, re, torch\n"
            "t = torch.empty(16 << 20); t.fill_(1.0)\n"
            "huge = int(re.search(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps_rollup').read()).group(1))\n"
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], huge)\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    setting, huge_kb = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      timeout=120, check=True).stdout.split()
    assert setting == "1"
    if _transparent_huge_pages_on() and Path("/proc/self/smaps_rollup").exists():
        assert int(huge_kb) >= 32 * 1024  # most of the 64 MB tensor
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, capture_output=True,
                          text=True, timeout=120, check=True).stdout.split()
    assert kept == ["0", "0"]



def _lock_is_held(lock_file: Path) -> bool:
    """Whether some open file (this process's or another's) holds the flock on ``lock_file``."""
    import fcntl

    with open(lock_file, "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def test_a_build_killed_while_holding_the_lock_does_not_block_the_next(tmp_path):
    """torch's lock file survives a killed build; glm4v's flock does not, and clears the file."""
    from glm4v.kernels import _build_lock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from glm4v.kernels import _build_lock\n"
         "with _build_lock(Path(sys.argv[1])):\n"
         "    (Path(sys.argv[1]) / 'lock').touch(); print('held', flush=True); time.sleep(600)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(glm4v.__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _lock_is_held(tmp_path / "glm4v.lock")  # a live build holds it: the next one waits
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "lock").exists()
    with pytest.warns(UserWarning, match="left by a kernel build that was killed"):
        with _build_lock(tmp_path):
            assert not (tmp_path / "lock").exists()


def test_build_loads_while_holding_the_lock(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    import glm4v.kernels as kernels

    class Module:
        pass

    held_during_load = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        held_during_load.append(_lock_is_held(Path(build_directory) / "glm4v.lock"))
        return Module()

    monkeypatch.setenv("GLM4V_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(kernels, "_self_check", lambda module: None)
    module = kernels.build.__wrapped__("avx2")  # past the cache: the real build stays in it
    assert module.kernel_set == "avx2" and held_during_load == [True]
    (lock_file,) = tmp_path.glob("*/glm4v.lock")
    assert not _lock_is_held(lock_file)  # released after the load


@needs_kernels
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_layer_in_one_call_is_bitwise_the_layers_modules(fmt, batch, monkeypatch):
    """Decode steps run each decoder layer as one ``decode_block`` call, and their logits and KV
    cache are bit for bit what the layer's modules give one by one (query/key/value bias included)."""
    import glm4v.model.language as language
    from glm4v.quant import quantize_model

    cfg, model = _tiny_model_with_32_wide_heads()
    assert cfg.add_qkv_bias
    for layer in model.transformer.encoder.layers:
        torch.nn.init.normal_(layer.self_attention.query_key_value.bias, std=0.5)
    if fmt != "bf16":
        plan = quantize_model(model, fmt, group_size=32)
        assert f"int{fmt[-1]}" in plan.values()
    prompt = torch.randint(0, 1000, (batch, 21))

    fused = []
    block = language.decode_block
    monkeypatch.setattr(language, "decode_block", lambda *a: fused.append(block(*a)) or fused[-1])
    logits, cache = _greedy_decode(model, prompt)
    assert len(fused) == 3 * cfg.num_layers and all(out is not None for out in fused)
    monkeypatch.setattr(language, "decode_block", lambda *a: None)
    want_logits, want_cache = _greedy_decode(model, prompt)
    assert torch.equal(logits, want_logits)
    assert torch.equal(cache.k, want_cache.k) and torch.equal(cache.v, want_cache.v)


def test_decode_layer_runs_as_modules_where_hooks_or_other_modules_need_it(monkeypatch):
    """A hook on a sub-module, or a projection that is not glm4v's (a LoRA wrapper), keeps the
    layer on its modules, so the hook runs and the wrapper's output counts."""
    import glm4v.model.language as language

    _, model = _tiny_model_with_32_wide_heads()
    calls = []
    monkeypatch.setattr(language, "decode_block", lambda *a: calls.append(a) or None)
    seen = []
    layer = model.transformer.encoder.layers[0]
    handle = layer.mlp.dense_4h_to_h.register_forward_hook(lambda *a: seen.append(1))
    cache = model.allocate_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[5, 6]]), kv_cache=cache, logits_to_keep=1)
        seen.clear()
        model(torch.tensor([[7]]), kv_cache=cache, logits_to_keep=1)
    assert seen == [1] and len(calls) == 1  # layer 0 ran its modules; layer 1 asked for the fused call
    handle.remove()
    layer.mlp.dense_4h_to_h = torch.nn.Sequential(layer.mlp.dense_4h_to_h)  # not one of glm4v's linears
    calls.clear()
    with torch.inference_mode():
        model(torch.tensor([[8]]), kv_cache=cache, logits_to_keep=1)
    assert len(calls) == 2 and None in calls[0][3] and None not in calls[1][3]


def test_decode_layer_in_one_call_leaves_a_trained_projection_to_autograd():
    """With autograd on and a projection's weight requiring grad, the layer runs as modules."""
    _, model = _tiny_model_with_32_wide_heads()
    model.requires_grad_(False)
    dense = model.transformer.encoder.layers[0].mlp.dense_4h_to_h
    dense.weight.requires_grad_(True)
    cache = model.allocate_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([[5, 6]]), kv_cache=cache, logits_to_keep=1)
    logits = model(torch.tensor([[7]]), kv_cache=cache, logits_to_keep=1).logits
    logits.float().sum().backward()
    assert dense.weight.grad is not None and dense.weight.grad.abs().sum() > 0


_WITHOUT_AMX = """
import torch
import glm4v.model.language as language
from glm4v.kernels import cpu_kernels, decode_attention
from tests.test_kernels import _cache_views, _greedy_decode, _queries, _tiny_model_with_32_wide_heads

module = cpu_kernels()
assert module.kernel_set == "avx512bf16" and not module.amx_available()
gen = torch.Generator().manual_seed(0)
q = _queries(1, 32, 2, 1, 128, gen)
k, v = _cache_views(1, 2, 700, 128, gen)
assert torch.equal(decode_attention(q, k, v), module.decode_attention_fma(q, k, v, 128**-0.5))

cfg, model = _tiny_model_with_32_wide_heads()
prompt = torch.randint(0, 1000, (1, 21))
block = language.decode_block
fused = []

def decode(fuse):
    language.decode_block = (lambda *a: fused.append(block(*a)) or fused[-1]) if fuse else (lambda *a: None)
    return _greedy_decode(model, prompt)[0]

with_block = decode(True)
assert len(fused) == 3 * cfg.num_layers and all(out is not None for out in fused)
assert torch.equal(with_block, decode(False))
from glm4v.kernels import vision_attention
assert vision_attention(q, k, v) is None  # the vision tower keeps SDPA without AMX
print("ok")
"""


@pytest.mark.skipif("avx512bf16" not in runnable_kernel_sets() or cpu_kernels() is None,
                    reason="no AVX-512 build here")
def test_without_amx_the_avx512_build_runs_decode_layers_with_its_fma_attention():
    """GLM4V_NO_AMX=1 (as on Zen 4, AVX-512 without AMX): ``decode_attention`` is the FMA path, and
    decode layers still run as one ``decode_block`` call, bit for bit their modules."""
    out = subprocess.run([sys.executable, "-c", _WITHOUT_AMX], env={**os.environ, "GLM4V_NO_AMX": "1"},
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], out.stderr[-3000:]


@pytest.mark.skipif("avx512bf16" not in runnable_kernel_sets() or cpu_kernels() is None,
                    reason="no AVX-512 build here")
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group,rows", [(128, (0, 320)), (32, (128, 256)), (64, (64, 320))])
def test_int4_expansion_of_the_avx512_build_is_bitwise_the_torch_ops(scale_dtype, out_dtype, group, rows, monkeypatch):
    """W^T of a prefill's int4 product: the kernel's numbers are the torch ops' to the bit, for any
    block range, scale dtype and output dtype; QuantizedLinear's prefill takes it."""
    from glm4v import quant

    gen = torch.Generator().manual_seed(group)
    weight = torch.randn(320, 256, generator=gen) * 0.05
    weight[:64, :group] *= 1000  # a group of huge values: large scales and shifts
    layer = QuantizedLinear.from_weight(weight, None, "int4", group, scale_dtype)
    start, stop = rows
    got = torch.full((256, stop - start), float("nan"), dtype=out_dtype)
    build("avx512bf16").int4_expand_t(layer.weight, layer.weight_scales_zeros, group, start, stop, got)
    want = torch.empty_like(got)
    monkeypatch.setattr(quant, "cpu_kernels", lambda: None)
    layer._expand_int4_transposed(start, stop, want, out_dtype)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="whole 64-row blocks"):
        build("avx512bf16").int4_expand_t(layer.weight, layer.weight_scales_zeros, group, 32, 96, got[:, :64])


@pytest.mark.skipif(cpu_kernels() is None or not hasattr(cpu_kernels(), "int4_expand_t"),
                    reason="no int4 expansion kernel in this CPU's build")
def test_int4_prefill_products_expand_with_the_kernel(monkeypatch):
    from glm4v import quant

    layer = QuantizedLinear.from_weight(torch.randn(128, 256) * 0.05, None, "int4", 128, torch.bfloat16)
    x = torch.randn(40, 256).to(torch.bfloat16)
    module, calls = cpu_kernels(), []

    class Counting:
        def __getattr__(self, name):
            if name == "int4_expand_t":
                return lambda *a: calls.append(a) or module.int4_expand_t(*a)
            return getattr(module, name)

    monkeypatch.setattr(quant, "cpu_kernels", lambda: Counting())
    with torch.inference_mode():
        got = layer(x)
    assert calls
    monkeypatch.setattr(quant, "cpu_kernels", lambda: None)
    with torch.inference_mode():
        assert torch.equal(got, layer(x))
