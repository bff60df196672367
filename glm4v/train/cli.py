"""``glm4v train``: from scratch (a recipe or a config), or fine-tune a checkpoint, fully or with LoRA.

    glm4v train --recipe embedded                       # the shipped model, data and all (stages 1, 2, 2b-2j)
    glm4v train --config cfg.json --tokenizer DIR --data train.jsonl --val-data val.jsonl --out runs/x
    glm4v train --init /models/glm-4v-9b --lora --data mine.jsonl --out runs/lora --dtype bfloat16 --autocast
    glm4v train ... --resume                            # continue after a crash or a kill
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from glm4v.errors import InputError
from glm4v.train.trainer import MODEL_FILES, TrainConfig

DEFAULTS = TrainConfig(out_dir="", train_data="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("what to train")
    src.add_argument("--recipe", default=None, help="a named recipe: 'embedded' (the shipped model) or 'smoke'")
    src.add_argument("--config", default=None, help="config.json of a model to train from scratch")
    src.add_argument("--tokenizer", default=None, help="folder with tokenizer.model + tokenizer_config.json (with --config)")
    src.add_argument("--init", default=None, help="model folder to fine-tune (official layout; the 9B included)")
    src.add_argument("--dtype", default="float32", help="weight dtype of --init (bfloat16 halves the memory of a frozen base)")
    src.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (where the model trains)")
    src.add_argument("--freeze-vision", action="store_true", default=None,
                     help="freeze the ViT (the conv + GLU adapter still train); with --lora: no adapters in the vision tower")
    src.add_argument("--freeze-vision-adapter", action="store_true", default=None,
                     help="with --freeze-vision: freeze the conv + GLU adapter too (all of the vision side)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, help="training JSONL (official format: {\"messages\": [...]})")
    data.add_argument("--val-data", default=None, help="validation JSONL")
    data.add_argument("--out", default=None, help="output folder (checkpoints, logs, final model)")
    data.add_argument("--export", default=None, help="also write the final model here (e.g. glm4v/assets/embedded)")
    data.add_argument("--max-length", type=int, default=None, help="truncate conversations to this many tokens")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    lora.add_argument("--lora-rank", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=32.0)
    lora.add_argument("--lora-dropout", type=float, default=0.1)
    lora.add_argument("--lora-target", nargs="+", default=["query_key_value"],
                      help="module names to adapt (suffix match, as PEFT); add linear_proj for the vision adapter")
    lora.add_argument("--merge", action="store_true", help="export the model with the adapter merged into the weights")

    hp = parser.add_argument_group("optimisation")
    hp.add_argument("--steps", type=int, default=None)
    hp.add_argument("--batch-size", type=int, default=None)
    hp.add_argument("--grad-accum", type=int, default=None)
    hp.add_argument("--lr", type=float, default=None)
    hp.add_argument("--min-lr-ratio", type=float, default=None)
    hp.add_argument("--warmup-steps", type=int, default=None)
    hp.add_argument("--weight-decay", type=float, default=None)
    hp.add_argument("--grad-clip", type=float, default=None)
    hp.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: the recipe's choice, on only where the device has bf16 units; the embedded recipe: off)")
    hp.add_argument("--eval-every", type=int, default=None)
    hp.add_argument("--save-every", type=int, default=None)
    hp.add_argument("--val-generate", type=int, default=None, help="validation conversations answered for accuracy")
    hp.add_argument("--seed", type=int, default=None)
    hp.add_argument("--vision-lr-scale", type=float, default=None, help="learning-rate factor of the vision encoder")
    hp.add_argument("--group-by-length", type=int, default=None, metavar="K",
                    help="batch conversations of similar length (windows of K batches; 0 = random batches)")
    hp.add_argument("--length-pieces", type=int, default=None, metavar="K",
                    help="run each batch as K pieces of similar length (same update, less padding)")
    hp.add_argument("--text-steps", type=int, default=None,
                    help="first train this many steps on the conversations with their images left out")
    hp.add_argument("--warmup-data", default=None, help="JSONL whose batches come first (a curriculum)")
    hp.add_argument("--warmup-data-steps", type=int, default=None, help="how many steps use --warmup-data")
    hp.add_argument("--warmup-data-mix", type=float, default=None, metavar="P",
                    help="after those steps, draw a step from --warmup-data with probability P decaying to 0")
    hp.add_argument("--vision-freeze-steps", type=int, default=None,
                    help="keep the vision tower and adapter at their initial weights for this many steps")
    hp.add_argument("--vision-pretrain-steps", type=int, default=None,
                    help="(--recipe) steps of vision pre-training on the pictures' scene labels before the conversations")
    hp.add_argument("--restarts", type=int, default=None, metavar="K",
                    help="(--recipe) run only the first K of the recipe's warm restarts (0: stop after stage 2)")
    hp.add_argument("--save-dtype", default=None, help="dtype of the exported model (bfloat16, float32)")
    hp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    hp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def _train_config(args, **base) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in base.items() if k in names}
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    cfg = TrainConfig(**values)
    for key in ("steps", "batch_size", "grad_accum"):
        if getattr(cfg, key) < 1:
            raise InputError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if not cfg.lr > 0:
        raise InputError(f"--lr must be > 0, got {cfg.lr}")
    return cfg


def _dtype(name: str) -> torch.dtype:
    from glm4v.engine import resolve_dtype

    return resolve_dtype(name)


def bf16_helps(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: not on a CPU that emulates bf16 (~8x slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from glm4v.kernels import cpu_has_native_bf16

    return device.type == "cpu" and cpu_has_native_bf16()


def run(args) -> int:
    from glm4v.engine import resolve_device

    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [flag for flag in ("recipe", "config", "init") if getattr(args, flag)]
    if len(chosen) != 1:
        raise InputError("choose exactly one of --recipe, --config (from scratch) or --init (fine-tune)")
    if args.recipe:
        return run_recipe(args)
    if not args.data or not args.out:
        raise InputError("--data and --out are required with --config / --init")
    return run_custom(args)


def run_recipe(args) -> int:
    from glm4v.train.recipes import default_tokenizer_source, get_recipe, write_model_folder
    from glm4v.train.synth import write_dataset
    from glm4v.train.trainer import Trainer, check_resume_config, new_model

    recipe = get_recipe(args.recipe)
    n_restarts = len(recipe.restarts) if args.restarts is None else args.restarts
    if not 0 <= n_restarts <= len(recipe.restarts):
        raise InputError(f"--restarts must be 0..{len(recipe.restarts)} for recipe {recipe.name!r}, got {n_restarts}")
    torch.set_num_threads(args.threads or recipe.threads)
    out = Path(args.out or f"runs/{recipe.name}")
    data_dir = out / "data"
    started = time.perf_counter()
    marker = data_dir / "synth.json"
    wanted = {"seed": recipe.data_seed, "sizes": recipe.data_sizes, "extra_turns": recipe.extra_turns}
    if not marker.exists() or json.loads(marker.read_text()) != wanted:
        print(f"generating the synthetic data set in {data_dir} ...", flush=True)
        write_dataset(data_dir, recipe.data_sizes, recipe.data_seed, progress=True, extra_turns=recipe.extra_turns)
    base = out / "base"
    if not (base / "config.json").exists() or not args.resume:
        write_model_folder(base, recipe.dims, args.tokenizer or default_tokenizer_source())
    cfg = _train_config(
        args, **{k: v for k, v in recipe.to_dict().items() if k != "dims"},
        out_dir=str(out), train_data=str(data_dir / "train.jsonl"), val_data=str(data_dir / "val.jsonl"),
        warmup_data=str(data_dir / "easy.jsonl") if "easy" in recipe.data_sizes else None,
        max_length=recipe.dims.seq_length,
    )
    if args.autocast is None and cfg.autocast and not bf16_helps(args.device):
        cfg.autocast = False
        print(f"bf16 autocast off: {args.device} has no native bf16 matmul (it would be slower than float32)", flush=True)
    if args.resume:
        check_resume_config(out, cfg)
    from glm4v.tokenizer import load_tokenizer

    final = out / "model"
    result = finished_stage(out, cfg, "stage 2") if args.resume else None
    if result is not None:
        stage1 = result.get("vision_pretrain")
    else:
        model = new_model(base, cfg.seed).to(args.device)
        vision_steps = recipe.vision_pretrain_steps if args.vision_pretrain_steps is None else args.vision_pretrain_steps
        stage1 = None
        if vision_steps:
            stage1 = _vision_stage(model, out, data_dir, recipe, vision_steps, resume=args.resume)
        trainer = Trainer(model, load_tokenizer(base), base, cfg)
        if args.resume:
            trainer.resume()
        result = trainer.train()
        if stage1 is not None:
            result["vision_pretrain"] = stage1
        trainer.export(final, _dtype(cfg.save_dtype))
        record_stage(out, cfg, result)
        del trainer, model
    done = []
    for k, restart in enumerate(recipe.restarts[:n_restarts]):
        stage_out, stage_cfg = out / restart_folder(k), restart_config(cfg, restart, out / restart_folder(k))
        name = f"stage {restart_label(k)}"
        stage_result = finished_stage(stage_out, stage_cfg, name) if args.resume else None
        if stage_result is None:
            if not final.is_dir():
                raise InputError(f"{name} trains from {final}, which is gone (only the latest finished stage's "
                                 "model has to be kept when a run moves to another machine)")
            print(f"warm restart {k + 1}/{n_restarts} from {final}: {restart.steps} steps, peak lr {restart.lr:g}, "
                  f"seed {restart.seed} -> {stage_out}", flush=True)
            final, stage_result = _warm_restart(args, final, stage_cfg)
            record_stage(stage_out, stage_cfg, stage_result)
        else:
            final = stage_out / "model"
        done.append(stage_result)
    if done:
        result["restarts"] = done
    print(stage_times(stage1, result, done), flush=True)
    _finish(args, final, out, result, started, evaluate=(recipe.data_seed, recipe.data_sizes["test"]))
    return 0


def stage_times(stage1: dict | None, stage2: dict, restarts: list[dict]) -> str:
    """One line with each stage's training time, across the kills and resumes of a long recipe."""
    parts, total, partial = [], 0.0, False
    stages = [("stage 1", stage1)] if stage1 else []
    stages += [("stage 2", stage2)] + [(restart_label(k), r) for k, r in enumerate(restarts)]
    for name, r in stages:
        seconds = r.get("train_seconds", r.get("wall_s", 0.0))
        counted_from = r.get("train_seconds_from_step", 0)
        partial |= counted_from > 0
        total += seconds
        parts.append(f"{name} {seconds / 60:.1f}" + (f" (from step {counted_from})" if counted_from else ""))
    note = "; a stage counted from a later step resumed a checkpoint that did not keep the time" if partial else ""
    return f"training time (min, across resumes): {', '.join(parts)}; {total / 60:.1f} in all{note}"


