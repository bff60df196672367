"""Weight-only int8/int4 layers (glm4v/quant.py): formats, kernels, loading, saving, quality."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import glm4v
from glm4v import quant
from glm4v.errors import CheckpointError, InputError
from glm4v.quant import QuantizedLinear
from tests.conftest import IMAGES_DIR, TINY_DIR


def _embedded_available() -> bool:
    from glm4v.engine import EMBEDDED_MODEL

    return (EMBEDDED_MODEL / "config.json").exists()


# -- storage formats -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 3), k_half=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_int4_pack_roundtrip(blocks, k_half, seed):
    codes = torch.randint(0, 16, (64 * blocks, 2 * k_half), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.shape == (64 * blocks, k_half) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), codes)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"), reason="no CPU int4 kernel")
def test_int4_kernel_is_used_only_where_torch_reads_our_layout():
    # torch packs int4 for its CPU kernel in an ISA-dependent layout: the AVX-512 build's layout is
    # ours, an AVX2-only CPU packs differently, and there the layers must expand-and-matmul instead.
    codes = torch.randint(0, 16, (192, 256), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    same = torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), quant.pack_int4(codes.to(torch.uint8)))
    assert quant.cpu_int4_kernel_ok() == same
    from glm4v.kernels import cpu_has_avx512_bf16

    if cpu_has_avx512_bf16():
        assert same, "torch's AVX-512 int4 layout changed"


def test_int8_roundtrip_of_representable_weight_is_exact():
    scale = torch.tensor([0.5, 0.25, 2.0 ** -7])
    codes = torch.randint(-127, 128, (3, 40), generator=torch.Generator().manual_seed(1)).float()
    codes[:, 0] = 127  # the row maximum fixes the scale
    weight = codes * scale[:, None]
    before = weight.clone()
    q, s = quant.quantize_int8(weight, torch.float32)
    assert torch.equal(s, scale) and torch.equal(q.float(), codes)
    assert torch.equal(weight, before)  # the source (often a view of the checkpoint) is never written


@pytest.mark.parametrize("fmt,group,bound", [("int8", None, 0.008), ("int4", 32, 0.09), ("int4", 128, 0.11)])
def test_quantisation_error_is_small_on_gaussian_weights(fmt, group, bound):
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    before = w.clone()
    layer = QuantizedLinear.from_weight(w, None, fmt, group or 128, torch.float32)
    assert torch.equal(w, before)  # the source (often a view of the checkpoint) is never written
    err = (quant.dequantize(layer).float() - w).norm() / w.norm()
    assert err < bound, f"{fmt} relative weight error {err:.4f}"


def test_int4_falls_back_to_int8_when_the_shape_does_not_fit():
    assert QuantizedLinear.from_weight(torch.randn(48, 128), None, "int4", 128, torch.float32).bits == 8  # N % 64
    assert QuantizedLinear.from_weight(torch.randn(64, 96), None, "int4", 64, torch.float32).bits == 8  # K % group
    assert QuantizedLinear.from_weight(torch.randn(64, 128), None, "int4", 64, torch.float32).bits == 4


def test_constant_and_zero_weights_do_not_divide_by_zero():
    for fmt in ("int8", "int4"):
        for w in (torch.zeros(64, 64), torch.full((64, 64), 0.3)):
            layer = QuantizedLinear.from_weight(w, None, fmt, 32, torch.float32)
            assert torch.allclose(quant.dequantize(layer).float(), w, atol=1e-3)
            assert torch.isfinite(layer(torch.randn(3, 64))).all()


# -- kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt,shape", [("int8", (192, 256)), ("int4", (192, 256)), ("int8", (48, 64))])
def test_every_step_size_matches_the_dequantised_matmul(dtype, fmt, shape, native_bf16, monkeypatch):
    """Decode-size steps take the weight-only kernel, larger ones the expanded matmul (bf16, or
    float32 on a CPU that emulates bf16): all must compute x @ W_dequantised^T + b."""
    import glm4v.kernels

    monkeypatch.setattr(glm4v.kernels, "cpu_has_native_bf16", lambda: native_bf16)
    torch.manual_seed(3)
    linear = nn.Linear(shape[1], shape[0], bias=True).to(dtype)
    layer = QuantizedLinear.from_linear(linear, fmt, 64)
    weight = quant.dequantize(layer).float()
    limit = layer.max_kernel_tokens(torch.zeros(1, shape[1], dtype=dtype))
    for tokens in (1, 3, limit, limit + 1, 200):
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        if fmt == "int4" and tokens <= limit and hasattr(glm4v.kernels.cpu_kernels(), "int4_gemv"):
            tol = 1e-2  # the AVX2 int4 GEMV rounds the activations to int8 per group (kernels/cpu_gemv_avx2.cpp)
        x = torch.randn(1, tokens, shape[1], dtype=dtype)
        want = F.linear(x.float(), weight, linear.bias.float())
        got = layer(x)
        assert got.dtype == dtype and got.shape == (1, tokens, shape[0])
        err = (got.float() - want).norm() / want.norm()
        assert err < tol, f"{fmt} {dtype} M={tokens}: relative error {err:.2e}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_expanded_product_with_bias_is_the_same_under_autograd(fmt):
    """The bias (and int8's scale) join the prefill-sized product in place outside autograd and
    out of place under it: the same numbers either way, and a gradient reaches the input."""
    torch.manual_seed(4)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 192, bias=True).to(torch.bfloat16), fmt, 64)
    x = torch.randn(200, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
    trained = x.clone().requires_grad_()
    got = layer(trained)
    assert torch.equal(got.detach(), want)
    got.float().sum().backward()
    assert trained.grad is not None and torch.isfinite(trained.grad).all() and trained.grad.abs().sum() > 0


@pytest.mark.parametrize("own_kernel", [True, False])
@pytest.mark.parametrize("kernel_ok", [True, False])
def test_kernel_is_picked_by_tokens_per_step(monkeypatch, kernel_ok, own_kernel):
    # whether torch's int4 kernel reads our layout depends on the CPU (see the layout test); on
    # AVX2 CPUs glm4v's own GEMV (kernels/cpu_gemv_avx2.cpp) stands in for it
    monkeypatch.setattr(quant, "cpu_int4_kernel_ok", lambda: kernel_ok)
    monkeypatch.setattr(QuantizedLinear, "_own_kernel", lambda self, x: print if own_kernel else None)
    layer = QuantizedLinear.from_weight(torch.randn(128, 128), None, "int4", 64, torch.bfloat16)
    calls = []
    monkeypatch.setattr(QuantizedLinear, "_kernel", lambda self, x: calls.append(("kernel", x.shape[0])) or x @ quant.dequantize(self).t())
    # decode-sized steps reach glm4v's GEMV through the fast path
    monkeypatch.setattr(QuantizedLinear, "_decode_gemv", lambda self, dtype: (
        lambda x, *_: calls.append(("kernel", x.shape[0])) or x @ quant.dequantize(self).t()) if own_kernel else None)
    real_expand = QuantizedLinear._expand_and_matmul
    monkeypatch.setattr(QuantizedLinear, "_expand_and_matmul",
                        lambda self, x: calls.append(("expand", x.shape[0])) or real_expand(self, x))
    limit = layer.max_kernel_tokens(torch.zeros(1, 128, dtype=torch.bfloat16))
    crossovers = glm4v.kernels.GEMV_MAX_TOKENS
    assert limit == (crossovers["avx2"]["int4"] if own_kernel and getattr(
        glm4v.kernels.cpu_kernels(), "kernel_set", None) == "avx2" else crossovers["avx512bf16"]["int4"])
    for m in (1, quant.KERNEL_ROWS_PER_CALL, limit, limit + 1, 500):
        layer(torch.randn(m, 128, dtype=torch.bfloat16))
    small = "kernel" if kernel_ok or own_kernel else "expand"
    assert calls == [(small, 1), (small, quant.KERNEL_ROWS_PER_CALL), (small, limit), ("expand", limit + 1), ("expand", 500)]


def test_expansion_in_slices_equals_one_piece(monkeypatch):
    layer = QuantizedLinear.from_weight(torch.randn(256, 128), torch.randn(256), "int4", 32, torch.float32)
    x = torch.randn(40, 128)
    whole = layer(x)
    monkeypatch.setattr(quant, "EXPAND_CHUNK_ELEMENTS", 64 * 128)  # 4 slices of 64 rows
    assert torch.allclose(layer(x), whole, atol=1e-5)


def test_works_inside_and_outside_inference_mode():
    layer = QuantizedLinear.from_weight(torch.randn(64, 64), None, "int8", 32, torch.float32)
    x = torch.randn(50, 64)
    with torch.inference_mode():
        a = layer(x)
    assert torch.equal(layer(x), a)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_matches_cpu(fmt):
    cpu = QuantizedLinear.from_weight(torch.randn(128, 256), torch.randn(128), fmt, 64, torch.bfloat16)
    gpu = copy.deepcopy(cpu).cuda()
    for m in (1, 100):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert torch.allclose(gpu(x.cuda()).cpu().float(), cpu(x).float(), rtol=2e-2, atol=2e-2)


# -- loading and saving ----------------------------------------------------------------------------


def _linear_formats(model) -> dict[str, str]:
    return {n: (m.format if isinstance(m, QuantizedLinear) else "bf16")
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}


def test_load_quantises_every_linear_of_both_towers():
    pipe = glm4v.load(TINY_DIR, dtype="bfloat16", quantize="int4", group_size=32)
    formats = _linear_formats(pipe.model)
    assert len(formats) == 21 and "bf16" not in formats.values()
    assert formats["transformer.output_layer"] == "int4"
    assert formats["transformer.encoder.layers.0.mlp.dense_h_to_4h"] == "int4"
    assert formats["transformer.vision.transformer.layers.0.mlp.fc1"] == "int8"  # 96 rows: not whole 64-row blocks
    bias = pipe.model.transformer.encoder.layers[0].self_attention.query_key_value.bias
    assert bias is not None and not bias.is_meta


def test_saved_checkpoint_loads_identically_and_smaller(tmp_path):
    pipe = glm4v.load(TINY_DIR, dtype="bfloat16", quantize="int8")
    quant.save_quantized(pipe, tmp_path / "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config[quant.CONFIG_KEY]["format"] == "int8" and len(config[quant.CONFIG_KEY]["layers"]) == 21
    again = glm4v.load(tmp_path / "int8", dtype="bfloat16")
    assert _linear_formats(again.model) == _linear_formats(pipe.model)
    for (name, a), (_, b) in zip(pipe.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 1900, (1, 12))
    assert torch.equal(pipe.generate(ids, max_new_tokens=4), again.generate(ids, max_new_tokens=4))
    size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "int8") < size(TINY_DIR) / 2  # fp32 tiny -> int8 linears + bf16 rest


def test_saved_weights_are_aligned_in_place_and_readable_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    pipe = glm4v.load(TINY_DIR, dtype="bfloat16", quantize="int4", group_size=32)
    quant.save_quantized(pipe, tmp_path / "q")
    again = glm4v.load(tmp_path / "q", dtype="bfloat16")
    layers = [m for m in again.model.modules() if isinstance(m, QuantizedLinear)]
    assert all(m.weight.data_ptr() % quant.ALIGNMENT == 0 for m in layers)
    files = {}
    for shard in (tmp_path / "q").glob("*.safetensors"):
        files.update(load_file(str(shard)))
    assert set(files) == set(pipe.model.state_dict())
    assert all(torch.equal(files[k], v) for k, v in pipe.model.state_dict().items())


def test_misaligned_quantised_weights_are_realigned_on_load(tmp_path, monkeypatch):
    """A pre-quantised checkpoint from another writer may place an int8 weight anywhere; torch's
    int8 kernel crashes on one that is not 16-byte aligned (steps of 4+ tokens)."""
    from glm4v.weights import SafetensorsFile

    pipe = glm4v.load(TINY_DIR, dtype="bfloat16", quantize="int8")
    with monkeypatch.context() as m:
        m.setattr(quant, "ALIGNMENT", 1)  # write without any alignment care
        quant.save_quantized(pipe, tmp_path / "odd")
    offsets = []
    for shard in (tmp_path / "odd").glob("*.safetensors"):
        f = SafetensorsFile(shard)
        offsets += [f._span(n)[0] % 64 for n in f.keys() if n.endswith(".weight") and f.dtype(n) == torch.int8]
    assert any(offsets), "precondition: some int8 weight must be misaligned in the file"
    again = glm4v.load(tmp_path / "odd", dtype="bfloat16")
    layers = [m for m in again.model.modules() if isinstance(m, QuantizedLinear)]
    assert all(m.weight.data_ptr() % quant.ALIGNMENT == 0 for m in layers)
    x = torch.randn(1, 12, 64, dtype=torch.bfloat16)
    for name in ("transformer.encoder.layers.0.self_attention.query_key_value", "transformer.output_layer"):
        assert torch.equal(again.model.get_submodule(name)(x), pipe.model.get_submodule(name)(x))


def test_quantize_checkpoint_cli(tmp_path):
    assert quant.main([str(TINY_DIR), str(tmp_path / "q4"), "--format", "int4", "--group-size", "32"]) == 0
    assert "int4" in _linear_formats(glm4v.load(tmp_path / "q4", dtype="bfloat16").model).values()


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="unknown quantisation"):
        glm4v.load(TINY_DIR, quantize="int3")
    with pytest.raises(InputError, match="group_size"):
        glm4v.load(TINY_DIR, quantize="int4", group_size=100)
    pipe = glm4v.load(TINY_DIR, dtype="bfloat16", quantize="int8")
    quant.save_quantized(pipe, tmp_path / "q")
    with pytest.raises(InputError, match="already quantised to int8"):
        glm4v.load(tmp_path / "q", quantize="int4")
    with pytest.raises(InputError, match="not quantised"):
        quant.save_quantized(glm4v.load(TINY_DIR), tmp_path / "plain")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "q", broken)
    config = json.loads((broken / "config.json").read_text())
    config[quant.CONFIG_KEY]["format"] = "int5"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="malformed"):
        glm4v.load(broken)


# -- quality ---------------------------------------------------------------------------------------

QUESTIONS = ["What is in the picture?", "Describe the image.", "What colour is the shape?", "How many objects are there?",
             "Is there any text?", "图片里有什么?", "这是什么颜色?", "Where is the circle?", "Is it a square?", "Read the word."]


def _fixture_conversations(pipe, n_text: int = 30):
    """Questions about the fixture pictures plus text-only prompts of random ids (as token tensors)."""
    images = sorted(IMAGES_DIR.glob("*.png"))
    out = [[{"role": "user", "content": q, "image": str(images[i % len(images)])}] for i, q in enumerate(QUESTIONS)]
    gen = torch.Generator().manual_seed(4)
    vocab = min(len(pipe.tokenizer), pipe.config.padded_vocab_size) - 20
    return out + [torch.randint(0, vocab, (1, 16), generator=gen) for _ in range(n_text)]


def _synthetic_test_conversations(n):
    """First questions of the synthetic test split (what the embedded model was trained for)."""
    from glm4v.train.synth import DEFAULT_SEED, make_example

    examples = [make_example(DEFAULT_SEED, "test", i) for i in range(n)]
    return [[{**e.messages[0], "image": e.image}] for e in examples]


def _prompts(pipe, conversations):
    """(ids, image features) per prompt, the image encoded by this pipeline's own vision tower."""
    return [(c, None) if isinstance(c, torch.Tensor) else pipe.prepare_chat(c) for c in conversations]


def _greedy(pipe, conversations, new_tokens):
    """Greedy continuations of image conversations, all in one left-padded batch."""
    from glm4v.generate import GenerationConfig, generate_steps

    prompts = _prompts(pipe, conversations)
    width = max(ids.shape[1] for ids, _ in prompts)
    pad = pipe.config.pad_token_id
    ids = torch.stack([F.pad(i[0], (width - i.shape[1], 0), value=pad) for i, _ in prompts])
    mask = torch.stack([F.pad(torch.ones(i.shape[1], dtype=torch.long), (width - i.shape[1], 0)) for i, _ in prompts])
    features = torch.cat([f for _, f in prompts])
    config = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=[])
    steps = [s.tokens for s in generate_steps(pipe.model, ids, attention_mask=mask, config=config, image_features=features)]
    return [list(row) for row in zip(*steps)]


