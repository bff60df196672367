from __future__ import annotations

import json

import pytest

from glm4v.config import GLM4VConfig
from glm4v.errors import ConfigError
from tests.conftest import FIXTURES, TINY_DIR

OFFICIAL = FIXTURES / "official_config.json"


def write(tmp_path, raw) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def test_official_config_reads_every_key():
    config = GLM4VConfig.from_file(OFFICIAL)
    raw = json.loads(OFFICIAL.read_text())
    assert config.hidden_size == 4096 and config.num_layers == 40 and config.num_attention_heads == 32
    assert config.num_kv_heads == 2 and config.head_dim == 128 and config.rope_dim == 64
    assert config.ffn_hidden_size == 13696 and config.padded_vocab_size == 151552 and config.seq_length == 8192
    assert config.eos_token_ids == [151329, 151336, 151338]
    assert (config.boi_token_id, config.eoi_token_id, config.pad_token_id) == (151339, 151340, 151329)
    vc = config.vision_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_heads, vc.intermediate_size) == (1792, 63, 16, 15360)
    assert (vc.image_size, vc.patch_size, vc.num_positions, vc.scaling_factor) == (1120, 14, 6401, 8)
    assert config.num_image_tokens == 1600
    # Every key survives a round trip, unknown ones (auto_map, transformers_version...) included.
    assert config.to_dict() == raw


def test_rope_ratio_defaults_to_one_and_is_honoured(tmp_path):
    raw = json.loads(OFFICIAL.read_text())
    assert GLM4VConfig.from_dict(raw).rope_base == 10000.0
    raw["rope_ratio"] = 500
    config = GLM4VConfig.from_file(write(tmp_path, raw))
    assert config.rope_base == 5_000_000.0
    assert config.to_dict()["rope_ratio"] == 500


def test_unknown_keys_are_kept_not_fatal(tmp_path):
    raw = json.loads((TINY_DIR / "config.json").read_text())
    raw["my_custom_flag"] = {"x": 1}
    raw["vision_config"]["future_key"] = 3
    config = GLM4VConfig.from_file(write(tmp_path, raw))
    assert config.extra["my_custom_flag"] == {"x": 1}
    assert config.vision_config.extra["future_key"] == 3


@pytest.mark.parametrize("key", ["hidden_size", "num_layers", "kv_channels", "padded_vocab_size"])
def test_missing_required_key_names_key_and_file(tmp_path, key):
    raw = json.loads(OFFICIAL.read_text())
    del raw[key]
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match=f"{path}.*'{key}' is missing"):
        GLM4VConfig.from_file(path)


def test_missing_vision_key_is_named_with_its_prefix(tmp_path):
    raw = json.loads(OFFICIAL.read_text())
    del raw["vision_config"]["patch_size"]
    with pytest.raises(ConfigError, match="'vision_config.patch_size' is missing"):
        GLM4VConfig.from_file(write(tmp_path, raw))


def test_not_a_glm4v_config(tmp_path):
    raw = json.loads(OFFICIAL.read_text())
    del raw["vision_config"]
    with pytest.raises(ConfigError, match="vision_config.*not a GLM-4V config"):
        GLM4VConfig.from_file(write(tmp_path, raw))


@pytest.mark.parametrize(
    "key,value,words",
    [("hidden_size", "4096", "must be an integer, got str"), ("num_layers", True, "must be an integer, got a boolean"),
     ("layernorm_epsilon", "small", "must be a number"), ("rmsnorm", 1, "must be a boolean"),
     ("eos_token_id", "x", "must be a list or an integer")],
)
def test_wrong_type_names_key_and_file(tmp_path, key, value, words):
    raw = json.loads(OFFICIAL.read_text())
    raw[key] = value
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match=f"{path}.*'{key}' {words}"):
        GLM4VConfig.from_file(path)


def test_inconsistent_vision_geometry_is_refused(tmp_path):
    raw = json.loads(OFFICIAL.read_text())
    raw["vision_config"]["num_positions"] = 6400
    with pytest.raises(ConfigError, match="num_positions is 6400.*6401"):
        GLM4VConfig.from_file(write(tmp_path, raw))


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        GLM4VConfig.from_file(tmp_path / "config.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        GLM4VConfig.from_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        GLM4VConfig.from_file(bad)
