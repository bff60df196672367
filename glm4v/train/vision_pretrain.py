"""Stage 1 of the embedded recipe: the vision side learns to see before any conversation.

Trained from scratch on conversations alone, the decoder gets its only signal about a picture
through the answers, a few tokens per conversation, and a 10 M-parameter model learned counting
but not which colour belongs to which shape, text or bar heights (33 % on the synthetic test set
after 3,000 steps). The real GLM-4V starts from a pre-trained EVA2-CLIP; this is the miniature of
that step. Every synthetic picture carries what it shows (``scene`` in the JSONL, see
``synth.scene_labels``), and small linear heads read it from the features the decoder will get --
the GLU adapter's output, one token per grid cell:

- per token: the colour and the shape of the object in its cell (or "empty"); on text pictures,
  the character drawn in its cell (or none); its row and column, as two numbers;
- per token too, the whole chart: each bar's height and which bar is highest (and the heights
  from all tokens side by side);
- per picture: the word or number written (from the mean of the tokens: a word can be anywhere,
  so its read-out must not depend on where).

Linear heads on purpose: what a linear head can read, the decoder's attention can look up. The
heads are thrown away afterwards; the model keeps only its (official-layout) vision weights.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm4v.errors import InputError
from glm4v.train.data import IGNORE, read_jsonl
from glm4v.train.synth import BAR_LETTERS, CHART_MAX, COLOURS, GRID, SHAPES, WORDS
from glm4v.train.trainer import lr_at

COLOUR_CLASSES = [c[0] for c in COLOURS] + ["empty"]
SHAPE_CLASSES = [s[0] for s in SHAPES] + ["empty"]
TEXT_CLASSES = list(WORDS) + [str(n) for n in range(10, 100)]
BAR_CLASSES = CHART_MAX + 1  # 0 = no bar in that slot
CELLS = GRID * GRID
BARS = len(BAR_LETTERS)
CHARACTERS = sorted(set("".join(WORDS)) | set("0123456789"))
NO_CHARACTER = len(CHARACTERS)
# targets of one picture: CELLS colours, CELLS shapes, the text, BARS bar heights, the highest
# bar, then CELLS characters (one per cell: synth draws text one glyph per grid cell)
TEXT_AT = 2 * CELLS
BARS_AT = TEXT_AT + 1
HIGHEST_AT = BARS_AT + BARS
CHARS_AT = HIGHEST_AT + 1
TARGET_WIDTH = CHARS_AT + CELLS
POSITION_WEIGHT = 10.0


def scene_targets(scene: dict) -> list[int]:
    """Class indices of one picture's ``scene`` (IGNORE where the picture says nothing)."""
    targets = [IGNORE] * TARGET_WIDTH
    if "cells" in scene:
        if len(scene["cells"]) != CELLS:
            raise InputError(f"scene has {len(scene['cells'])} cells, expected {CELLS}")
        for k, cell in enumerate(scene["cells"]):
            colour, shape = cell if cell else ("empty", "empty")
            targets[k] = COLOUR_CLASSES.index(colour)
            targets[CELLS + k] = SHAPE_CLASSES.index(shape)
    if "text" in scene:
        targets[TEXT_AT] = TEXT_CLASSES.index(scene["text"])
        if "chars" in scene:
            chars = [NO_CHARACTER] * CELLS
            for ch, cell in scene["chars"]:
                if chars[cell] != NO_CHARACTER:
                    raise InputError(f"scene of {scene['text']!r} puts two characters in cell {cell}")
                chars[cell] = CHARACTERS.index(ch)
            targets[CHARS_AT:] = chars
    if "bars" in scene:
        bars = list(scene["bars"])
        targets[BARS_AT:HIGHEST_AT] = bars + [0] * (BARS - len(bars))
        targets[HIGHEST_AT] = bars.index(max(bars))
    return targets


def cell_positions(device=None) -> torch.Tensor:
    """[CELLS, 2]: each token's grid row and column, scaled to [-1, 1]."""
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(CELLS, 2).float() / (GRID - 1) * 2 - 1).to(device)