def _last_logits(pipe, conversations):
    """Logits of the next token after each prompt (text-only prompts, all of one length, in one batch)."""
    prompts = _prompts(pipe, conversations)
    with torch.inference_mode():
        images = [pipe.model(ids, image_features=f, logits_to_keep=1).logits[0, -1] for ids, f in prompts if f is not None]
        text = torch.cat([ids for ids, f in prompts if f is None])
        return torch.cat([torch.stack(images), pipe.model(text, logits_to_keep=1).logits[:, -1]]).float()


def test_quantised_greedy_output_stays_close():
    """int8 must barely change greedy output, int4 stay within bounds.

    On the embedded (trained) model, 100 questions of the synthetic test split, against fp32 greedy
    output (8 tokens, cut after the answer's end token: what follows it is never shown and is made of
    near-ties, fp32's top two logits 0.04-0.13 apart where int8 and bf16 took the other one): int8
    must change no more answers than plain bf16 rounding does, int4 keep the first token on >= 90%.
    (The shipped model is still weak, so some of its answers are near ties that bf16 alone flips;
    issue 7's absolute ">= 98 % identical" is measured on the whole split in docs/PERFORMANCE.md.)
    The golden tiny model has random weights whose top logits nearly tie, so there the yardstick is
    bf16 itself: int8 may move the logits at most 2.5x as far from fp32 as plain bf16 does, and its
    first token must agree about as often.
    """
    if _embedded_available():
        conversations = _synthetic_test_conversations(100)
        fp32 = glm4v.load(None, dtype="float32")
        ends = set(fp32.config.eos_token_ids)

        def answers(pipe):
            rows = _greedy(pipe, conversations, 8)
            return [row[:next((i + 1 for i, t in enumerate(row) if t in ends), len(row))] for row in rows]

        want = answers(fp32)
        assert sum(any(t in ends for t in row) for row in want) >= 25  # many short answers end within 8 tokens
        same_bf16 = sum(a == b for a, b in zip(want, answers(glm4v.load(None, dtype="bfloat16"))))
        same8 = sum(a == b for a, b in zip(want, answers(glm4v.load(None, dtype="float32", quantize="int8"))))
        got4 = _greedy(glm4v.load(None, dtype="float32", quantize="int4"), conversations, 1)
        same4 = sum(a[:1] == b for a, b in zip(want, got4))
        assert same8 >= same_bf16 - 1 and same4 >= 0.9 * len(want), (same8, same_bf16, same4, len(want))
        return
    fp32 = glm4v.load(TINY_DIR, dtype="float32")
    conversations = _fixture_conversations(fp32)
    ref = _last_logits(fp32, conversations)

    def distance(pipe):
        logits = _last_logits(pipe, conversations)
        return float((logits - ref).norm() / ref.norm()), float((logits.argmax(-1) == ref.argmax(-1)).float().mean())

    bf16_err, bf16_agree = distance(glm4v.load(TINY_DIR, dtype="bfloat16"))
    int8_err, int8_agree = distance(glm4v.load(TINY_DIR, dtype="float32", quantize="int8"))
    int4_err, int4_agree = distance(glm4v.load(TINY_DIR, dtype="float32", quantize="int4", group_size=32))
    assert int8_err < 2.5 * bf16_err and int8_agree >= bf16_agree - 0.05, (int8_err, bf16_err, int8_agree, bf16_agree)
    assert int4_err < 0.35 and int4_agree >= 0.5, (int4_err, int4_agree)


def test_the_decode_call_follows_the_weight(monkeypatch):
    """The fast path resolves its kernel once per dtype and weight storage: replacing the weight
    (a reload, ``.to()``) must not leave it multiplying with the old one."""
    layer = QuantizedLinear.from_weight(torch.randn(64, 128), None, "int8", 32, torch.float32)
    x = torch.randn(1, 128)
    first = layer(x)
    other = QuantizedLinear.from_weight(torch.randn(64, 128), None, "int8", 32, torch.float32)
    layer.weight, layer.weight_scale = other.weight, other.weight_scale
    assert torch.allclose(layer(x), other(x)) and not torch.allclose(layer(x), first)
