"""Training loop: AdamW, warm-up + cosine, clipping, accumulation, validation, atomic resumable checkpoints.

Checkpoints live in ``<out>/checkpoints/step-NNNNNNNN/``: the model in the official layout
(config.json, tokenizer files, sharded safetensors + index, so ``glm4v.load`` opens it) or, for a
LoRA run, the adapter alone; plus ``optimizer.safetensors`` and ``trainer_state.json`` (step, data
position, random state). Each one is written under a temporary name and renamed into place, then
the small ``latest`` pointer file is replaced atomically (``os.replace``): a SIGKILL at any moment
leaves the previous checkpoint and pointer intact. ``resume`` restores weights, optimizer moments,
the learning-rate position, the data order and the RNG, so the run continues as if never stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm4v.config import GLM4VConfig
from glm4v.errors import CheckpointError, InputError
from glm4v.model.glm4v import GLM4VForConditionalGeneration
from glm4v.train.data import IGNORE, ConversationDataset, batch_order, collate
from glm4v.weights import atomic_folder, copy_files, save_weights

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json")
POINTER = "latest"


@dataclass
class TrainConfig:
    out_dir: str
    train_data: str
    val_data: str | None = None
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    autocast: bool = False  # bf16 autocast (CPU or CUDA)
    eval_every: int = 250
    save_every: int = 250
    keep_checkpoints: int = 2
    val_batches: int = 8  # batches of the validation set used for the loss
    val_generate: int = 270  # conversations answered for the validation accuracy (0 = none)
    max_length: int = 1024
    seed: int = 0
    save_dtype: str = "bfloat16"
    log_every: int = 25
    freeze_vision: bool = False
    # With ``freeze_vision``, also freeze the conv + GLU adapter (all of the vision side but
    # boi/eoi): after vision pre-training (vision_pretrain.py) its output is what the decoder
    # should learn to read, and conversation gradients would only blur it.
    freeze_vision_adapter: bool = False
    vision_lr_scale: float = 1.0
    # Keep the whole vision side (tower + adapter) at its random initialisation for the first
    # steps: its random features already tell colours and places apart, and while the decoder is
    # still learning the answer templates a trainable adapter collapses to a constant output.
    vision_freeze_steps: int = 0
    # Curriculum, stage 1: the first ``text_steps`` steps train on the training conversations with
    # their images left out, so the decoder knows every answer template before it sees a picture.
    # Learning templates and pictures at once, the template losses dominate, the image tokens only
    # disturb them, and the gradient makes the vision side's output constant (measured: the spread
    # of image features across pictures fell from ~0.3 to 0.009 in 100 steps at lr 6e-4).
    text_steps: int = 0
    # Stage 2: the next ``warmup_data_steps`` steps draw their batches from ``warmup_data``
    # (e.g. single-object questions), so that the decoder starts reading the picture on questions
    # whose answer is nothing but the picture.
    warmup_data: str | None = None
    warmup_data_steps: int = 0
    # After the warm-up steps, a step still draws its batch from the warm-up data with probability
    # ``warmup_data_mix``, decaying linearly to 0 at the last step: an abrupt switch to the full
    # data made the model forget what the warm-up taught it (single-object perception fell from
    # ~100% to 48% on the warm-up data 400 steps after the switch).
    warmup_data_mix: float = 0.0
    group_by_length: int = 0  # sort by length within windows of this many batches (0: random batches)
    # Run each batch as this many pieces of similar length, gradients accumulated and weighted by
    # target tokens, so the update is the whole batch's while each piece pads only to its own
    # longest conversation (English and Chinese conversations differ ~2x in length).
    length_pieces: int = 1
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# model set-up

def init_weights(model: GLM4VForConditionalGeneration, seed: int) -> None:
    """GPT-2-style initialisation for training from scratch.

    Linear and embedding weights N(0, 0.02); the projections that write into a residual stream
    (attention ``dense``, MLP down projections) are scaled by 1/sqrt(2 * layers) so the stream's
    variance does not grow with depth; norms start at 1 and biases at 0.
    """
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    residual_out = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight", "attention.dense.weight", "mlp.fc2.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("transformer.vision.transformer.layers.") and name.endswith("layernorm.weight"):
                # EVA2-CLIP blocks add LayerNorm(sublayer(x)) to the stream: with the norms at 1,
                # every sublayer adds a unit-size vector that at init is nearly the same for every
                # patch (uniform attention averages them), drowning what each patch saw. Started
                # small (a layer scale), the blocks begin near the identity and the stream keeps
                # each patch's own colour, shape and place, which the decoder needs to tell
                # objects apart.
                p.fill_(VISION_LAYER_SCALE)
            elif name == "transformer.vision.patch_embedding.position_embedding.weight":
                p.copy_(sincos_positions(config.vision_config.grid_size, p.shape[1]))
            elif "layernorm" in name or "norm1" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02
                if name.endswith(residual_out):
                    layers = config.vision_config.num_hidden_layers if ".vision." in name else config.num_layers
                    std /= math.sqrt(2 * layers)
                if name.endswith(("vision.linear_proj.dense_4h_to_h.weight", "vision.boi", "vision.eoi")):
                    # The model divides image features by scaling_factor (8) before the decoder;
                    # starting them 8x larger puts them at the scale of the word embeddings.
                    # Smaller, they drown in the decoder's residual stream and the decoder learns
                    # to ignore the picture (the adapter then collapses to a constant).
                    std *= config.vision_config.scaling_factor
                p.copy_(torch.randn(p.shape, generator=gen) * std)


VISION_LAYER_SCALE = 0.1


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """[1 + grid², width]: zeros for the CLS row, then 2-D sine/cosine codes of each patch's row and
    column at the scale of the patch embeddings. A learned position table starting at N(0, 0.02)
    carries almost no position signal for the first ~1,000 steps, and "left of" or "above"
    questions need it from the start."""
    quarter = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter)))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.zeros(1 + grid * grid, width, dtype=torch.float64)
    table[1:, : 4 * quarter] = torch.cat(parts, dim=1)
    return table.float()


def new_model(folder, seed: int = 0) -> GLM4VForConditionalGeneration:
    config = GLM4VConfig.from_file(Path(folder) / "config.json")
    model = GLM4VForConditionalGeneration(config)
    init_weights(model, seed)
    return model


def freeze_vision_encoder(model: nn.Module, adapter: bool = False) -> int:
    """Freeze the EVA2-CLIP encoder (patch embedding + ViT blocks), and with ``adapter`` the conv +
    GLU adapter too; boi/eoi always keep training. Returns the number of frozen parameters."""
    vision = model.transformer.vision
    frozen = 0
    modules = [vision.patch_embedding, vision.transformer] + ([vision.conv, vision.linear_proj] if adapter else [])
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, vision_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases, embeddings and learned positions/tokens.

    The vision encoder (patch embedding + ViT) may get a smaller learning rate
    (``vision_lr_scale``): its patch projection has a fan-in of 3*p*p (2,352 at p=28), and Adam's
    per-weight steps add up coherently over that many inputs.
    """
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or "embedding" in name or name.endswith((".boi", ".eoi"))
        encoder = name.startswith(("transformer.vision.patch_embedding.", "transformer.vision.transformer."))
        vision = name.startswith("transformer.vision.")
        groups.setdefault((not skip, vision_lr_scale if encoder else 1.0, vision), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale, "vision": vision}
         for (decay, scale, vision), ps in groups.items()],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------
