"""Random-weight checkpoints in the official layout, for tests and benchmarks.

Real GLM-4V-9B weights cannot be downloaded here; loading, memory and speed are exercised on
random checkpoints of the same layout (any widths and depths) written by this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from glm4v.config import GLM4VConfig
from glm4v.model.glm4v import GLM4VForConditionalGeneration
from glm4v.weights import save_weights


def scaled_config(base: GLM4VConfig | dict, **overrides) -> GLM4VConfig:
    """A copy of ``base`` with top-level or ``vision_<key>`` overrides (e.g. vision_num_hidden_layers=2)."""
    raw = base.to_dict() if isinstance(base, GLM4VConfig) else json.loads(json.dumps(base))
    for key, value in overrides.items():
        if key.startswith("vision_"):
            raw["vision_config"][key[len("vision_"):]] = value
        else:
            raw[key] = value
    return GLM4VConfig.from_dict(raw, source="scaled config")


@torch.no_grad()
def random_state(config: GLM4VConfig, dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every parameter, created one at a time (never the whole model in fp32)."""
    with torch.device("meta"):
        model = GLM4VForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("inv_freq"):
            dim = config.rope_dim
            tensors[name] = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            continue
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("norm1.weight"):
            t = torch.ones(p.shape)
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=gen) / fan_in**0.5
        else:
            t = torch.randn(p.shape, generator=gen) * 0.02
        tensors[name] = t.to(dtype)
    return tensors


def write_random_checkpoint(
    folder: str | Path,
    config: GLM4VConfig,
    tokenizer_dir: str | Path,
    dtype=torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write config.json, sharded weights and the tokenizer files of ``tokenizer_dir`` to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.torch_dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    save_weights(random_state(config, dtype, seed), folder, max_shard_bytes=max_shard_bytes)
    config.save(folder / "config.json")
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy2(src, folder / name)
    tok_cfg = folder / "tokenizer_config.json"
    raw = json.loads(tok_cfg.read_text())
    raw["image_size"] = config.vision_config.image_size
    tok_cfg.write_text(json.dumps(raw, indent=2, ensure_ascii=False))
    return folder