# Written next to a stage's checkpoints once its model is exported. With it, the stage's
# checkpoints (its optimizer state: ~6x the model) can go: a recipe of many hours can move to
# another machine carrying the latest finished stage's model folder and the small records only.
STAGE_RECORD = "stage.json"
# where the run lives may change between machines; what it trains may not
_PATH_SETTINGS = ("out_dir", "train_data", "val_data", "warmup_data")


def stage_settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _PATH_SETTINGS}


def record_stage(stage_dir: Path, cfg: TrainConfig, result: dict) -> None:
    tmp = stage_dir / f".{STAGE_RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"settings": stage_settings(cfg), "result": result}, indent=1) + "\n")
    os.replace(tmp, stage_dir / STAGE_RECORD)


def finished_stage(stage_dir: Path, cfg: TrainConfig, name: str) -> dict | None:
    """The recorded result of a stage that finished in ``stage_dir`` and whose checkpoints are gone.

    None where the stage has checkpoints (it resumes from them, as every stage always has) or no
    record (it has not finished). A record of other settings is refused, as a checkpoint of
    another batch size or seed is.
    """
    from glm4v.train.trainer import latest_checkpoint

    record_file = stage_dir / STAGE_RECORD
    if latest_checkpoint(stage_dir) is not None or not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    now = json.loads(json.dumps(stage_settings(cfg)))  # as the record holds them (tuples as lists)
    changed = [f"{k}={record['settings'].get(k)!r} (now {v!r})" for k, v in now.items() if record["settings"].get(k) != v]
    if changed:
        raise InputError(f"cannot resume {stage_dir}: {name} finished with {', '.join(changed)}")
    print(f"{name}: finished before ({record_file})", flush=True)
    return record["result"]