# the loss

def sequence_positions(input_ids: torch.Tensor, boi_token_id: int, image_tokens: int | None) -> torch.Tensor:
    """[B, L] index of each token's row in the model's sequence (after the image splice).

    The 3 image placeholder tokens become ``image_tokens`` (P+2) rows, so everything from
    ``<|end_of_image|>`` on moves right by P-1.
    """
    B, L = input_ids.shape
    index = torch.arange(L, device=input_ids.device).expand(B, L)
    if image_tokens is None:
        return index
    boi = (input_ids == boi_token_id).int().argmax(dim=1, keepdim=True)
    after_image = index >= boi + 2
    return index + after_image * (image_tokens - 3)


def forward_loss(model: GLM4VForConditionalGeneration, batch: dict, autocast: bool = False) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over target tokens, computed only where there is a target.

    The output layer ([vocab, hidden]) runs on the target positions only, not on every position
    of every sequence, which saves most of its cost.
    """
    device = model.device
    ids = batch["input_ids"].to(device)
    targets = batch["targets"].to(device)
    # With right padding a causal model never attends to the pads, so no mask is needed and the
    # fast causal attention kernel runs; left padding needs the mask.
    mask = None if batch.get("padding_side", "right") == "right" else batch["attention_mask"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        features = None
        if batch.get("pixel_values") is not None:
            features = model.encode_images(batch["pixel_values"])
        out = model(ids, attention_mask=mask, image_features=features, logits_to_keep=0, output_hidden_states=True)
        hidden = out.hidden_final_norm
        positions = sequence_positions(ids, model.config.boi_token_id, None if features is None else features.shape[1])
        rows, cols = (targets[:, 1:] != IGNORE).nonzero(as_tuple=True)
        # token cols+1 is predicted from the position of token cols
        selected = hidden[rows, positions[rows, cols]]
        logits = model.transformer.output_layer(selected).float()
    labels = targets[rows, cols + 1]
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).sum().item()
    return loss, {"targets": labels.numel(), "correct": correct, "tokens": hidden.shape[0] * hidden.shape[1]}


def count_targets(sample) -> int:
    """Loss positions of one sample (the first token is never predicted)."""
    return sum(t != IGNORE for t in sample.targets[1:])


def split_by_length(samples: list, pieces: int) -> list[list]:
    """``samples`` sorted by length and cut into up to ``pieces`` groups of (nearly) equal size."""
    if pieces <= 1 or len(samples) < 2:
        return [samples]
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    size = -(-len(ordered) // min(pieces, len(ordered)))
    return [ordered[k:k + size] for k in range(0, len(ordered), size)]


def image_spread(model: GLM4VForConditionalGeneration, pixel_values: torch.Tensor) -> float:
    """How much the image features differ between images, relative to their size.

    A vision tower that collapsed to a constant output (the decoder then learns the answers'
    priors and ignores the picture) shows up here as a value near 0 long before accuracy says so.
    """
    features = model.encode_images(pixel_values)[:, 1:-1].float()
    return (features.std(dim=0).mean() / features.abs().mean().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------
# checkpoints

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def model_tensors(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Official-name tensors to save (the RoPE table is rebuilt from the config, not stored)."""
    out = {}
    for name, t in model.state_dict().items():
        keep = dtype is None or not t.is_floating_point() or name == "transformer.rotary_pos_emb.inv_freq"
        out[name] = (t if keep else t.to(dtype)).cpu()
    return out


