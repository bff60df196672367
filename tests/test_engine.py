"""The public Python API (glm4v.load -> Pipeline) on the golden tiny checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import glm4v
from glm4v.errors import CheckpointError, ContextLengthError, InputError
from tests.conftest import CASES_DIR, IMAGES_DIR, TINY_DIR


@pytest.fixture(scope="module")
def pipe():
    return glm4v.load(TINY_DIR, dtype="float32", device="cpu")


def case(name):
    meta = json.loads((CASES_DIR / name / "case.json").read_text())
    return meta, load_file(str(CASES_DIR / name / "tensors.safetensors"))


def with_image_paths(conversation):
    return [{**m, "image": str(IMAGES_DIR / m["image"])} if "image" in m else m for m in conversation]


def test_documented_api_end_to_end(pipe):
    meta, t = case("02_image_single")
    conversation = with_image_paths(meta["conversation"])
    tok = glm4v.load_tokenizer(TINY_DIR)
    assert tok.encode("Hi", add_special_tokens=False) == pipe.tokenizer.encode("Hi", add_special_tokens=False)
    assert tok.encode("Hi")[:2] == [tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"]]
    ids = pipe.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert ids == t["input_ids"][0].tolist()
    pv = pipe.image_processor(Image.open(conversation[0]["image"]).convert("RGB"))
    assert pv.shape == (1, 3, 112, 112) and torch.equal(pv, t["pixel_values"])
    out = pipe.model(input_ids=torch.tensor([ids]), pixel_values=pv, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out.logits.shape == (1, len(ids) + 16 - 1, 2048)
    new = pipe.generate(torch.tensor([ids]), pixel_values=pv, max_new_tokens=12, do_sample=False)
    assert torch.equal(new, t["greedy_manual_new_ids"])
    text = pipe.chat(conversation, max_new_tokens=12, do_sample=False)
    assert text == pipe.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
    assert "".join(pipe.stream_chat(conversation, max_new_tokens=12)) == text


def test_batched_generate_with_left_padding(pipe):
    meta, t = case("04_batch2_leftpad_images")
    new = pipe.generate(t["input_ids"], pixel_values=t["pixel_values"], attention_mask=t["attention_mask"], max_new_tokens=12)
    assert torch.equal(new, t["greedy_manual_new_ids"])


def test_image_given_as_path_bytes_or_pil_gives_one_answer(pipe):
    path = IMAGES_DIR / "img_b_96x80.png"
    answers = {
        pipe.chat([{"role": "user", "image": src, "content": "Describe."}], max_new_tokens=6)
        for src in (str(path), path.read_bytes(), Image.open(path))
    }
    assert len(answers) == 1


def test_image_features_are_cached_by_pixels(pipe, monkeypatch):
    calls = []
    original = pipe.model.encode_images
    monkeypatch.setattr(pipe.model, "encode_images", lambda pv, **kw: calls.append(1) or original(pv, **kw))
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    conv = [{"role": "user", "image": image, "content": "colour?"}]
    first = pipe.chat(conv, max_new_tokens=4)
    conv2 = conv + [{"role": "assistant", "content": first}, {"role": "user", "content": "sure?"}]
    pipe.chat(conv2, max_new_tokens=4)
    assert len(calls) == 1


def test_seeded_sampling_is_reproducible(pipe):
    conv = [{"role": "user", "content": "Tell me a story"}]
    gen = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9, top_k=50)
    a = pipe.chat(conv, seed=7, **gen)
    assert a == pipe.chat(conv, seed=7, **gen)
    assert len({pipe.chat(conv, seed=s, **gen) for s in range(4)}) > 1


def test_stop_strings_cut_the_answer(pipe):
    conv = [{"role": "user", "content": "Tell me a story"}]
    full = pipe.chat(conv, max_new_tokens=12)
    stop = full[3:6]
    cut = pipe.chat(conv, max_new_tokens=12, stop_strings=[stop])
    assert cut == full[: full.index(stop)]


def test_prompt_longer_than_context_is_a_clear_error(pipe):
    long_text = "word " * 9000
    conv = [{"role": "user", "image": str(IMAGES_DIR / "img_c_112x112.png"), "content": long_text}]
    with pytest.raises(ContextLengthError, match=r"takes \d+ tokens \(\d+ text tokens \+ 18 image tokens\).*context of 8192"):
        pipe.chat(conv, max_new_tokens=4)


def test_max_new_tokens_is_shortened_to_fit_the_context(pipe):
    prompt = "word " * 4000
    ids = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    room = 8192 - len(ids)
    assert 0 < room < 300
    new = pipe.generate(torch.tensor([ids]), max_new_tokens=500)
    assert new.shape[1] <= room


@pytest.mark.parametrize(
    "kwargs,words",
    [({"temperature": -1, "do_sample": True}, "temperature must be >= 0"), ({"top_p": 0}, "top_p must be in"),
     ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"), ({"top_k": -2}, "top_k"),
     ({"bogus": 1}, "unknown generation argument")],
)
def test_bad_generation_settings(pipe, kwargs, words):
    with pytest.raises(InputError, match=words):
        pipe.chat([{"role": "user", "content": "hi"}], **kwargs)


def test_bfloat16_pipeline_runs(tmp_path):
    pipe = glm4v.load(TINY_DIR, dtype=torch.bfloat16)
    assert pipe.model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.bfloat16
    assert isinstance(pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=3), str)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        glm4v.load(tmp_path / "missing")
    with pytest.raises(InputError, match="unknown dtype"):
        glm4v.load(TINY_DIR, dtype="int3")
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(TINY_DIR, folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        glm4v.load(folder)
    folder = tmp_path / "no_config"
    shutil.copytree(TINY_DIR, folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        glm4v.load(folder)


def test_tokenizer_and_config_must_agree(tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(TINY_DIR, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["boi_token_id"] = 5
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="boi_token_id is 5 but the tokenizer says 2010"):
        glm4v.load(folder)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    meta, t = case("02_image_single")
    gpu = glm4v.load(TINY_DIR, dtype="float32", device="cuda")
    out = gpu.model(t["input_ids"], pixel_values=t["pixel_values"])
    assert torch.allclose(out.logits.cpu(), t["logits"], atol=1e-3, rtol=1e-3)
    new = gpu.generate(t["input_ids"], pixel_values=t["pixel_values"], max_new_tokens=12)
    assert torch.equal(new.cpu(), t["greedy_manual_new_ids"])


def _bf16_copy_of_tiny(tmp_path):
    folder = tmp_path / "tiny-bf16"
    shutil.copytree(TINY_DIR, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_auto_dtype_prefers_float32_for_a_small_model_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    import glm4v.engine as engine

    folder = _bf16_copy_of_tiny(tmp_path)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert glm4v.load(folder, dtype="auto").dtype == torch.float32
    # a model too big to double keeps its bf16 weights
    monkeypatch.setattr(engine, "AUTO_FP32_MAX_BYTES", 1000)
    assert glm4v.load(folder, dtype="auto").dtype == torch.bfloat16
    # an explicit dtype is always obeyed
    monkeypatch.setattr(engine, "AUTO_FP32_MAX_BYTES", 1 << 40)
    assert glm4v.load(folder, dtype="bfloat16").dtype == torch.bfloat16


def test_auto_dtype_keeps_the_checkpoint_dtype_where_bf16_is_native(tmp_path, monkeypatch):
    import glm4v.engine as engine

    folder = _bf16_copy_of_tiny(tmp_path)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert glm4v.load(folder, dtype="auto").dtype == torch.bfloat16
    assert glm4v.load(TINY_DIR, dtype="auto").dtype == torch.float32