def restart_label(k: int) -> str:
    """2b, 2c, ...: the k-th warm restart's name in the logs and docs."""
    return f"2{chr(ord('b') + k)}"


def restart_folder(k: int) -> str:
    """OUT/restart, OUT/restart2, ...: where the k-th warm restart of a recipe trains."""
    return "restart" if k == 0 else f"restart{k + 1}"


def restart_config(stage2: TrainConfig, restart, out: Path) -> TrainConfig:
    """Stage 2's settings with the restart's steps, peak learning rate, warm-up and data order; no curriculum."""
    return replace(stage2, out_dir=str(out), steps=restart.steps, lr=restart.lr, seed=restart.seed,
                   warmup_steps=restart.warmup_steps, text_steps=0, warmup_data=None, warmup_data_steps=0,
                   warmup_data_mix=0.0, vision_freeze_steps=0)


def _warm_restart(args, init: Path, cfg: TrainConfig) -> tuple[Path, dict]:
    """Train from the exported model ``init`` (loaded as float32, as `glm4v train --init` does)."""
    import glm4v

    pipe = glm4v.load(init, dtype="float32", device=args.device)
    pipe.model.requires_grad_(True)
    return _train_and_export(pipe.model, pipe.tokenizer, init, cfg, args.resume, Path(cfg.out_dir) / "model")


