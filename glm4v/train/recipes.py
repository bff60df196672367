"""Model folders built from scratch and the recipe of the embedded model.

A from-scratch model folder is everything ``glm4v.load`` needs except the weights: config.json
with the official key set (same keys, same order as THUDM/glm-4v-9b), a tokenizer that is a prefix
of the real GLM-4 vocabulary (so token ids are GLM-4's own) with the 14 special tokens appended
right after it, tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glm4v.config import GLM4VConfig
from glm4v.errors import CheckpointError, InputError
from glm4v.tokenizer import SPECIAL_TOKENS

# The key set and order of the official config.json (values are replaced below).
OFFICIAL_CONFIG = {
    "_name_or_path": "THUDM/glm-4v-9b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "vision_config": {
        "dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 63,
        "hidden_size": 1792, "patch_size": 14, "num_heads": 16, "intermediate_size": 15360,
        "layer_norm_eps": 1e-06, "num_positions": 6401, "image_size": 1120, "scaling_factor": 8,
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "attn_implementation": "sdpa",
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1.5625e-07,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 40,
    "original_rope": True,
    "padded_vocab_size": 151552,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 8192,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
    "boi_token_id": 151339,
    "eoi_token_id": 151340,
}


@dataclass
class ModelDims:
    """The sizes that define a GLM-4V-architecture model."""

    vocab_ranks: int = 8000  # regular tokens: the first N ranks of the GLM-4 vocabulary
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 8
    kv_channels: int = 32
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 704
    seq_length: int = 2048
    vision_hidden_size: int = 192
    vision_layers: int = 4
    vision_heads: int = 6
    vision_intermediate_size: int = 768
    image_size: int = 224
    patch_size: int = 28

    @property
    def padded_vocab_size(self) -> int:
        n = self.vocab_ranks + len(SPECIAL_TOKENS)
        return -(-n // 64) * 64


def config_dict(dims: ModelDims, torch_dtype: str = "bfloat16") -> dict:
    """config.json for ``dims`` with exactly the official keys, in the official order."""
    raw = copy.deepcopy(OFFICIAL_CONFIG)
    raw["_name_or_path"] = "glm4v-embedded"
    grid = dims.image_size // dims.patch_size
    raw["vision_config"].update(
        num_hidden_layers=dims.vision_layers, hidden_size=dims.vision_hidden_size, patch_size=dims.patch_size,
        num_heads=dims.vision_heads, intermediate_size=dims.vision_intermediate_size,
        num_positions=grid * grid + 1, image_size=dims.image_size,
    )
    n = dims.vocab_ranks
    ids = {name: n + k for k, name in enumerate(SPECIAL_TOKENS)}
    raw.update(
        ffn_hidden_size=dims.ffn_hidden_size, hidden_size=dims.hidden_size, kv_channels=dims.kv_channels,
        multi_query_group_num=dims.multi_query_group_num, num_attention_heads=dims.num_attention_heads,
        num_layers=dims.num_layers, padded_vocab_size=dims.padded_vocab_size, seq_length=dims.seq_length,
        torch_dtype=torch_dtype,
        eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        pad_token_id=ids["<|endoftext|>"], boi_token_id=ids["<|begin_of_image|>"], eoi_token_id=ids["<|end_of_image|>"],
    )
    GLM4VConfig.from_dict(raw, source="generated config")  # validates
    return raw


def generation_config_dict(config: dict) -> dict:
    return {
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "do_sample": False,  # a small model trained on exact answers: greedy is what it was scored with
        "max_length": config["seq_length"],
        "transformers_version": "4.44.0",
    }


def read_ranks_prefix(tokenizer_model: Path, n: int) -> list[bytes]:
    """The first ``n`` lines of a tiktoken vocabulary file, checked to be ranks 0..n-1."""
    lines = Path(tokenizer_model).read_bytes().splitlines()
    if len(lines) < n:
        raise CheckpointError(f"{tokenizer_model} has {len(lines)} tokens, fewer than the {n} requested")
    for rank, line in enumerate(lines[:n]):
        parts = line.split()
        if len(parts) != 2 or int(parts[1]) != rank:
            raise CheckpointError(f"{tokenizer_model}, line {rank + 1}: expected rank {rank}")
        base64.b64decode(parts[0], validate=True)
    return lines[:n]


def write_tokenizer(source: Path, folder: Path, n: int, image_size: int) -> None:
    """tokenizer.model = first n ranks of ``source``; tokenizer_config.json with the specials renumbered.

    Every GLM-4 token of rank < n is a merge of two lower-rank tokens, so the prefix is itself a
    valid BPE vocabulary and encodes any text (rarer words just take more tokens).
    """
    source = Path(source)
    lines = read_ranks_prefix(source / "tokenizer.model", n)
    (folder / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")
    try:
        tconf = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}/tokenizer_config.json: cannot read ({e})") from None
    by_content = {v["content"]: v for v in tconf.get("added_tokens_decoder", {}).values()}
    if set(by_content) != set(SPECIAL_TOKENS):
        raise CheckpointError(f"{source}/tokenizer_config.json: expected the 14 GLM-4 special tokens")
    tconf["added_tokens_decoder"] = {str(n + k): by_content[name] for k, name in enumerate(SPECIAL_TOKENS)}
    tconf["image_size"] = image_size
    (folder / "tokenizer_config.json").write_text(json.dumps(tconf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_folder(folder, dims: ModelDims, tokenizer_source, torch_dtype: str = "bfloat16") -> dict:
    """Write config.json, generation_config.json and the prefix tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = config_dict(dims, torch_dtype)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config_dict(raw), indent=2) + "\n")
    write_tokenizer(Path(tokenizer_source), folder, dims.vocab_ranks, dims.image_size)
    return raw


