"""Training: loss targets, collation, the loss itself, learning, checkpoints, kill and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import glm4v
from glm4v.errors import InputError
from glm4v.tokenizer import load_tokenizer
from glm4v.train import synth
from glm4v.train.data import IGNORE, ConversationDataset, collate, encode_for_training, read_jsonl
from glm4v.train.recipes import RECIPES, config_dict
from glm4v.train.trainer import (
    TrainConfig, Trainer, forward_loss, latest_checkpoint, lr_at, new_model, sequence_positions,
)
from tests.conftest import IMAGES_DIR, REAL_TOKENIZER_DIR, smoke_run_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A smoke-sized model folder (GLM-4 vocabulary prefix of 2,000 ranks) and a little data."""
    return smoke_run_folder(tmp_path_factory.mktemp("train"), {"val": 9, "train": 32}, seed=2)


def test_model_folder_has_the_official_config_keys_and_a_vocabulary_prefix(small):
    official = json.loads((REPO / "tests/fixtures/official_config.json").read_text())
    ours = json.loads((small / "base/config.json").read_text())
    assert list(ours) == list(official) and list(ours["vision_config"]) == list(official["vision_config"])
    real = (REAL_TOKENIZER_DIR / "tokenizer.model").read_bytes().splitlines()
    prefix = (small / "base/tokenizer.model").read_bytes().splitlines()
    assert prefix == real[:2000]
    tok = load_tokenizer(small / "base")
    assert tok.special_tokens["<|endoftext|>"] == 2000 and tok.special_tokens["<|end_of_video|>"] == 2013
    assert ours["eos_token_id"] == [2000, 2007, 2009] and ours["padded_vocab_size"] == 2048
    # the same prefix as the golden tiny checkpoint's tokenizer
    tiny = (REPO / "tests/fixtures/tiny/tokenizer.model").read_bytes().splitlines()
    assert prefix == tiny
    assert config_dict(RECIPES["embedded"].dims)["vision_config"]["image_size"] == 224


def test_loss_targets_are_the_assistant_turns_and_the_token_that_ends_them(small):
    tok = load_tokenizer(small / "base")
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the circle?", "image": "x.png"},
        {"role": "assistant", "content": "The circle is red."},
        {"role": "user", "content": "和正方形呢？"},
        {"role": "assistant", "content": "蓝色。"},
    ]
    ids, targets = encode_for_training(tok, conv)
    assert ids == tok.encode_chat(conv, add_generation_prompt=False)[0] + [tok.user_token_id]
    expected = [IGNORE] * len(ids)
    for k, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        start = len(tok.encode_chat(conv[:k], add_generation_prompt=False)[0])
        end = len(tok.encode_chat(conv[: k + 1], add_generation_prompt=False)[0])
        assert ids[start] == tok.assistant_token_id
        for i in range(start + 1, end + 1):  # "\n" + content, then the next <|user|>
            expected[i] = ids[i]
        assert ids[end] == tok.user_token_id
        assert tok.decode([ids[i] for i in range(start + 1, end)]) == "\n" + m["content"]
    assert targets == expected
    image_at = ids.index(tok.boi_token_id)
    assert all(t == IGNORE for t in targets[: image_at + 3])