def _vision_stage(model, out: Path, data_dir: Path, recipe, steps: int, resume: bool) -> dict:
    """Stage 1: vision pre-training, or (resuming) its saved result."""
    from glm4v.train.vision_pretrain import (VISION_WEIGHTS, PretrainConfig, SceneData, load_vision,
                                             pretrain_vision, save_vision)

    weights, summary_file = out / VISION_WEIGHTS, out / "vision_pretrain.json"
    if resume and weights.exists() and summary_file.exists():
        load_vision(model, weights)
        print(f"vision pre-training: loaded {weights}", flush=True)
        return json.loads(summary_file.read_text())
    size = model.config.vision_config.image_size
    print(f"vision pre-training: {steps} steps on the training pictures' scene labels", flush=True)
    cfg = PretrainConfig(steps=steps, batch_size=recipe.vision_pretrain_batch, lr=recipe.vision_pretrain_lr,
                         seed=recipe.seed)
    summary = pretrain_vision(model, SceneData(data_dir / "train.jsonl", size), SceneData(data_dir / "val.jsonl", size),
                              cfg, log=lambda msg: print(msg, flush=True))
    save_vision(model, weights)
    summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run_custom(args) -> int:
    from glm4v.tokenizer import load_tokenizer
    from glm4v.train.trainer import new_model

    out = Path(args.out)
    started = time.perf_counter()
    if args.config:
        config_path = Path(args.config)
        if config_path.is_dir():
            config_path = config_path / "config.json"
        if not config_path.is_file():
            raise InputError(f"{config_path}: no such config file")
        tok_dir = Path(args.tokenizer) if args.tokenizer else config_path.parent
        base = out / "base"
        base.mkdir(parents=True, exist_ok=True)
        shutil.copy2(config_path, base / "config.json")
        for name in MODEL_FILES[1:]:
            for folder in (tok_dir, config_path.parent):
                if (folder / name).exists():
                    shutil.copy2(folder / name, base / name)
                    break
        if not (base / "tokenizer.model").exists():
            raise InputError(f"no tokenizer.model in {tok_dir}; pass --tokenizer")
        cfg = _train_config(args, out_dir=str(out), train_data=args.data, val_data=args.val_data)
        model = new_model(base, cfg.seed).to(args.device)
        tokenizer = load_tokenizer(base)
        from glm4v.engine import check_tokenizer_matches

        check_tokenizer_matches(model.config, tokenizer, base)
    else:
        import glm4v

        base = Path(args.init)
        cfg = _train_config(args, out_dir=str(out), train_data=args.data, val_data=args.val_data, val_generate=0)
        pipe = glm4v.load(base, dtype=args.dtype, device=args.device)
        model, tokenizer = pipe.model, pipe.tokenizer
        if not args.lora:
            model.requires_grad_(True)
    lora = bool(args.lora)
    if lora:
        from glm4v.train.lora import LoRAConfig, apply_lora

        lcfg = LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, list(args.lora_target),
                          exclude_prefixes=["transformer.vision.transformer", "transformer.vision.patch_embedding"]
                          if args.freeze_vision else [])
        wrapped = apply_lora(model, lcfg)
        print(f"LoRA r={lcfg.r} alpha={lcfg.alpha} on {len(wrapped)} layers", flush=True)
    final, result = _train_and_export(model, tokenizer, base, cfg, args.resume,
                                      out / ("model" if not lora or args.merge else "adapter"),
                                      lora=lora, merge=args.merge)
    _finish(args, final, out, result, started, evaluate=None)
    return 0