def save_model_folder(model: nn.Module, folder, source_folder, dtype: torch.dtype | None) -> None:
    """A complete model folder (config, tokenizer, weights) written atomically."""
    with atomic_folder(folder) as tmp:
        copy_files(MODEL_FILES, Path(source_folder), tmp)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        save_weights(model_tensors(model, dtype), tmp)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    raw = json.loads(path.read_text())
    raw["torch_dtype"] = str(dtype).replace("torch.", "")
    path.write_text(json.dumps(raw, indent=2) + "\n")


def write_pointer(checkpoints: Path, name: str) -> None:
    tmp = checkpoints / f".{POINTER}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, checkpoints / POINTER)


def latest_checkpoint(out_dir) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / POINTER
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} points to {path.name}, which is not a complete checkpoint")
    return path


# ------------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """Trains ``model`` on a ConversationDataset; ``source_folder`` supplies config and tokenizer files."""

    def __init__(self, model: GLM4VForConditionalGeneration, tokenizer, source_folder, cfg: TrainConfig,
                 lora: bool = False, log=None):
        self.model = model
        self.tokenizer = tokenizer
        self.source_folder = Path(source_folder)
        self.cfg = cfg
        self.lora = lora
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out = Path(cfg.out_dir)
        self.checkpoints = self.out / "checkpoints"
        self.train_set = ConversationDataset(cfg.train_data, tokenizer, cfg.max_length)
        self.val_set = ConversationDataset(cfg.val_data, tokenizer, cfg.max_length) if cfg.val_data else None
        self.text_set = None
        if cfg.text_steps:
            self.text_set = ConversationDataset(cfg.train_data, tokenizer, cfg.max_length, drop_images=True)
            self.text_order = batch_order(self.text_set, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
        self.warmup_set = None
        if cfg.warmup_data and cfg.warmup_data_steps:
            self.warmup_set = ConversationDataset(cfg.warmup_data, tokenizer, cfg.max_length)
            self.warmup_order = batch_order(self.warmup_set, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
        if cfg.freeze_vision and not lora:
            frozen = freeze_vision_encoder(model, adapter=cfg.freeze_vision_adapter)
            self.log(f"froze {frozen / 1e6:.2f}M vision parameters")
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.vision_lr_scale)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict] = []
        # Training time of the steps this run has kept, across kills and resumes: a checkpoint
        # carries it on, so a run spread over several sessions still reports what it cost. Work
        # done after the last checkpoint of a killed run is lost and not counted.
        self.seconds_before = 0.0  # what the checkpoint resumed from had already taken
        self.seconds_counted_from = 0  # the step that count starts at (not 0: resumed from a checkpoint without it)
        self._run_started = None
        torch.manual_seed(cfg.seed)

    # -- data position ----------------------------------------------------------------------------
    def _warmup_step(self) -> bool:
        """Whether this step's batches come from the warm-up data: a pure function of the step."""
        cfg = self.cfg
        if self.warmup_set is None or self.step < cfg.text_steps:
            return False
        done = cfg.text_steps + cfg.warmup_data_steps
        if self.step < done:
            return True
        if not cfg.warmup_data_mix:
            return False
        progress = (self.step - done) / max(1, cfg.steps - done)
        return random.Random(f"glm4v-mix/{cfg.seed}/{self.step}").random() < cfg.warmup_data_mix * (1 - progress)

    def _next_samples(self, micro: int = 0) -> list:
        # curriculum batches are a pure function of the step, so a resumed run replays them
        k = self.step * self.cfg.grad_accum + micro
        if self.text_set is not None and self.step < self.cfg.text_steps:
            return [self.text_set[i] for i in self.text_order[k % len(self.text_order)]]
        if self._warmup_step():
            return [self.warmup_set[i] for i in self.warmup_order[k % len(self.warmup_order)]]
        order = self._order()
        if self.batch_in_epoch >= len(order):
            self.epoch += 1
            self.batch_in_epoch = 0
            order = self._order()
        indices = order[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return [self.train_set[i] for i in indices]

    def _order(self):
        if getattr(self, "_order_epoch", None) != self.epoch:
            self._order_cache = batch_order(self.train_set, self.cfg.batch_size, self.cfg.seed, self.epoch,
                                            self.cfg.group_by_length)
            self._order_epoch = self.epoch
        return self._order_cache

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        name = f"step-{self.step:08d}"
        target = self.checkpoints / name
        tensors, meta = _optimizer_tensors(self.optimizer)
        state = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "optimizer": meta, "config": asdict(self.cfg), "lora": self.lora, "history": self.history,
            "train_seconds": round(self.train_seconds(), 1), "train_seconds_from_step": self.seconds_counted_from,
        }
        with atomic_folder(target) as tmp:
            if self.lora:
                from glm4v.train.lora import save_adapter

                save_adapter(self.model, tmp, base_model=str(self.source_folder))
            else:
                # fp32 (the training dtype): a resumed run must continue from the exact weights
                copy_files(MODEL_FILES, self.source_folder, tmp)
                save_weights(model_tensors(self.model, None), tmp)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        write_pointer(self.checkpoints, name)
        self._prune()
        return target

    def _prune(self) -> None:
        import shutil

        done = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, path=None) -> bool:
        """Continue from ``path`` or the latest checkpoint of the output folder; False if there is none."""
        from glm4v.weights import SafetensorsFile

        path = Path(path) if path else latest_checkpoint(self.out)
        if path is None:
            return False
        state = json.loads((path / "trainer_state.json").read_text())
        if bool(state.get("lora")) != self.lora:
            raise CheckpointError(f"{path}: checkpoint is {'a LoRA' if state.get('lora') else 'a full'} run, this run is not")
        with torch.no_grad():
            if self.lora:
                from glm4v.train.lora import ADAPTER_WEIGHTS, adapter_state_dict

                shard = SafetensorsFile(path / ADAPTER_WEIGHTS)
                for key, target in adapter_state_dict(self.model).items():
                    target.copy_(shard.tensor(key))
                shard.close()
            else:
                from glm4v.weights import checkpoint_files

                files = checkpoint_files(path)
                opened = {p: SafetensorsFile(p) for p in set(files.values())}
                own = self.model.state_dict()
                for name, file in files.items():
                    if name in own:
                        own[name].copy_(opened[file].tensor(name))
                for f in opened.values():
                    f.close()
        opt = SafetensorsFile(path / "optimizer.safetensors")
        tensors = {k: opt.tensor(k).clone() for k in opt.keys()}
        opt.close()
        torch.set_rng_state(tensors.pop("rng.torch"))
        _load_optimizer(self.optimizer, tensors, state["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = state.get("history", [])
        if "train_seconds" in state:
            self.seconds_before = float(state["train_seconds"])
            self.seconds_counted_from = int(state.get("train_seconds_from_step", 0))
        else:  # written before checkpoints kept the time: only this run's steps can be counted
            self.seconds_before, self.seconds_counted_from = 0.0, self.step
        self.log(f"resumed from {path} at step {self.step}")
        return True

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> dict:
        if self.val_set is None:
            return {}
        model = self.model
        model.eval()
        total, n, correct, spread = 0.0, 0, 0, None
        with torch.no_grad():
            order = batch_order(self.val_set, self.cfg.batch_size, seed=0, epoch=0)[: self.cfg.val_batches]
            for indices in order:
                batch = collate([self.val_set[i] for i in indices], self.tokenizer.pad_token_id, "right")
                loss, stats = forward_loss(model, batch, self.cfg.autocast)
                total += loss.item() * stats["targets"]
                n += stats["targets"]
                correct += stats["correct"]
                if spread is None and batch["pixel_values"] is not None and len(indices) > 1:
                    spread = image_spread(model, batch["pixel_values"])
        result = {"val_loss": total / max(1, n), "val_token_acc": correct / max(1, n)}
        if spread is not None:
            result["image_spread"] = round(spread, 4)
        if self.cfg.val_generate:
            from glm4v.eval.synth import evaluate_records

            report = evaluate_records(model, self.tokenizer, self.val_set.records[: self.cfg.val_generate],
                                      batch_size=64)
            result["val_accuracy"] = report["overall"]
            result["val_skills"] = report["skills"]
        model.train()
        return result

    def train_seconds(self) -> float:
        """Training time of the steps so far (from ``seconds_counted_from``), this run's included."""
        running = 0.0 if self._run_started is None else time.perf_counter() - self._run_started
        return self.seconds_before + running

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm import tqdm

        cfg, model = self.cfg, self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in params)
        self.log(f"training {n_train / 1e6:.2f}M parameters on {len(self.train_set)} conversations, "
                 f"steps {self.step}->{cfg.steps}, batch {cfg.batch_size}x{cfg.grad_accum}, autocast={cfg.autocast}")
        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1 if tty else 60, disable=False)
        smoothed, tokens_seen, started = None, 0, time.perf_counter()
        self._run_started = started
        last_log = {}
        while self.step < cfg.steps:
            lr = lr_at(self.step, cfg)
            hold_vision = self.step < cfg.vision_freeze_steps
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0 if hold_vision and group.get("vision") else lr * group.get("lr_scale", 1.0)
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                samples = self._next_samples(micro)
                total_targets = sum(count_targets(s) for s in samples)
                for piece in split_by_length(samples, cfg.length_pieces):
                    batch = collate(piece, self.tokenizer.pad_token_id, "right")
                    loss, stats = forward_loss(model, batch, cfg.autocast)
                    share = stats["targets"] / total_targets / cfg.grad_accum
                    (loss * share).backward()
                    step_loss += loss.item() * share
                    step_tokens += stats["tokens"]
            if not math.isfinite(step_loss):
                raise RuntimeError(f"loss is {step_loss} at step {self.step}; lower the learning rate")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens_seen += step_tokens
            smoothed = step_loss if smoothed is None else 0.95 * smoothed + 0.05 * step_loss
            rate = tokens_seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{rate:.0f}", lr=f"{lr:.1e}", refresh=False)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - started
                eta = elapsed / max(1, self.step - (bar.initial or 0)) * (cfg.steps - self.step)
                last_log = {"step": self.step, "loss": round(smoothed, 4), "lr": lr, "grad_norm": round(float(grad_norm), 3),
                            "tokens_per_s": round(rate), "elapsed_s": round(elapsed), "eta_s": round(eta)}
                bar.write(json.dumps(last_log), file=sys.stderr)
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                t = time.perf_counter()
                result = self.validate()
                if result:
                    result = {"step": self.step, **result, "seconds": round(time.perf_counter() - t, 1)}
                    self.history.append(result)
                    bar.write(json.dumps(result), file=sys.stderr)
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                self.save_checkpoint()
        bar.close()
        wall = time.perf_counter() - started
        total = self.train_seconds()
        self.seconds_before, self._run_started = total, None
        if total > wall + 0.05:
            self.log(f"steps {self.seconds_counted_from}->{self.step} took {total / 60:.1f} min of training in all "
                     f"(this run {wall / 60:.1f} min; the rest before a resume)")
        return {"step": self.step, "train": last_log, "history": self.history, "wall_s": round(wall, 1),
                "train_seconds": round(total, 1), "train_seconds_from_step": self.seconds_counted_from}

    def export(self, folder, dtype: torch.dtype | None = torch.bfloat16, merge: bool = False) -> Path:
        """The trained model as a loadable folder (or the LoRA adapter alone unless ``merge``)."""
        folder = Path(folder)
        if self.lora and not merge:
            from glm4v.train.lora import save_adapter

            with atomic_folder(folder) as tmp:
                save_adapter(self.model, tmp, base_model=str(self.source_folder))
            return folder
        if self.lora:
            from glm4v.train.lora import merge_lora

            merge_lora(self.model)
            self.lora = False
        save_model_folder(self.model, folder, self.source_folder, dtype)
        return folder


def check_resume_config(out_dir, cfg: TrainConfig) -> None:
    """Refuse to resume with a different batch size or seed: the data order would silently change."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return
    saved = json.loads((path / "trainer_state.json").read_text())["config"]
    for key in ("batch_size", "grad_accum", "seed", "train_data"):
        if key == "train_data" and same_file(saved.get(key), cfg.train_data):
            continue  # the same file, once named relative to the working folder and once absolute
        if saved.get(key) != getattr(cfg, key):
            raise InputError(f"cannot resume {path}: it was trained with {key}={saved.get(key)!r}, now {getattr(cfg, key)!r}")


def same_file(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()