def default_tokenizer_source() -> Path:
    """Where the GLM-4 vocabulary comes from: the real one in a source checkout, else the embedded prefix."""
    repo = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "glm4_tokenizer"
    if (repo / "tokenizer.model").exists():
        return repo
    from glm4v.engine import EMBEDDED_MODEL

    return EMBEDDED_MODEL


# ------------------------------------------------------------------------------------------------
# recipes


@dataclass
class Restart:
    """A warm restart of stage 2: more steps from the previous model, with a fresh peak learning rate
    and another data order; everything else (batch, lengths, freezing, validation) is stage 2's."""

    steps: int
    lr: float
    seed: int
    warmup_steps: int = 50


@dataclass
class Recipe:
    """Everything `glm4v train --recipe NAME` needs to reproduce a model."""

    name: str
    dims: ModelDims = field(default_factory=ModelDims)
    data_sizes: dict = field(default_factory=lambda: {"test": 1260, "val": 270, "train": 36000})
    data_seed: int = 1234
    steps: int = 2400
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3  # the vision side is frozen in stage 2, so the decoder can learn fast (it collapsed the adapter at >= 5e-4 when trained with it)
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # float32: the shipped model was trained so, and bf16 autocast does not pay at these widths on
    # a CPU with AMX either (1.79 s vs 1.54 s per stage-2 step on a 2-core Xeon, 24 steps each)
    autocast: bool = False
    eval_every: int = 200
    save_every: int = 200
    seed: int = 0
    save_dtype: str = "bfloat16"
    vision_lr_scale: float = 1.0
    vision_freeze_steps: int = 0
    warmup_data_steps: int = 0  # first steps on single-object questions (the "easy" split); not needed after stage 1
    warmup_data_mix: float = 0.0  # then a share of the steps, decaying to none at the end
    group_by_length: int = 0  # random batches: length-sorted ones held one question kind each and stalled learning
    length_pieces: int = 4  # each batch runs as 4 pieces of similar length: the same update, half the step time
    extra_turns: int = 2  # training conversations get up to this many more questions about their image
    # Stage 1 (vision_pretrain.py): the vision side learns the pictures' contents from their scene
    # labels; stage 2 then trains the decoder on the conversations with the vision side frozen.
    vision_pretrain_steps: int = 1500
    vision_pretrain_lr: float = 1e-3
    vision_pretrain_batch: int = 64
    freeze_vision: bool = True
    freeze_vision_adapter: bool = True
    threads: int = 2  # 1.6-1.8 s per full-data step on both cores when nothing else runs (1 thread: ~1.9 s per warm-up step)
    # Stages 2b-2j: each restarts from the previous stage's exported (bf16) model, in OUT/restart,
    # OUT/restart2, ..., OUT/restart9; the last one is the recipe's model. For the embedded model they
    # were worth +6, +2.7, +5.1, +2.2, +3.1, +1.9, +4.5, +0.4 and +1.0 points on the test split
    # (docs/TRAINING.md; 2f is where the multiple-choice answers started going through the options,
    # 2j where each option line started restating the looked-up value).
    restarts: list = field(default_factory=lambda: [Restart(800, 3e-4, 1), Restart(800, 2e-4, 2),
                                                    Restart(1200, 2e-4, 3), Restart(1600, 2e-4, 4),
                                                    Restart(1600, 3e-4, 5), Restart(800, 2e-4, 6),
                                                    Restart(1600, 2e-4, 7), Restart(1600, 2e-4, 8),
                                                    Restart(1600, 2e-4, 9)])

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES = {
    # the shipped model: data, stage 1 (vision), stage 2 (conversations), stages 2b-2j (restarts)
    "embedded": Recipe(name="embedded"),
    # a minute-long smoke run of the same pipeline (tests and trying things out)
    "smoke": Recipe(
        name="smoke",
        dims=ModelDims(vocab_ranks=2000, hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
                       ffn_hidden_size=128, seq_length=1024, vision_hidden_size=48, vision_layers=1, vision_heads=4,
                       vision_intermediate_size=96, image_size=112, patch_size=14),
        data_sizes={"test": 36, "val": 18, "train": 180}, steps=20, batch_size=8, warmup_steps=4, autocast=True,
        eval_every=10, save_every=10, vision_pretrain_steps=5, vision_pretrain_batch=8,
        restarts=[Restart(steps=3, lr=5e-4, seed=1, warmup_steps=1)],
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])
