"""The public API: load a model folder, then chat about an image.

    pipe = glm4v.load(path, dtype="bfloat16", device="cpu")
    pipe.chat([{"role": "user", "image": "photo.jpg", "content": "Describe it"}])

A ``Pipeline`` owns the model, its tokenizer and image processor, and the image-feature cache:
encoding a 1120x1120 image costs minutes on a CPU, so the features of recently seen images are kept
(keyed by a hash of the pixels) and a follow-up question about the same picture never re-encodes it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import torch

from glm4v.config import GLM4VConfig
from glm4v.errors import CheckpointError, InputError
from glm4v.generate import GenerationConfig, Sampler, TextStream, generate_steps
from glm4v.image import ImageProcessor, image_digest, load_image
from glm4v.kernels import cpu_has_native_bf16
from glm4v.model.glm4v import GLM4VForConditionalGeneration, RotaryBuffer
from glm4v.model.language import rope_table
from glm4v.prefix_cache import PrefixCache, generate_cached
from glm4v.tokenizer import GLM4Tokenizer, load_tokenizer
from glm4v.weights import load_weights

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "embedded"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype, config: GLM4VConfig | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if dtype == "auto":
        return _DTYPES.get(config.torch_dtype, torch.bfloat16) if config else torch.bfloat16
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[dtype]


# Below this many bytes of fp32 weights, "auto" prefers float32 on a CPU without native bf16
# matmuls: there a bf16 product is emulated and ~8x slower than fp32 (measured on an AVX2 CPU),
# while doubling the memory of a small model costs nothing. A large model keeps bf16: it must fit.
AUTO_FP32_MAX_BYTES = 4 << 30


def auto_dtype(config: GLM4VConfig, folder: Path, device: torch.device) -> torch.dtype:
    """config.json's torch_dtype, except float32 for a small model on a CPU that lacks bf16 units."""
    dtype = resolve_dtype("auto", config)
    if device.type != "cpu" or dtype == torch.float32 or cpu_has_native_bf16():
        return dtype
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return torch.float32 if stored * 2 <= AUTO_FP32_MAX_BYTES else dtype


def resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but torch sees no CUDA GPU")
    return device


def read_generation_defaults(folder: Path) -> dict:
    """Sampling defaults from generation_config.json (official keys), if the folder has one."""
    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    keys = {"do_sample": bool, "temperature": (int, float), "top_p": (int, float), "top_k": int,
            "repetition_penalty": (int, float), "max_new_tokens": int}
    return {k: raw[k] for k, t in keys.items() if k in raw and isinstance(raw[k], t) and not (t is int and isinstance(raw[k], bool))}


class Pipeline:
    def __init__(self, model: GLM4VForConditionalGeneration, tokenizer: GLM4Tokenizer, path: Path | None = None,
                 generation_defaults: dict | None = None, image_cache_size: int = 8, prefix_cache_bytes: int = 1 << 30):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.path = path
        self.image_processor = ImageProcessor(tokenizer.image_size)
        self.generation_defaults = generation_defaults or {}
        self.image_cache_size = image_cache_size
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # keys/values of recent conversations, so that a follow-up turn prefills only its new tokens
        self.prefix_cache = (PrefixCache(prefix_cache_bytes, self.config.boi_token_id, self.config.num_image_tokens + 2)
                             if prefix_cache_bytes else None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- images ---------------------------------------------------------------------------------
    def image_features(self, image) -> tuple[torch.Tensor, str]:
        """[1, P+2, D] features of one image, from the cache when the same pixels were seen before."""
        picture = load_image(image)
        key = image_digest(picture)
        if key in self._image_cache:
            self._image_cache.move_to_end(key)
            return self._image_cache[key], key
        with torch.inference_mode():
            feats = self.model.encode_images(self.image_processor(picture))
        if self.image_cache_size:
            self._image_cache[key] = feats
            while len(self._image_cache) > self.image_cache_size:
                self._image_cache.popitem(last=False)
        return feats, key

    # -- generation -------------------------------------------------------------------------------
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 16,
                 do_sample: bool = False, **gen) -> torch.LongTensor:
        """New tokens [B, n] for a batch of prompts (left padded) in the official input format."""
        config = GenerationConfig.from_kwargs(max_new_tokens=max_new_tokens, do_sample=do_sample, **gen)
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        steps = [s.tokens for s in generate_steps(self.model, input_ids, pixel_values, attention_mask, config,
                                                  vocab_limit=len(self.tokenizer))]
        return torch.tensor(steps, dtype=torch.long).T.reshape(input_ids.shape[0], len(steps))

    def prepare_chat(self, conversation, add_generation_prompt: bool = True):
        """Token ids [1, L] and image features (or None) for one conversation."""
        ids, image = self.tokenizer.encode_chat(conversation, add_generation_prompt=add_generation_prompt)
        features = self.image_features(image)[0] if image is not None else None
        return torch.tensor([ids], dtype=torch.long), features

    def stream_chat(self, conversation, max_new_tokens: int = 256, do_sample: bool = False, **gen) -> Iterator[str]:
        """Yield the answer as text pieces (never a broken UTF-8 character)."""
        stop_strings = gen.pop("stop_strings", None) or []
        config = GenerationConfig.from_kwargs(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                              stop_strings=stop_strings, **gen)
        if self.prefix_cache is not None:
            # reuse the keys/values of an earlier turn of this conversation (glm4v/prefix_cache.py)
            ids, image = self.tokenizer.encode_chat(conversation)
            sampler = Sampler(config, self.device, ids)
            steps = generate_cached(self, ids, image, config, sampler)
        else:
            input_ids, features = self.prepare_chat(conversation)
            sampler = Sampler(config, self.device, input_ids[0].tolist())
            steps = generate_steps(self.model, input_ids, config=config, image_features=features, samplers=[sampler],
                                   vocab_limit=len(self.tokenizer))
        text = TextStream(self.tokenizer, config.stop_strings)
        for step in steps:
            token = step.tokens[0]
            if step.reasons[0] == "stop":
                break
            delta = text.push(token)
            if delta:
                yield delta
            if text.stopped:
                return
        tail = text.finish()
        if tail:
            yield tail

    def chat(self, conversation, max_new_tokens: int = 256, do_sample: bool = False, **gen) -> str:
        return "".join(self.stream_chat(conversation, max_new_tokens=max_new_tokens, do_sample=do_sample, **gen))