def _train_and_export(model, tokenizer, source: Path, cfg: TrainConfig, resume: bool, folder: Path,
                      lora: bool = False, merge: bool = False) -> tuple[Path, dict]:
    """Train ``model`` (continuing cfg.out_dir's latest checkpoint if ``resume``) and export it to ``folder``."""
    from glm4v.train.trainer import Trainer, check_resume_config

    if resume:
        check_resume_config(cfg.out_dir, cfg)
    trainer = Trainer(model, tokenizer, source, cfg, lora=lora)
    if resume:
        trainer.resume()
    result = trainer.train()
    return trainer.export(folder, _dtype(cfg.save_dtype), merge=merge), result


def _finish(args, final: Path, out: Path, result: dict, started: float, evaluate: tuple | None) -> None:
    """Summary file, final evaluation on the synthetic test split (``evaluate`` = (seed, n)), export."""
    # the whole command's time; stage 2's own "wall_s" (from Trainer.train) must not replace it
    summary = {"final": str(final), **result, "wall_s": round(time.perf_counter() - started, 1)}
    if evaluate is not None:
        from glm4v.eval.synth import format_table

        report = evaluate_model(final, *evaluate)
        summary["eval"] = {k: report[k] for k in ("overall", "skills", "languages", "n")}
        print(format_table(report), flush=True)
    if args.export:
        export = Path(args.export)
        from glm4v.weights import atomic_folder

        with atomic_folder(export) as tmp:
            for p in final.iterdir():
                shutil.copy2(p, tmp / p.name)
        summary["exported"] = str(export)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['wall_s'] / 60:.1f} min: {final}", flush=True)


def evaluate_model(folder, seed: int, n: int) -> dict:
    import glm4v
    from glm4v.eval.synth import answer_items, items_from_examples, score_items
    from glm4v.train.synth import generate_test_split

    pipe = glm4v.load(folder)
    items = items_from_examples(generate_test_split(seed, n))
    return score_items(items, answer_items(pipe.model, pipe.tokenizer, items))