def test_collate_pads_right_for_training_and_left_for_generation(small):
    tok = load_tokenizer(small / "base")
    ds = ConversationDataset(small / "data/train.jsonl", tok)
    samples = [ds[0], ds[1], ds[2]]
    lengths = [len(s.input_ids) for s in samples]
    right = collate(samples, tok.pad_token_id, "right")
    left = collate(samples, tok.pad_token_id, "left")
    width = max(lengths)
    assert right["input_ids"].shape == (3, width) and right["pixel_values"].shape == (3, 3, 112, 112)
    for row, n in enumerate(lengths):
        assert right["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert left["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        assert right["input_ids"][row, :n].tolist() == samples[row].input_ids
        assert left["input_ids"][row, width - n:].tolist() == samples[row].input_ids
        assert (right["targets"][row, n:] == IGNORE).all() and (left["targets"][row, : width - n] == IGNORE).all()
    with pytest.raises(ValueError):
        collate(samples, tok.pad_token_id, "middle")


def test_loss_equals_cross_entropy_of_the_full_logits_after_the_image_splice(small):
    torch.manual_seed(0)
    tok = load_tokenizer(small / "base")
    model = new_model(small / "base", seed=1).eval()
    ds = ConversationDataset(small / "data/train.jsonl", tok)
    batch = collate([ds[i] for i in range(4)], tok.pad_token_id, "right")
    with torch.no_grad():
        loss, stats = forward_loss(model, batch)
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"]).logits  # [B, L+P-1, V]
    ids, targets = batch["input_ids"], batch["targets"]
    P = model.config.num_image_tokens
    manual = []
    for b in range(ids.shape[0]):
        boi = ids[b].tolist().index(tok.boi_token_id)
        for i in range(1, ids.shape[1]):
            if targets[b, i] != IGNORE:
                pos = i - 1 if i - 1 <= boi else i - 1 + P - 1  # sequence row of token i-1
                manual.append(F.cross_entropy(logits[b, pos][None], targets[b, i][None]))
    assert stats["targets"] == len(manual)
    assert torch.allclose(loss, torch.stack(manual).mean(), atol=1e-5)
    positions = sequence_positions(ids, tok.boi_token_id, P + 2)
    assert positions[0, : boi + 2].tolist() == list(range(boi + 2))
    assert positions[0, boi + 2].item() == boi + 2 + P - 1


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(out_dir="", train_data="", steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_a_few_steps_lower_the_loss_and_the_export_loads(small, tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer(small / "base")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(small / "data/train.jsonl"),
                      val_data=str(small / "data/val.jsonl"), steps=30, batch_size=8, lr=3e-3, warmup_steps=3,
                      eval_every=30, save_every=0, val_generate=9, log_every=10)
    model = new_model(small / "base", seed=0)
    trainer = Trainer(model, tok, small / "base", cfg, log=lambda msg: None)
    batch = collate([trainer.train_set[i] for i in range(8)], tok.pad_token_id)
    with torch.no_grad():
        before = forward_loss(model.eval(), batch)[0].item()
    result = trainer.train()
    with torch.no_grad():
        after = forward_loss(model.eval(), batch)[0].item()
    assert after < before - 1.5, (before, after)
    assert result["history"][-1]["step"] == 30 and "val_accuracy" in result["history"][-1]
    folder = trainer.export(tmp_path / "model", torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    pipe = glm4v.load(folder)
    answer = pipe.chat([{"role": "user", "image": str(IMAGES_DIR / "img_c_112x112.png"), "content": "What colour is the circle?"}],
                       max_new_tokens=4)
    assert isinstance(answer, str)


def test_bad_training_data_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        read_jsonl(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a", "image": "1.png"},
                                             {"role": "assistant", "content": "b", "image": "2.png"}]}) + "\n")
    with pytest.raises(InputError, match="one image"):
        read_jsonl(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(InputError, match="no assistant"):
        read_jsonl(path)
    with pytest.raises(InputError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


def _train_cmd(small, out, steps):
    return [sys.executable, "-m", "glm4v.cli", "train", "--config", str(small / "base/config.json"),
            "--data", str(small / "data/train.jsonl"), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--save-every", "3", "--eval-every", "0", "--warmup-steps", "5",
            "--threads", "1", "--save-dtype", "float32"]


def test_sigkill_then_resume_continues_exactly_where_it_stopped(small, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steps = 24
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(small, killed, steps), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if pointer.exists() and int(pointer.read_text().split("-")[1]) >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = latest_checkpoint(killed)
    before = json.loads((stopped_at / "trainer_state.json").read_text())
    step = before["step"]
    assert 6 <= step < steps
    saved = load_file(str(stopped_at / "optimizer.safetensors"))
    assert all(v.item() == step for k, v in saved.items() if k.endswith(".step"))

    resumed = subprocess.run(_train_cmd(small, killed, steps) + ["--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stderr
    # the training time carries on across the kill: the killed run's kept steps plus the resumed run's
    after = json.loads((latest_checkpoint(killed) / "trainer_state.json").read_text())
    assert before["train_seconds"] > 0 and after["train_seconds"] > before["train_seconds"]
    assert after["train_seconds_from_step"] == 0
    assert f"steps 0->{steps} took" in resumed.stderr

    straight = tmp_path / "straight"
    done = subprocess.run(_train_cmd(small, straight, steps), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = latest_checkpoint(killed), latest_checkpoint(straight)
    assert a.name == b.name == f"step-{steps:08d}"
    for name in ("model-00001-of-00001.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k} differs after resume"
    # the exported models are identical too
    ma, mb = load_file(str(killed / "model/model-00001-of-00001.safetensors")), load_file(str(straight / "model/model-00001-of-00001.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_resume_refuses_a_different_batch_size(small, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "run"
    subprocess.run(_train_cmd(small, out, 3), cwd=REPO, env=env, capture_output=True, timeout=300, check=True)
    cmd = _train_cmd(small, out, 6) + ["--resume"]
    cmd[cmd.index("--batch-size") + 1] = "8"
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "batch_size" in r.stderr


def test_batch_order_covers_every_conversation_once_and_is_reproducible(small):
    from glm4v.train.data import batch_order

    tok = load_tokenizer(small / "base")
    ds = ConversationDataset(small / "data/train.jsonl", tok)
    for group in (0, 2):
        order = batch_order(ds, 5, seed=1, epoch=0, group_by_length=group)
        assert sorted(i for b in order for i in b) == list(range(len(ds)))
        assert order == batch_order(ds, 5, seed=1, epoch=0, group_by_length=group)
        assert order != batch_order(ds, 5, seed=1, epoch=1, group_by_length=group)
    # one window holds everything: each batch is a run of the length-sorted conversations
    grouped = batch_order(ds, 5, seed=1, epoch=0, group_by_length=100)
    spans = sorted((min(ds.length(i) for i in b), max(ds.length(i) for i in b)) for b in grouped)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))


def test_curriculum_batches_come_from_the_warmup_data_first(small, tmp_path):
    from glm4v.train.data import batch_order

    synth.write_dataset(tmp_path / "easy", {"easy": 8}, seed=3)
    tok = load_tokenizer(small / "base")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(small / "data/train.jsonl"),
                      warmup_data=str(tmp_path / "easy/easy.jsonl"), warmup_data_steps=2, batch_size=4)
    trainer = Trainer(new_model(small / "base"), tok, small / "base", cfg, log=lambda m: None)
    warm = batch_order(trainer.warmup_set, 4, 0, 0)
    first = trainer._next_samples()
    assert [s.input_ids for s in first] == [trainer.warmup_set[i].input_ids for i in warm[0]]
    trainer.step = 2
    main = trainer._next_samples()
    expected = batch_order(trainer.train_set, 4, 0, 0)[0]
    assert [s.input_ids for s in main] == [trainer.train_set[i].input_ids for i in expected]
    assert trainer.batch_in_epoch == 1


def test_text_steps_train_on_the_conversations_without_their_images_first(small, tmp_path):
    synth.write_dataset(tmp_path / "easy", {"easy": 8}, seed=3)
    tok = load_tokenizer(small / "base")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(small / "data/train.jsonl"), text_steps=2,
                      warmup_data=str(tmp_path / "easy/easy.jsonl"), warmup_data_steps=2, batch_size=4)
    trainer = Trainer(new_model(small / "base"), tok, small / "base", cfg, log=lambda m: None)
    kinds = []
    for step in range(5):
        trainer.step = step
        samples = trainer._next_samples()
        kinds.append("text" if samples[0].pixels is None else "easy" if trainer._warmup_step() else "main")
        if kinds[-1] == "text":  # the same conversations, minus the image placeholder
            assert all(s.pixels is None and tok.boi_token_id not in s.input_ids for s in samples)
            assert all(any(t != IGNORE for t in s.targets) for s in samples)
    assert kinds == ["text", "text", "easy", "easy", "main"]
    assert trainer.batch_in_epoch == 1  # only the main step consumed the epoch's order


def test_warmup_data_keeps_a_decaying_share_of_the_steps_after_the_warmup(small, tmp_path):
    synth.write_dataset(tmp_path / "easy", {"easy": 8}, seed=3)
    tok = load_tokenizer(small / "base")

    def decisions(mix):
        cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(small / "data/train.jsonl"),
                          warmup_data=str(tmp_path / "easy/easy.jsonl"), warmup_data_steps=100,
                          warmup_data_mix=mix, steps=2100, batch_size=4)
        trainer = Trainer(new_model(small / "base"), tok, small / "base", cfg, log=lambda m: None)
        out = []
        for step in range(cfg.steps):
            trainer.step = step
            out.append(trainer._warmup_step())
        return out

    mixed = decisions(0.5)
    assert all(mixed[:100])  # the warm-up itself
    early, late = sum(mixed[100:600]) / 500, sum(mixed[1600:2100]) / 500
    assert 0.38 < early < 0.52 and late < 0.12, (early, late)  # expected ~0.44 and ~0.06
    assert mixed == decisions(0.5)  # a pure function of the step: a resumed run replays it
    assert not any(decisions(0.0)[100:])


def test_recipe_command_runs_end_to_end_and_keeps_autocast_off_where_bf16_is_emulated(tmp_path, monkeypatch, capsys):
    import glm4v.train.cli as train_cli
    from glm4v.cli import main

    monkeypatch.setattr(train_cli, "bf16_helps", lambda device: False)
    out = tmp_path / "smoke"
    code = main(["train", "--recipe", "smoke", "--out", str(out), "--steps", "4", "--eval-every", "0",
                 "--save-every", "2", "--export", str(tmp_path / "exported")])
    assert code == 0
    printed = capsys.readouterr()
    assert "bf16 autocast off" in printed.out
    assert "training time (min, across resumes): stage 1 " in printed.out and ", 2b " in printed.out
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["autocast"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["n"] == RECIPES["smoke"].data_sizes["test"]
    assert set(summary["eval"]["languages"]) == {"en", "zh"}
    # stage 2's model, then the recipe's warm restart trained from it, which is the final model
    (restart,) = RECIPES["smoke"].restarts
    assert summary["final"] == str(out / "restart" / "model") and len(summary["restarts"]) == 1
    restarted = json.loads((latest_checkpoint(out / "restart") / "trainer_state.json").read_text())
    assert restarted["step"] == restart.steps
    assert (restarted["config"]["lr"], restarted["config"]["seed"]) == (restart.lr, restart.seed)
    assert restarted["config"]["freeze_vision_adapter"] is True and restarted["config"]["eval_every"] == 0
    stage2, final = glm4v.load(out / "model"), glm4v.load(out / "restart" / "model")
    assert not torch.equal(stage2.model.transformer.output_layer.weight, final.model.transformer.output_layer.weight)
    assert torch.equal(stage2.model.transformer.vision.linear_proj.dense_h_to_4h.weight,
                       final.model.transformer.vision.linear_proj.dense_h_to_4h.weight)  # the vision side stays frozen
    pipe = glm4v.load(tmp_path / "exported")
    assert pipe.config.hidden_size == RECIPES["smoke"].dims.hidden_size
    assert torch.equal(pipe.model.transformer.output_layer.weight, final.model.transformer.output_layer.weight)

    # run again with --resume: every stage is complete, so nothing trains and the models stay as they were
    before = (out / "restart" / "model" / "model-00001-of-00001.safetensors").read_bytes()
    assert main(["train", "--recipe", "smoke", "--out", str(out), "--steps", "4", "--eval-every", "0",
                 "--save-every", "2", "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert (out / "restart" / "model" / "model-00001-of-00001.safetensors").read_bytes() == before
    assert again["eval"] == summary["eval"] and again["restarts"][0]["step"] == restart.steps
    assert again["wall_s"] > 0  # the command's own time, not the (empty) resumed stage's
    # each complete stage reports the training time its checkpoint kept, not the empty resumed run's
    kept = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert 0 < again["train_seconds"] == kept["train_seconds"] <= summary["train_seconds"]
    assert again["restarts"][0]["train_seconds"] == restarted["train_seconds"] > 0
    assert again["train_seconds_from_step"] == 0


def test_a_recipe_carried_without_its_checkpoints_continues_from_the_latest_finished_stage(tmp_path, capsys):
    """A long recipe moves between machines with the latest finished stage's model and the stage
    records only: the finished stages are not trained again, and a changed setting is refused."""
    from glm4v.cli import main
    from glm4v.train.cli import STAGE_RECORD

    out = tmp_path / "smoke"
    flags = ["train", "--recipe", "smoke", "--out", str(out), "--steps", "4", "--eval-every", "0", "--save-every", "2"]
    assert main(flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    final = (out / "restart" / "model" / "model-00001-of-00001.safetensors").read_bytes()
    records = [json.loads((out / d / STAGE_RECORD).read_text()) for d in (".", "restart")]
    assert records[0]["settings"]["steps"] == 4 and records[1]["settings"]["steps"] == RECIPES["smoke"].restarts[0].steps
    assert records[1]["result"]["train_seconds"] == summary["restarts"][0]["train_seconds"]
    assert "out_dir" not in records[0]["settings"]  # the run may live elsewhere on the next machine

    # what a move carries (scripts/carry_run.sh): the records and the latest finished stage's model;
    # the data is regenerated, stage 1's weights, stage 2's model and every checkpoint stay behind
    carried = tmp_path / "carried"
    script = Path(__file__).resolve().parents[1] / "scripts" / "carry_run.sh"
    subprocess.run(["bash", str(script), str(out), str(carried)], check=True, capture_output=True)
    assert sorted(str(p.relative_to(carried)) for p in carried.rglob("*") if p.is_file()) == sorted(
        ["stage.json", "restart/stage.json"] + [f"restart/model/{p.name}" for p in (out / "restart" / "model").iterdir()])
    shutil.rmtree(out)
    out = carried
    flags[flags.index("--out") + 1] = str(out)
    capsys.readouterr()
    assert main(flags + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "stage 2: finished before" in printed and "stage 2b: finished before" in printed
    assert "warm restart" not in printed and not (out / "checkpoints").exists()  # nothing trained
    again = json.loads((out / "summary.json").read_text())
    assert (out / "restart" / "model" / "model-00001-of-00001.safetensors").read_bytes() == final
    assert again["eval"] == summary["eval"] and again["restarts"] == summary["restarts"]
    assert again["train_seconds"] == summary["train_seconds"] and "vision_pretrain" in again
    assert "training time (min, across resumes): stage 1 " in printed and ", 2b " in printed

    # a stage whose record says it ran with other settings is not taken as this recipe's
    record = records[1]
    record["settings"]["lr"] = 1.0
    (out / "restart" / STAGE_RECORD).write_text(json.dumps(record))
    assert main(flags + ["--resume"]) == 1
    assert "stage 2b finished with lr=1.0 (now " in capsys.readouterr().err

    # the stage that has to train next needs the model it starts from
    (out / "restart" / STAGE_RECORD).unlink()
    assert main(flags + ["--resume"]) == 1
    assert f"stage 2b trains from {out / 'model'}, which is gone" in capsys.readouterr().err


def test_the_carry_script_takes_the_latest_finished_stage_by_number(tmp_path):
    """restart2 (2c) is later than restart (2b) and restart10 later than restart9, though a text
    sort says otherwise; a stage without its record (still training) is not carried."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "carry_run.sh"
    run = tmp_path / "run"
    for name in [".", "restart", "restart2", "restart9", "restart10", "restart11"]:
        (run / name / "model").mkdir(parents=True)
        (run / name / "model" / "weights").write_text(name)
        if name != "restart11":
            (run / name / "stage.json").write_text("{}")

    def carried_files():
        dest = tmp_path / "carried"
        subprocess.run(["bash", str(script), str(run), str(dest)], check=True, capture_output=True)
        return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())

    records = ["stage.json", "restart/stage.json", "restart2/stage.json", "restart9/stage.json"]
    assert carried_files() == sorted(records + ["restart10/stage.json", "restart10/model/weights"])
    shutil.rmtree(run / "restart10")
    shutil.rmtree(run / "restart9")
    assert carried_files() == sorted(records[:3] + ["restart2/model/weights"])
    shutil.rmtree(run / "restart2")
    assert carried_files() == sorted(records[:2] + ["restart/model/weights"])


def test_warm_restarts_take_stage_2_settings_and_a_bad_count_is_refused(tmp_path, capsys):
    from glm4v.cli import main
    from glm4v.train.cli import restart_config, restart_folder
    from glm4v.train.recipes import Restart

    stage2 = TrainConfig(out_dir="runs/x", train_data="d/train.jsonl", steps=2400, lr=1e-3, seed=0, batch_size=32,
                         length_pieces=4, freeze_vision=True, freeze_vision_adapter=True, warmup_data="easy.jsonl",
                         warmup_data_steps=100, warmup_data_mix=0.3, text_steps=50, vision_freeze_steps=20)
    cfg = restart_config(stage2, Restart(steps=800, lr=2e-4, seed=2), Path("runs/x") / restart_folder(1))
    assert (cfg.out_dir, cfg.steps, cfg.lr, cfg.seed, cfg.warmup_steps) == ("runs/x/restart2", 800, 2e-4, 2, 50)
    assert (cfg.batch_size, cfg.length_pieces, cfg.train_data, cfg.freeze_vision_adapter) == (32, 4, "d/train.jsonl", True)
    assert (cfg.warmup_data, cfg.warmup_data_steps, cfg.warmup_data_mix, cfg.text_steps, cfg.vision_freeze_steps) \
        == (None, 0, 0.0, 0, 0)
    assert stage2.steps == 2400 and stage2.out_dir == "runs/x"  # stage 2's own config is left alone
    assert RECIPES["embedded"].restarts == [Restart(800, 3e-4, 1), Restart(800, 2e-4, 2), Restart(1200, 2e-4, 3),
                                          Restart(1600, 2e-4, 4), Restart(1600, 3e-4, 5), Restart(800, 2e-4, 6),
                                          Restart(1600, 2e-4, 7), Restart(1600, 2e-4, 8), Restart(1600, 2e-4, 9)]

    assert main(["train", "--recipe", "smoke", "--out", str(tmp_path / "bad"), "--restarts", "2"]) == 1
    assert "--restarts must be 0..1 for recipe 'smoke', got 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_length_pieces_give_the_whole_batch_gradient_with_less_padding(small, tmp_path):
    from glm4v.train.trainer import split_by_length

    tok = load_tokenizer(small / "base")
    grads = {}
    for pieces in (1, 3):
        cfg = TrainConfig(out_dir=str(tmp_path / f"run{pieces}"), train_data=str(small / "data/train.jsonl"),
                          steps=1, batch_size=8, eval_every=0, save_every=0, length_pieces=pieces, grad_clip=0)
        model = new_model(small / "base", seed=0)
        trainer = Trainer(model, tok, small / "base", cfg, log=lambda msg: None)
        params = dict(model.named_parameters())
        trainer.optimizer.step = lambda: grads.__setitem__(pieces, {n: p.grad.clone() for n, p in params.items()
                                                                    if p.grad is not None})
        trainer.train()
    assert grads[1].keys() == grads[3].keys()
    for name, g in grads[1].items():
        assert torch.allclose(grads[3][name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-9), name
    samples = trainer._next_samples()
    pieces = split_by_length(samples, 3)
    assert [len(p) for p in pieces] == [3, 3, 2]
    assert sorted(map(id, sum(pieces, []))) == sorted(map(id, samples))
    lengths = [len(s.input_ids) for p in pieces for s in p]
    assert lengths == sorted(lengths)


def test_cli_flags_reach_the_train_config_and_freeze_the_adapter_too():
    import argparse

    from glm4v.train.cli import _train_config, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--freeze-vision", "--freeze-vision-adapter", "--seed", "1", "--length-pieces", "4"])
    cfg = _train_config(args, out_dir="o", train_data="t.jsonl", val_generate=0)
    assert cfg.freeze_vision and cfg.freeze_vision_adapter and cfg.seed == 1 and cfg.length_pieces == 4
    plain = _train_config(parser.parse_args([]), out_dir="o", train_data="t.jsonl")
    assert not plain.freeze_vision and not plain.freeze_vision_adapter


def test_resume_refuses_another_data_order_but_not_another_name_for_the_same_file(tmp_path, monkeypatch):
    from glm4v.train.trainer import POINTER, check_resume_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt.parent / POINTER).write_text(ckpt.name)
    saved = TrainConfig(out_dir="run", train_data=str(tmp_path / "data" / "train.jsonl"), seed=1, batch_size=4)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "config": saved.__dict__}))

    check_resume_config("run", TrainConfig(out_dir="run", train_data="data/train.jsonl", seed=1, batch_size=4))
    with pytest.raises(InputError, match="train_data"):
        check_resume_config("run", TrainConfig(out_dir="run", train_data="data/other.jsonl", seed=1, batch_size=4))
    with pytest.raises(InputError, match="seed=1"):
        check_resume_config("run", TrainConfig(out_dir="run", train_data="data/train.jsonl", seed=2, batch_size=4))
    with pytest.raises(InputError, match="batch_size=4"):
        check_resume_config("run", TrainConfig(out_dir="run", train_data="data/train.jsonl", seed=1, batch_size=8))
