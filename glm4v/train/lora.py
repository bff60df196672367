"""LoRA: low-rank adapters on chosen linear layers, saved alone, loaded at inference, merged.

``y = W x + (alpha / r) * B A dropout(x)`` with A [r, in] (Kaiming-uniform) and B [out, r] (zeros,
so training starts exactly at the base model). Only A and B train.

Names and files follow PEFT, so adapters move between glm4v and the official fine-tuning scripts:
a target matches a module whose name is the target or ends with ``.<target>`` (the official recipe
targets ``query_key_value``: every decoder layer's fused QKV and, since PEFT matches by suffix,
the vision tower's too unless excluded), the wrapped layer keeps its weights in ``base_layer``,
and ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` / ``lora_B``
next to an ``adapter_config.json`` with PEFT's keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from glm4v.errors import CheckpointError, InputError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query_key_value"])
    # module-name prefixes that never get an adapter (e.g. the vision tower when it is frozen)
    exclude_prefixes: list[str] = field(default_factory=list)

    def validate(self) -> "LoRAConfig":
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise InputError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise InputError("LoRA needs at least one target module name")
        return self

    def to_peft(self, base_model: str = "") -> dict:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules), "exclude_prefixes": list(self.exclude_prefixes),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, raw: dict, source: str) -> "LoRAConfig":
        if raw.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{source}: peft_type {raw.get('peft_type')!r} is not LORA")
        if raw.get("bias", "none") != "none":
            raise CheckpointError(f"{source}: adapters that train biases (bias={raw['bias']!r}) are not supported")
        targets = raw.get("target_modules")
        targets = [targets] if isinstance(targets, str) else targets
        try:
            return cls(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                       target_modules=list(targets or []),
                       exclude_prefixes=list(raw.get("exclude_prefixes", []))).validate()
        except KeyError as e:
            raise CheckpointError(f"{source}: missing key {e}") from None
        except InputError as e:
            raise CheckpointError(f"{source}: {e}") from None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        # adapters stay fp32 even on a bf16 base: their updates are tiny relative to the weights
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return self.base_layer(x) + (update * self.scaling).to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        base = self.base_layer.weight
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return (base.float() + delta).to(base.dtype)


def _matches(name: str, config: LoRAConfig) -> bool:
    if any(name == p or name.startswith(p + ".") for p in config.exclude_prefixes):
        return False
    return any(name == t or name.endswith("." + t) for t in config.target_modules)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every matching nn.Linear, freeze everything else; returns the wrapped module names."""
    config.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, config)]
    if not names:
        raise InputError(f"no linear layer matches the LoRA target modules {config.target_modules}")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.r, config.alpha, config.dropout))
    model.lora_config = config
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_adapter(model: nn.Module, folder, base_model: str = "") -> None:
    """Write adapter_model.safetensors + adapter_config.json (the caller makes the folder atomic)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(model.lora_config.to_peft(base_model), indent=2) + "\n")


def read_adapter_config(folder) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return LoRAConfig.from_peft(raw, str(path))


def load_adapter(model: nn.Module, folder) -> list[str]:
    """Wrap the model's layers as the adapter's config says and fill A and B from the file."""
    from glm4v.weights import SafetensorsFile

    folder = Path(folder)
    config = read_adapter_config(folder)
    names = apply_lora(model, config)
    expected = adapter_state_dict(model)
    shard = SafetensorsFile(folder / ADAPTER_WEIGHTS)
    try:
        found = set(shard.keys())
        missing = sorted(set(expected) - found)
        unexpected = sorted(found - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{folder}: adapter does not fit this model: {len(missing)} missing tensor(s) "
                f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}"
            )
        for key, target in expected.items():
            source = shard.tensor(key)
            if tuple(source.shape) != tuple(target.shape):
                raise CheckpointError(f"{folder}: {key} has shape {list(source.shape)}, the model needs {list(target.shape)}")
            with torch.no_grad():
                target.copy_(source.to(target.dtype))
    finally:
        shard.close()
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and unwrap it: the model is plain again."""
    modules = lora_modules(model)
    with torch.no_grad():
        for name, m in modules.items():
            base = m.base_layer
            base.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return len(modules)


def attach_adapter(model: nn.Module, folder, merge: bool = True, quantized: bool = False) -> None:
    """Load an adapter into a loaded model (``glm4v.load(..., lora=folder)``), merged by default."""
    if quantized:
        raise InputError("a LoRA adapter cannot be applied to a quantised model; load without quantize "
                         "(or merge the adapter into the weights first, then quantise)")
    load_adapter(model, folder)
    if merge:
        merge_lora(model)