class SceneHeads(nn.Module):
    """Linear read-outs of the image tokens (training only, never saved with the model)."""

    def __init__(self, hidden: int, tokens: int):
        super().__init__()
        if tokens != CELLS:
            raise InputError(f"vision pre-training needs one image token per grid cell ({CELLS}), the model has {tokens}")
        self.cell = nn.Linear(hidden, len(COLOUR_CLASSES) + len(SHAPE_CLASSES))
        self.text = nn.Linear(hidden, len(TEXT_CLASSES))
        self.chars = nn.Linear(hidden, len(CHARACTERS) + 1)
        self.bars = nn.Linear(hidden, BARS * BAR_CLASSES + BARS)
        self.chart = nn.Linear(tokens * hidden, BARS * BAR_CLASSES)
        self.position = nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """tokens [B, CELLS, D], targets [B, TARGET_WIDTH] -> mean of the parts' losses, accuracies."""
        B = tokens.shape[0]
        cell = self.cell(tokens)
        n_colour = len(COLOUR_CLASSES)
        # Every token reads the whole chart: the decoder then finds a bar's height (or the highest
        # bar) in any image token instead of assembling it from the cells a bar straddles.
        bars = self.bars(tokens)
        chart = self.chart(tokens.reshape(B, -1)).reshape(-1, BAR_CLASSES)
        per_token = lambda t: t[:, None].expand(B, CELLS, *t.shape[1:])  # noqa: E731
        parts = {
            "colour": (cell[..., :n_colour].reshape(-1, n_colour), targets[:, :CELLS].reshape(-1)),
            "shape": (cell[..., n_colour:].reshape(-1, len(SHAPE_CLASSES)), targets[:, CELLS:TEXT_AT].reshape(-1)),
            "chars": (self.chars(tokens).reshape(-1, len(CHARACTERS) + 1), targets[:, CHARS_AT:].reshape(-1)),
            "text": (self.text(tokens.mean(dim=1)), targets[:, TEXT_AT]),
            "bars": (bars[..., :BARS * BAR_CLASSES].reshape(-1, BAR_CLASSES),
                     per_token(targets[:, BARS_AT:HIGHEST_AT]).reshape(-1)),
            "highest": (bars[..., BARS * BAR_CLASSES:].reshape(-1, BARS), per_token(targets[:, HIGHEST_AT]).reshape(-1)),
            # and all tokens side by side: what the per-token read-out has not yet spread to every
            # token is at least kept somewhere (this read-out alone reached 100 % in the first recipe)
            "chart": (chart, targets[:, BARS_AT:HIGHEST_AT].reshape(-1)),
        }
        losses, stats = [], {}
        for name, (logits, labels) in parts.items():
            keep = labels != IGNORE
            if not keep.any():
                continue
            logits, labels = logits[keep].float(), labels[keep]
            losses.append(F.cross_entropy(logits, labels))
            stats[name] = ((logits.argmax(-1) == labels).sum().item(), labels.numel())
        # Where each token is, as two numbers: all image tokens share one RoPE position in GLM-4V,
        # so "left of" / "above" can only come from the features, and a linear row/column lets
        # the decoder compare two looked-up tokens by a subtraction.
        position = self.position(tokens).float()
        truth = cell_positions(tokens.device).expand_as(position)
        # Weighted to the cross-entropies' scale: unweighted, the read-out stalled at 57 % of
        # tokens within a third of a cell after 1,000 steps while every class head passed 99 %.
        losses.append(POSITION_WEIGHT * F.mse_loss(position, truth))
        stats["position"] = (((position - truth).abs() < 1 / (GRID - 1)).all(-1).sum().item(), B * CELLS)
        return torch.stack(losses).mean(), stats


def image_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """The decoder's view of the pictures without boi/eoi, at the adapter's own scale."""
    return model.encode_images(pixels)[:, 1:-1] * model.config.vision_config.scaling_factor


@dataclass
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # with the three above: the schedule of trainer.lr_at
    weight_decay: float = 0.05
    seed: int = 0
    log_every: int = 100
    # Text pictures are ~14 % of the data but the hardest part (114 words and numbers anywhere on
    # the canvas; 0 % after 800 steps without repeats): each epoch shows them this many times.
    text_repeats: int = 3


