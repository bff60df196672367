"""LoRA adapters: targets, save/load/merge equivalence, PEFT layout, loading through glm4v.load, training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import glm4v
from glm4v.errors import CheckpointError, InputError
from glm4v.train import synth
from glm4v.train.lora import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, LoRALinear, apply_lora, load_adapter, lora_modules, merge_lora,
    save_adapter,
)
from glm4v.train.trainer import TrainConfig, Trainer
from tests.conftest import IMAGES_DIR, TINY_DIR


def fresh_model():
    return glm4v.load(TINY_DIR, dtype="float32").model


def inputs(pipe_tokenizer):
    conv = [{"role": "user", "image": str(IMAGES_DIR / "img_c_112x112.png"), "content": "What colour is it? 什么颜色"}]
    ids, _ = pipe_tokenizer.encode_chat(conv)
    from glm4v.image import ImageProcessor

    pixels = ImageProcessor(pipe_tokenizer.image_size)(IMAGES_DIR / "img_c_112x112.png")
    return torch.tensor([ids]), pixels


def logits_of(model, ids, pixels):
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits


def randomise_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.5)


@pytest.fixture(scope="module")
def tok():
    return glm4v.load_tokenizer(TINY_DIR)


def test_default_target_matches_every_query_key_value_like_peft(tok):
    model = fresh_model()
    names = apply_lora(model, LoRAConfig())
    decoder = [n for n in names if n.startswith("transformer.encoder.")]
    vision = [n for n in names if n.startswith("transformer.vision.")]
    assert len(decoder) == model.config.num_layers and len(vision) == model.config.vision_config.num_hidden_layers
    assert all(n.endswith("query_key_value") for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    model = fresh_model()
    names = apply_lora(model, LoRAConfig(target_modules=["query_key_value", "linear_proj"],
                                         exclude_prefixes=["transformer.vision.transformer"]))
    assert "transformer.vision.linear_proj.linear_proj" in names  # the GLU adapter's input projection
    assert not any(n.startswith("transformer.vision.transformer") for n in names)

    with pytest.raises(InputError, match="no linear layer"):
        apply_lora(fresh_model(), LoRAConfig(target_modules=["nonexistent"]))
    with pytest.raises(InputError):
        LoRAConfig(r=0).validate()


def test_fresh_adapter_is_the_identity_and_a_trained_one_changes_the_output(tok):
    ids, pixels = inputs(tok)
    base = logits_of(fresh_model(), ids, pixels)
    model = fresh_model()
    apply_lora(model, LoRAConfig(dropout=0.0))
    assert torch.equal(logits_of(model.eval(), ids, pixels), base)
    randomise_adapters(model)
    assert (logits_of(model, ids, pixels) - base).abs().max() > 1e-2


def test_save_load_merge_give_the_logits_of_the_unmerged_adapter(tok, tmp_path):
    ids, pixels = inputs(tok)
    model = fresh_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["query_key_value", "dense_h_to_4h"]))
    randomise_adapters(model, seed=3)
    model.eval()  # dropout off
    unmerged = logits_of(model, ids, pixels)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")

    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert all(k.startswith("base_model.model.transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["query_key_value", "dense_h_to_4h"]

    reloaded = fresh_model()
    load_adapter(reloaded, tmp_path / "adapter")
    reloaded.eval()
    assert torch.equal(logits_of(reloaded, ids, pixels), unmerged)

    assert merge_lora(reloaded) == len(tensors) // 2
    assert not lora_modules(reloaded)
    names = set(dict(reloaded.named_parameters()))
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in names
    assert torch.allclose(logits_of(reloaded, ids, pixels), unmerged, atol=1e-4, rtol=1e-4)

    via_load = glm4v.load(TINY_DIR, lora=tmp_path / "adapter")
    assert torch.allclose(logits_of(via_load.model, ids, pixels), unmerged, atol=1e-4, rtol=1e-4)
    unmerged_load = glm4v.load(TINY_DIR, lora=tmp_path / "adapter", merge_lora=False)
    assert isinstance(unmerged_load.model.transformer.encoder.layers[0].self_attention.query_key_value, LoRALinear)
    assert torch.equal(logits_of(unmerged_load.model, ids, pixels), unmerged)


def test_an_adapter_that_does_not_fit_is_refused(tmp_path):
    model = fresh_model()
    apply_lora(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(5, tensors[key].shape[1])
    save_file(tensors, str(tmp_path / "a" / ADAPTER_WEIGHTS))
    with pytest.raises(CheckpointError, match="shape"):
        load_adapter(fresh_model(), tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        glm4v.load(TINY_DIR, lora=tmp_path / "nothing")
    (tmp_path / "a" / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_adapter(fresh_model(), tmp_path / "a")


def test_lora_training_moves_only_the_adapters(tmp_path, tok):
    synth.write_dataset(tmp_path / "data", {"train": 16}, seed=4)
    pipe = glm4v.load(TINY_DIR)
    model = pipe.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoRAConfig(r=4, dropout=0.0))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(tmp_path / "data/train.jsonl"), steps=4,
                      batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, save_every=2)
    trainer = Trainer(model, pipe.tokenizer, TINY_DIR, cfg, lora=True, log=lambda m: None)
    trainer.train()
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer.", ".")
        assert torch.equal(p, before[original]), name
    assert any(m.lora_B.weight.abs().max() > 0 for m in lora_modules(model).values())
    checkpoint = tmp_path / "run/checkpoints/step-00000004"
    assert (checkpoint / ADAPTER_WEIGHTS).exists() and not list(checkpoint.glob("model-*.safetensors"))
    merged = trainer.export(tmp_path / "merged", torch.float32, merge=True)
    assert isinstance(glm4v.load(merged).model.transformer.encoder.layers[0].self_attention.query_key_value, nn.Linear)
