"""Vision pre-training (stage 1 of the embedded recipe): scene labels, targets, learning, saving, freezing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from glm4v.errors import InputError
from glm4v.train import synth
from glm4v.train.data import IGNORE
from glm4v.train.trainer import TrainConfig, Trainer, freeze_vision_encoder, new_model
from glm4v.train.vision_pretrain import (
    BARS_AT, CELLS, CHARACTERS, CHARS_AT, COLOUR_CLASSES, HIGHEST_AT, NO_CHARACTER, SHAPE_CLASSES, TARGET_WIDTH, TEXT_AT,
    TEXT_CLASSES, PretrainConfig, SceneData, SceneHeads, cell_positions, evaluate, load_vision, pretrain_vision, save_vision,
    scene_targets,
)
from tests.conftest import smoke_run_folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return smoke_run_folder(tmp_path_factory.mktemp("vision"), {"val": 18, "train": 72}, seed=3)


def _colour_at(image: Image.Image, x: float, y: float) -> tuple:
    return image.getpixel((int(x), int(y)))


def test_scene_labels_put_each_object_in_the_cell_it_was_drawn_in():
    for index in range(60):
        ex = synth.make_example(7, "test", index)
        scene = ex.scene
        if "text" in scene:  # text questions, and multiple choice about text
            assert ex.skill in ("text", "choice") and scene["text"] in ex.messages[0]["content"] + ex.messages[1]["content"]
            assert "".join(ch for ch, _ in scene["chars"]) == scene["text"]
            cells = [cell for _, cell in scene["chars"]]
            # one line, left to right, one glyph per cell, side by side
            assert cells == list(range(cells[0], cells[0] + len(cells))) and len({c // synth.GRID for c in cells}) == 1
            for ch, cell in scene["chars"]:  # ink in the character's cell
                row, col = divmod(cell, synth.GRID)
                box = ex.image.crop((col * synth.CELL, row * synth.CELL, (col + 1) * synth.CELL, (row + 1) * synth.CELL))
                assert box.convert("L").getextrema()[0] < 120
            continue
        if "bars" in scene:
            assert ex.skill == "chart"
            assert 3 <= len(scene["bars"]) <= 5 and all(1 <= v <= synth.CHART_MAX for v in scene["bars"])
            continue
        cells = scene["cells"]
        assert len(cells) == synth.GRID * synth.GRID
        for k, cell in enumerate(cells):
            if cell is None:
                continue
            row, col = divmod(k, synth.GRID)
            # the cell's centre region holds the object's colour (objects are centred in their cell, r >= 14)
            centre = ((col + 0.5) * synth.CELL, (row + 0.5) * synth.CELL)
            rgb = dict((c[0], c[2]) for c in synth.COLOURS)[cell[0]]
            window = [_colour_at(ex.image, centre[0] + dx, centre[1] + dy) for dx in range(-12, 13, 3) for dy in range(-12, 13, 3)]
            assert rgb in window, (ex.id, k, cell)


def test_description_names_the_same_objects_as_the_scene():
    for index in range(5, 300, 9):  # description examples
        ex = synth.make_example(11, "test", index)
        assert ex.skill == "description"
        named = synth.description_facts(ex.messages[1]["content"])
        names = {c[0]: c[1] for c in synth.COLOURS} | {s[0]: s[1] for s in synth.SHAPES}
        in_scene = sorted((c if ex.lang == "en" else names[c], s if ex.lang == "en" else names[s])
                          for c, s in filter(None, ex.scene["cells"]))
        assert named == in_scene


def test_scene_targets_by_hand():
    cells = [None] * CELLS
    cells[5] = ["blue", "star"]
    t = scene_targets({"cells": cells})
    assert len(t) == TARGET_WIDTH
    assert t[5] == COLOUR_CLASSES.index("blue") and t[CELLS + 5] == SHAPE_CLASSES.index("star")
    assert t[0] == COLOUR_CLASSES.index("empty") and t[CELLS] == SHAPE_CLASSES.index("empty")
    assert t[TEXT_AT:] == [IGNORE] * (TARGET_WIDTH - TEXT_AT)
    t = scene_targets({"text": "42", "chars": [["4", 6], ["2", 7]]})
    assert t[TEXT_AT] == TEXT_CLASSES.index("42") and t[:TEXT_AT] == [IGNORE] * TEXT_AT
    chars = t[CHARS_AT:]
    assert chars[6] == CHARACTERS.index("4") and chars[7] == CHARACTERS.index("2")
    assert chars.count(NO_CHARACTER) == CELLS - 2
    t = scene_targets({"bars": [3, 8, 1]})
    assert t[BARS_AT:HIGHEST_AT] == [3, 8, 1, 0, 0]  # absent bars are class 0
    assert t[HIGHEST_AT] == 1  # bar B
    assert t[CHARS_AT:] == [IGNORE] * CELLS
    with pytest.raises(InputError):  # one glyph per cell
        scene_targets({"text": "42", "chars": [["4", 6], ["2", 6]]})
    with pytest.raises(InputError):
        scene_targets({"cells": [None] * 3})


def test_cell_positions_are_row_major_rows_and_columns_in_minus_one_to_one():
    positions = cell_positions()
    assert positions.shape == (CELLS, 2)
    assert positions[0].tolist() == [-1, -1] and positions[CELLS - 1].tolist() == [1, 1]
    assert positions[1].tolist() == pytest.approx([-1, -1 + 2 / 3])  # same row, next column
    assert positions[4].tolist() == pytest.approx([-1 + 2 / 3, -1])  # next row


def test_a_perfect_position_read_out_scores_every_token():
    heads = SceneHeads(2, CELLS)
    with torch.no_grad():
        heads.position.weight.copy_(torch.eye(2))
        heads.position.bias.zero_()
    tokens = cell_positions()[None].expand(3, CELLS, 2)
    targets = torch.tensor([scene_targets({"bars": [1, 2]})] * 3)
    _, stats = heads(tokens, targets)
    assert stats["position"] == (3 * CELLS, 3 * CELLS)
    _, stats = heads(tokens.flip(1), targets)  # tokens in the wrong cells
    assert stats["position"][0] == 0


def test_heads_loss_covers_only_what_the_picture_says():
    heads = SceneHeads(8, CELLS)
    tokens = torch.randn(2, CELLS, 8)
    targets = torch.tensor([scene_targets({"text": "CAT", "chars": [["C", 1], ["A", 2], ["T", 3]]}),
                            scene_targets({"bars": [1, 2, 3]})])
    loss, stats = heads(tokens, targets)
    assert set(stats) == {"text", "bars", "highest", "chart", "chars", "position"} and stats["text"][1] == 1
    assert stats["bars"][1] == 5 * CELLS and stats["highest"][1] == CELLS  # every token reads the whole chart
    assert stats["chars"][1] == CELLS  # every cell of the one text picture
    assert stats["position"][1] == 2 * CELLS  # every token of both pictures
    assert torch.isfinite(loss)
    with pytest.raises(InputError):
        SceneHeads(8, 9)


def test_pretraining_learns_the_scenes_and_the_weights_round_trip(small, tmp_path):
    torch.manual_seed(0)
    model = new_model(small / "base", 0)
    size = model.config.vision_config.image_size
    train = SceneData(small / "data" / "train.jsonl", size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = pretrain_vision(model, train, None, PretrainConfig(steps=30, batch_size=16, warmup_steps=3, log_every=10),
                              log=lambda m: None)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert not torch.equal(before["transformer.vision.conv.weight"], after["transformer.vision.conv.weight"])
    # the decoder is not touched, nor are boi/eoi (stage 2 learns them)
    for name in ("transformer.encoder.layers.0.self_attention.query_key_value.weight", "transformer.vision.boi"):
        assert torch.equal(before[name], after[name])
    accuracy = evaluate(model, SceneHeads(model.config.hidden_size, CELLS), train)
    assert set(accuracy) <= {"colour", "shape", "text", "bars", "highest", "chart", "chars", "position"} and accuracy

    save_vision(model, tmp_path / "vision.safetensors")
    other = new_model(small / "base", 1)
    n = load_vision(other, tmp_path / "vision.safetensors")
    assert n == sum(1 for k in after if k.startswith("transformer.vision."))
    for k, v in other.state_dict().items():
        if k.startswith("transformer.vision."):
            assert torch.equal(v, after[k])

    bigger = json.loads((small / "base" / "config.json").read_text())
    bigger["vision_config"]["hidden_size"] = 64
    (tmp_path / "big").mkdir()
    for f in (small / "base").iterdir():
        (tmp_path / "big" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "big" / "config.json").write_text(json.dumps(bigger))
    with pytest.raises(InputError, match="does not fit"):
        load_vision(new_model(tmp_path / "big", 0), tmp_path / "vision.safetensors")


def test_data_without_scenes_is_refused_with_the_file_named(tmp_path):
    line = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(InputError, match="t.jsonl.*scene"):
        SceneData(tmp_path / "t.jsonl", 112)


def test_freezing_the_adapter_too_leaves_only_boi_and_eoi_trainable_on_the_vision_side(small):
    model = new_model(small / "base", 0)
    freeze_vision_encoder(model, adapter=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("transformer.vision.")]
    assert sorted(trainable) == ["transformer.vision.boi", "transformer.vision.eoi"]
    model = new_model(small / "base", 0)
    freeze_vision_encoder(model)
    assert model.transformer.vision.conv.weight.requires_grad


def test_a_frozen_vision_side_stays_unchanged_while_the_decoder_trains(small, tmp_path):
    from glm4v.tokenizer import load_tokenizer

    model = new_model(small / "base", 0)
    vision_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("transformer.vision.")}
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(small / "data" / "train.jsonl"), steps=3,
                      batch_size=8, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0, freeze_vision=True,
                      freeze_vision_adapter=True)
    Trainer(model, load_tokenizer(small / "base"), small / "base", cfg, log=lambda m: None).train()
    for k, v in model.state_dict().items():
        if k in vision_before and not k.endswith(("boi", "eoi")):
            assert torch.equal(v, vision_before[k]), k
    assert not torch.equal(model.transformer.vision.boi, vision_before["transformer.vision.boi"])