def load(path=None, dtype="float32", device="cpu", progress: bool = False, quantize=None,
         group_size: int = 128, lora=None, merge_lora: bool = True) -> Pipeline:
    """Load a GLM-4V folder in the official layout (config.json, safetensors shards, tokenizer files).

    ``path=None`` loads the small model shipped inside the package. ``quantize="int8"|"int4"``
    quantises every linear layer while the weights stream in (``group_size``: int4 group);
    a pre-quantised folder (``python -m glm4v.quant``) loads as it was saved (glm4v/quant.py).
    """
    folder = Path(path) if path is not None else EMBEDDED_MODEL
    if not folder.exists():
        if path is None:
            raise CheckpointError(f"the embedded model is missing from the package ({folder}); reinstall glm4v")
        raise CheckpointError(f"{folder}: no such model folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a GLM-4V model folder)")
    config = GLM4VConfig.from_file(folder / "config.json")
    tokenizer = load_tokenizer(folder)
    check_tokenizer_matches(config, tokenizer, folder)
    torch_device = resolve_device(device)
    torch_dtype = auto_dtype(config, folder, torch_device) if dtype == "auto" else resolve_dtype(dtype, config)

    with torch.device("meta"):
        model = GLM4VForConditionalGeneration(config)
    from glm4v.quant import prepare_load

    quantizer = prepare_load(model, config, quantize, group_size, torch_dtype, torch_device)
    bar = _progress_bar(folder) if progress else None
    load_weights(model, folder, torch_dtype, torch_device, on_tensor=quantizer,
                 progress=bar.update_to if bar is not None else None)
    if bar is not None:  # (a tqdm bar without a total refuses bool())
        bar.close()
    if quantizer is not None:
        quantizer.finish(model)
    model.rope = rope_table(config, torch_device)
    if model.transformer.rotary_pos_emb.inv_freq.is_meta:  # checkpoints without the unused inv_freq
        model.transformer.rotary_pos_emb = RotaryBuffer(config).to(torch_device)
    if lora is not None:  # a LoRA adapter folder (glm4v/train/lora.py), merged unless merge_lora=False
        from glm4v.train.lora import attach_adapter

        attach_adapter(model, lora, merge=merge_lora, quantized=quantizer is not None)
    model.eval()
    model.requires_grad_(False)
    return Pipeline(model, tokenizer, folder, read_generation_defaults(folder))


def add_model_arguments(parser, default_device: str | None = "cpu") -> None:
    """The flags every command that loads a model shares (chat, serve, eval)."""
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="model folder in the official layout (default: the embedded model)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (config.json's torch_dtype; float32 for a "
                             "small model on a CPU without bf16 units)")
    parser.add_argument("--device", default=default_device, help="cpu, cuda, cuda:1 ...")
    add_quantize_arguments(parser)
    parser.add_argument("--lora", default=None, metavar="DIR", help="a LoRA adapter folder (glm4v train --lora) to apply")


def add_quantize_arguments(parser) -> None:
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="weight-only quantisation while loading (a GLM-4V-9B in bf16 needs 28 GB; int8 ~15, int4 ~9)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128 or 256)")


def load_from_args(args, progress: bool = False) -> "Pipeline":
    return load(args.model, dtype=args.dtype, device=args.device or "cpu", progress=progress,
                quantize=args.quantize, group_size=args.group_size, lora=args.lora)


def check_tokenizer_matches(config: GLM4VConfig, tokenizer: GLM4Tokenizer, folder: Path) -> None:
    if len(tokenizer) > config.padded_vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but config.json's padded_vocab_size is {config.padded_vocab_size}"
        )
    for name, ours in (("boi_token_id", tokenizer.boi_token_id), ("eoi_token_id", tokenizer.eoi_token_id),
                       ("pad_token_id", tokenizer.pad_token_id)):
        if getattr(config, name) != ours:
            raise CheckpointError(f"{folder}: config.json {name} is {getattr(config, name)} but the tokenizer says {ours}")
    if tokenizer.image_size != config.vision_config.image_size:
        raise CheckpointError(
            f"{folder}: tokenizer_config.json image_size {tokenizer.image_size} differs from "
            f"config.json vision_config.image_size {config.vision_config.image_size}"
        )


def _progress_bar(folder: Path):
    from tqdm import tqdm

    class Bar(tqdm):
        def update_to(self, done, total):
            self.total = total
            self.n = done
            self.refresh()

    return Bar(desc=f"loading {folder.name}", unit="tensor", leave=False)