class SceneData:
    """Pictures of a JSONL file that carry a ``scene``, with their targets."""

    def __init__(self, path, image_size: int):
        from glm4v.image import ImageProcessor

        self.records = [r for r in read_jsonl(path) if r.image is not None and "scene" in r.meta]
        if not self.records:
            raise InputError(f"{path}: no conversations with an image and a 'scene' (write it with glm4v.train.synth)")
        self.targets = torch.tensor([scene_targets(r.meta["scene"]) for r in self.records])
        self.text_indices = [i for i, r in enumerate(self.records) if "text" in r.meta["scene"]]
        self.processor = ImageProcessor(image_size)

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.cat([self.processor(self.records[i].image) for i in indices])
        return pixels, self.targets[indices]


def vision_parameters(model) -> list[nn.Parameter]:
    vision = model.transformer.vision
    return [p for name, p in vision.named_parameters() if name not in ("boi", "eoi")]


def evaluate(model, heads: SceneHeads, data: SceneData, batch_size: int = 128) -> dict:
    """Accuracy of each part on ``data`` (the validation pictures)."""
    totals: dict[str, list[int]] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            pixels, targets = data.batch(list(range(start, min(len(data), start + batch_size))))
            _, stats = heads(image_tokens(model, pixels), targets.to(model.device))
            for name, (right, n) in stats.items():
                t = totals.setdefault(name, [0, 0])
                t[0] += right
                t[1] += n
    model.train(was_training)
    return {name: round(right / n, 4) for name, (right, n) in totals.items()}


def pretrain_vision(model, train: SceneData, val: SceneData | None, cfg: PretrainConfig, log=None) -> dict:
    """Train the vision side (tower, conv, adapter) of ``model`` on scene read-outs; returns a summary."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = model.config
    tokens = (config.vision_config.image_size // config.vision_config.patch_size // 2) ** 2
    heads = SceneHeads(config.hidden_size, tokens).to(model.device)
    params = vision_parameters(model)
    decay = [p for p in params + list(heads.parameters()) if p.dim() >= 2]
    no_decay = [p for p in params + list(heads.parameters()) if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = random.Random(f"glm4v-vision-pretrain/{cfg.seed}")
    order: list[int] = []
    model.train()
    started = time.perf_counter()
    smoothed = None
    history = []
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if len(order) < cfg.batch_size:
            fresh = list(range(len(train))) + train.text_indices * (cfg.text_repeats - 1)
            rng.shuffle(fresh)
            order += fresh
        indices, order = order[:cfg.batch_size], order[cfg.batch_size:]
        pixels, targets = train.batch(indices)
        loss, _ = heads(image_tokens(model, pixels), targets.to(model.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(heads.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            entry = {"vision_step": step + 1, "loss": round(smoothed, 4), "lr": lr,
                     "elapsed_s": round(time.perf_counter() - started)}
            if val is not None and ((step + 1) % (cfg.log_every * 5) == 0 or step + 1 == cfg.steps):
                entry["val"] = evaluate(model, heads, val)
            history.append(entry)
            log(str(entry))
    return {"steps": cfg.steps, "wall_s": round(time.perf_counter() - started, 1), "history": history,
            "val": history[-1].get("val") if history else None}


VISION_WEIGHTS = "vision.safetensors"


def save_vision(model, path) -> None:
    """The vision side's weights (official tensor names), written atomically."""
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith("transformer.vision.")},
              str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def load_vision(model, path) -> int:
    """Copy saved vision weights into ``model``; returns how many tensors were loaded."""
    from glm4v.weights import SafetensorsFile

    shard = SafetensorsFile(path)
    own = model.state_dict()
    try:
        names = list(shard.keys())
        with torch.no_grad():
            for name in names:
                saved = shard.tensor(name)
                if name not in own or own[name].shape != saved.shape:
                    raise InputError(f"{path}: {name} does not fit this model")
                own[name].copy_(saved)
    finally:
        shard.close()
    return len(names)
