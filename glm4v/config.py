"""Model configuration read from the official ``config.json``.

The official file mixes the language model's keys at the top level with a nested ``vision_config``.
We keep the official key names so that a config written by glm4v is byte-compatible with the
official one (and the official code can load our checkpoints). Unknown keys are preserved in
``extra`` so that nothing a user had in their config is lost on a round trip.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm4v.errors import ConfigError

_MISSING = object()


def _check_type(value: Any, expected: tuple[type, ...], key: str, source: str) -> Any:
    # bool is a subclass of int in Python; a config saying `"num_layers": true` is a mistake.
    if isinstance(value, bool) and bool not in expected:
        raise ConfigError(f"{source}: key '{key}' must be {_type_names(expected)}, got a boolean ({value!r})")
    if not isinstance(value, expected):
        raise ConfigError(
            f"{source}: key '{key}' must be {_type_names(expected)}, got {type(value).__name__} ({value!r})"
        )
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _read_fields(cls, raw: dict, source: str, prefix: str = ""):
    """Build dataclass ``cls`` from ``raw``: required keys must exist, every key is type-checked."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "extra" or f.metadata.get("derived"):
            continue
        types = f.metadata["types"]
        if f.name in raw:
            values[f.name] = _check_type(raw[f.name], types, prefix + f.name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key '{prefix}{f.name}' is missing")
    known = {f.name for f in dataclasses.fields(cls)}
    extra = {k: v for k, v in raw.items() if k not in known}
    return values, extra


def _f(types, default=_MISSING):
    """A config field: ``types`` are the accepted JSON types; no default means required."""
    if default is _MISSING:
        return field(metadata={"types": types})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"types": types})
    return field(default=default, metadata={"types": types})


@dataclass
class VisionConfig:
    """EVA2-CLIP vision tower (``vision_config`` in the official file)."""

    hidden_size: int = _f((int,))
    num_hidden_layers: int = _f((int,))
    num_heads: int = _f((int,))
    intermediate_size: int = _f((int,))
    patch_size: int = _f((int,))
    image_size: int = _f((int,))
    num_positions: int = _f((int,))
    in_channels: int = _f((int,), 3)
    layer_norm_eps: float = _f((float, int), 1e-6)
    hidden_act: str = _f((str,), "gelu")
    dropout_prob: float = _f((float, int), 0.0)
    scaling_factor: float = _f((float, int), 8.0)
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Patch tokens fed to the LM after the 2x2 conv (1600 official), excluding boi/eoi."""
        return (self.grid_size // 2) ** 2

    def validate(self, source: str) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{source}: vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{source}: vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.grid_size % 2:
            raise ConfigError(f"{source}: vision grid {self.grid_size}x{self.grid_size} is odd; the 2x2 conv needs an even grid")
        if self.num_positions != self.grid_size**2 + 1:
            raise ConfigError(
                f"{source}: vision num_positions is {self.num_positions} but image_size/patch_size gives "
                f"{self.grid_size}^2 + 1 (CLS) = {self.grid_size ** 2 + 1}"
            )
        if self.hidden_act != "gelu":
            raise ConfigError(f"{source}: vision hidden_act '{self.hidden_act}' is not supported (only 'gelu')")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass
class GLM4VConfig:
    """GLM-4 decoder keys (top level of the official file) plus the vision tower."""

    hidden_size: int = _f((int,))
    num_layers: int = _f((int,))
    num_attention_heads: int = _f((int,))
    kv_channels: int = _f((int,))
    ffn_hidden_size: int = _f((int,))
    padded_vocab_size: int = _f((int,))
    multi_query_group_num: int = _f((int,))
    multi_query_attention: bool = _f((bool,), True)
    seq_length: int = _f((int,), 8192)
    layernorm_epsilon: float = _f((float, int), 1e-5)
    rmsnorm: bool = _f((bool,), True)
    post_layer_norm: bool = _f((bool,), True)
    add_bias_linear: bool = _f((bool,), False)
    add_qkv_bias: bool = _f((bool,), True)
    apply_residual_connection_post_layernorm: bool = _f((bool,), False)
    original_rope: bool = _f((bool,), True)
    # Absent from the official config (=> 1). Kept as None when absent so that saving a config
    # does not add a key the official file never had.
    rope_ratio: float | None = _f((float, int), None)
    tie_word_embeddings: bool = _f((bool,), False)
    eos_token_id: list = _f((list, int), [151329, 151336, 151338])
    pad_token_id: int = _f((int,), 151329)
    boi_token_id: int = _f((int,), 151339)
    eoi_token_id: int = _f((int,), 151340)
    torch_dtype: str = _f((str,), "bfloat16")
    vision_config: VisionConfig = field(default=None, metadata={"derived": True})
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Channels of each head that RoPE rotates: the first half (GLM's 2D-RoPE heritage)."""
        return self.kv_channels // 2

    @property
    def rope_base(self) -> float:
        return 10000.0 * (self.rope_ratio if self.rope_ratio is not None else 1.0)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_image_tokens

    def validate(self, source: str) -> None:
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"multi_query_group_num {self.num_kv_heads}"
            )
        if self.kv_channels % 4:
            raise ConfigError(f"{source}: kv_channels {self.kv_channels} must be a multiple of 4 for RoPE")
        if not self.rmsnorm:
            raise ConfigError(f"{source}: rmsnorm=false (LayerNorm decoder) is not supported by GLM-4V")
        if not self.original_rope:
            raise ConfigError(f"{source}: original_rope=false is not supported by GLM-4V")
        if self.tie_word_embeddings:
            raise ConfigError(f"{source}: tie_word_embeddings=true is not supported: GLM-4V has a separate output layer")
        if self.apply_residual_connection_post_layernorm:
            raise ConfigError(f"{source}: apply_residual_connection_post_layernorm=true is not supported")
        ids = self.eos_token_ids
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"{source}: key 'eos_token_id' must be an integer or a non-empty list of integers")
        for key, value in [("pad_token_id", self.pad_token_id), ("boi_token_id", self.boi_token_id),
                           ("eoi_token_id", self.eoi_token_id)] + [("eos_token_id", i) for i in ids]:
            if not 0 <= value < self.padded_vocab_size:
                raise ConfigError(f"{source}: {key} {value} is outside the vocabulary (padded_vocab_size {self.padded_vocab_size})")
        self.vision_config.validate(source)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "GLM4VConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        values, extra = _read_fields(cls, raw, source)
        if "vision_config" not in raw:
            raise ConfigError(f"{source}: required key 'vision_config' is missing (this is not a GLM-4V config)")
        if not isinstance(raw["vision_config"], dict):
            raise ConfigError(f"{source}: key 'vision_config' must be an object")
        vision_values, vision_extra = _read_fields(VisionConfig, raw["vision_config"], source, prefix="vision_config.")
        extra.pop("vision_config", None)
        config = cls(**values, extra=extra)
        config.vision_config = VisionConfig(**vision_values, extra=vision_extra)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "GLM4VConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found (a GLM-4V model folder needs config.json)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "vision_config"):
                continue
            if f.name == "rope_ratio" and self.rope_ratio is None:
                continue
            out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        out["vision_config"] = self.vision_config.to_dict()
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
