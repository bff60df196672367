"""Checkpoint loading: memory mapping, dtype casts, and a clear error for every broken folder."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm4v.config import GLM4VConfig
from glm4v.errors import CheckpointError
from glm4v.model.glm4v import GLM4VForConditionalGeneration
from glm4v.weights import SafetensorsFile, checkpoint_files, load_weights
from tests.conftest import TINY_DIR

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def tiny_copy(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY_DIR, folder)
    return folder


def meta_model(folder=TINY_DIR):
    config = GLM4VConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        return GLM4VForConditionalGeneration(config)


def load_into(folder, dtype=torch.float32):
    model = meta_model(folder)
    load_weights(model, folder, dtype)
    return model


def test_matching_dtype_is_zero_copy_view_of_the_file():
    model = load_into(TINY_DIR, torch.float32)
    w = model.transformer.output_layer.weight
    expected = load_file(str(TINY_DIR / SHARD2))["transformer.output_layer.weight"]
    assert torch.equal(w, expected)
    # A view of the memory map, not an owned copy: its storage is not resizable.
    assert not w.untyped_storage().resizable()


def test_cast_to_bfloat16_copies_each_tensor():
    model = load_into(TINY_DIR, torch.bfloat16)
    w = model.transformer.encoder.layers[0].self_attention.query_key_value.weight
    assert w.dtype == torch.bfloat16
    expected = load_file(str(TINY_DIR / SHARD1))["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert torch.equal(w, expected.to(torch.bfloat16))
    assert not any(p.is_meta for p in model.parameters())


def test_single_file_checkpoint(tiny_copy):
    tensors = {**load_file(str(tiny_copy / SHARD1)), **load_file(str(tiny_copy / SHARD2))}
    for name in (SHARD1, SHARD2, "model.safetensors.index.json"):
        (tiny_copy / name).unlink()
    save_file(tensors, str(tiny_copy / "model.safetensors"))
    model = load_into(tiny_copy)
    assert torch.equal(model.transformer.output_layer.weight, tensors["transformer.output_layer.weight"])


def test_missing_shard(tiny_copy):
    (tiny_copy / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=f"in shard '{SHARD2}', which does not exist"):
        load_into(tiny_copy)


def test_missing_tensor(tiny_copy):
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    del index["weight_map"]["transformer.encoder.final_layernorm.weight"]
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 tensor\\(s\\) missing.*transformer.encoder.final_layernorm.weight"):
        load_into(tiny_copy)


def test_index_points_to_a_shard_without_the_tensor(tiny_copy):
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.output_layer.weight"] = SHARD1
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{SHARD1}: the index puts tensor 'transformer.output_layer.weight'"):
        load_into(tiny_copy)


def test_unexpected_tensor(tiny_copy):
    tensors = load_file(str(tiny_copy / SHARD2))
    tensors["transformer.encoder.layers.7.mlp.dense_4h_to_h.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(tiny_copy / SHARD2))
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.encoder.layers.7.mlp.dense_4h_to_h.weight"] = SHARD2
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 unexpected tensor\\(s\\).*layers.7.mlp.dense_4h_to_h.weight"):
        load_into(tiny_copy)


def test_shape_mismatch_names_file_tensor_and_both_shapes(tiny_copy):
    tensors = load_file(str(tiny_copy / SHARD2))
    tensors["transformer.output_layer.weight"] = torch.zeros(2048, 32)
    save_file(tensors, str(tiny_copy / SHARD2))
    with pytest.raises(CheckpointError, match=f"{SHARD2}: tensor 'transformer.output_layer.weight' has shape \\[2048, 32\\], the config expects \\[2048, 64\\]"):
        load_into(tiny_copy)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(TINY_DIR / "config.json", folder)
    # A file that would run code if unpickled: the loader must refuse by name, never open it.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(CheckpointError, match="pickle-based weights.*pytorch_model.bin.*safetensors only"):
        checkpoint_files(folder)
    assert not (folder / "pwned").exists()


def test_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no weights found"):
        checkpoint_files(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint_files(tmp_path / "nope")


def test_truncated_shard(tiny_copy):
    data = (tiny_copy / SHARD2).read_bytes()
    (tiny_copy / SHARD2).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{SHARD2}: tensor '.*' ends at byte \\d+ but the file has only \\d+ bytes \\(truncated file\\)"):
        load_into(tiny_copy)


def test_header_that_lies_about_sizes(tiny_copy):
    path = tiny_copy / SHARD2
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "transformer.output_layer.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match=f"tensor '{name}' header says bytes.*needs {end - begin} bytes"):
        SafetensorsFile(path)


@pytest.mark.parametrize("content,words", [(b"", "too short"), (b"\xff" * 16, "header claims"), (struct.pack("<Q", 4) + b"nope", "not valid JSON")])
def test_garbage_files(tmp_path, content, words):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words):
        SafetensorsFile(path)


def test_malformed_index(tiny_copy):
    (tiny_copy / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(CheckpointError, match="malformed index"):
        checkpoint_files(tiny_copy)
    (tiny_copy / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    with pytest.raises(CheckpointError, match="invalid shard name"):
        checkpoint_files(tiny_copy)


MEASURE = textwrap.dedent(
    """
    import json, sys, time, torch
    from glm4v.config import GLM4VConfig
    from glm4v.model.glm4v import GLM4VForConditionalGeneration
    from glm4v.weights import load_weights
    folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * 4096
    config = GLM4VConfig.from_file(folder + '/config.json')
    with torch.device('meta'):
        model = GLM4VForConditionalGeneration(config)
    base = rss()
    t0 = time.perf_counter()
    load_weights(model, folder, dtype)
    load_s = time.perf_counter() - t0
    after_load = rss()
    # Touch one element per page of every weight so that mapped pages become resident, as a
    # forward pass would.
    for p in model.parameters():
        float(p.view(-1)[:: 4096 // p.element_size()].float().sum())
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (big) pytest parent.
    peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
    final = rss()
    t0 = time.perf_counter()
    for f in set(__import__('glm4v.weights', fromlist=['x']).checkpoint_files(folder).values()):
        with open(f, 'rb') as fh:
            while fh.read(1 << 24):
                pass
    read_s = time.perf_counter() - t0
    print(json.dumps({"base": base, "after_load": after_load, "peak": peak, "final": final, "load_s": load_s, "read_s": read_s}))
    """
)


@pytest.fixture(scope="module")
def scaled_checkpoint(tmp_path_factory):
    """~330 MB bf16 checkpoint at 1/4 of the official widths, written once for the memory tests."""
    from glm4v.testing import scaled_config, write_random_checkpoint
    from tests.conftest import FIXTURES

    base = GLM4VConfig.from_file(FIXTURES / "official_config.json")
    config = scaled_config(base, hidden_size=1024, ffn_hidden_size=3424, num_layers=4, padded_vocab_size=151552,
                           vision_hidden_size=448, vision_intermediate_size=3840, vision_num_hidden_layers=4,
                           vision_image_size=224, vision_num_positions=257)
    folder = tmp_path_factory.mktemp("scaled")
    write_random_checkpoint(folder, config, FIXTURES / "glm4_tokenizer", torch.bfloat16, max_shard_bytes=128 * 1024**2)
    return folder


def measure(folder, dtype):
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), dtype], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_bf16_load_is_memory_mapped_and_lean(scaled_checkpoint):
    weight_bytes = sum(p.stat().st_size for p in scaled_checkpoint.glob("*.safetensors"))
    m = measure(scaled_checkpoint, "bfloat16")
    # Loading maps the files: it must not read them (well under the time of one read) ...
    assert m["load_s"] < 0.5 * m["read_s"] + 0.05, m
    assert m["after_load"] - m["base"] < 0.05 * weight_bytes, m
    # ... and once every weight is touched, the process holds them once: peak <= 1.2x weights.
    assert m["peak"] - m["base"] <= 1.2 * weight_bytes, m


def test_cast_load_peak_is_final_size_plus_one_tensor(scaled_checkpoint):
    weight_bytes = sum(p.stat().st_size for p in scaled_checkpoint.glob("*.safetensors"))
    m = measure(scaled_checkpoint, "float32")
    fp32_bytes = 2 * weight_bytes
    # The largest tensor (embedding/output layer, 151552 x 1024 bf16) is ~0.3 GB of source pages.
    assert m["peak"] - m["base"] <= 1.2 * fp32_bytes, m
