"""Token generation: KV-cached decoding, sampling, stop tokens and strings, streaming.

Sampling follows the Hugging Face semantics the official demos rely on (repetition penalty over
prompt and output, then temperature, top-k, top-p), so the same settings mean the same thing.
Each sequence owns its random generator: a seeded request gives the same text whether it runs
alone or batched with others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import torch

from glm4v.errors import ContextLengthError, InputError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None: the model's eos ids
    stop_strings: list[str] = field(default_factory=list)

    def validate(self) -> "GenerationConfig":
        def bad(msg):
            raise InputError(f"invalid generation setting: {msg}")

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop_strings, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop_strings):
            bad("stop must be a list of non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_kwargs(cls, base: "GenerationConfig | None" = None, **kwargs) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise InputError(f"unknown generation argument(s): {', '.join(unknown)}")
        return replace(base or cls(), **{k: v for k, v in kwargs.items() if v is not None}).validate()


class Sampler:
    """Chooses the next token of one sequence from its logits."""

    def __init__(self, config: GenerationConfig, device: torch.device, prompt_ids: list[int] | None = None):
        self.config = config
        self.generator = None
        if not config.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(config.seed if config.seed is not None else torch.seed())
        self.seen = set(prompt_ids or []) if config.repetition_penalty != 1.0 else None

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 for this sequence."""
        c = self.config
        if self.seen:
            idx = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[idx]
            logits = logits.clone()
            logits[idx] = torch.where(picked < 0, picked * c.repetition_penalty, picked / c.repetition_penalty)
        if c.greedy:
            token = int(torch.argmax(logits))
        else:
            logits = logits / c.temperature
            if c.top_k and c.top_k < logits.shape[-1]:
                kth = torch.topk(logits, c.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if c.top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=False)
                cumulative = sorted_logits.softmax(-1).cumsum(-1)
                drop = cumulative <= 1 - c.top_p
                drop[-1] = False  # always keep the most likely token
                logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
            probs = logits.softmax(-1)
            if bool(torch.isfinite(probs).all()):
                token = int(torch.multinomial(probs, 1, generator=self.generator))
            else:  # extreme settings (temperature 1e-40, repetition penalty 1e-300) overflow to inf:
                token = int(torch.argmax(logits))  # the limit of that distribution is its top token
        if self.seen is not None:
            self.seen.add(token)
        return token


def check_context(text_tokens: int, image_tokens: int, max_new_tokens: int, context: int) -> int:
    """Return how many new tokens fit; raise if the prompt itself leaves no room.

    The prompt is counted after image expansion (an image takes P+2 positions, 1,602 for the
    official model, in place of its 3 placeholder tokens). Policy: a prompt that does not fit is an
    error that gives the counts; a request whose prompt fits but whose ``max_new_tokens`` would run
    past the context is shortened to fit and ends with finish reason "length".
    """
    prompt_len = text_tokens + image_tokens
    if prompt_len >= context:
        detail = f"{text_tokens} text tokens" + (f" + {image_tokens} image tokens" if image_tokens else "")
        raise ContextLengthError(
            f"the prompt takes {prompt_len} tokens ({detail}), which leaves no room in the model's "
            f"context of {context} tokens; shorten the conversation"
        )
    return min(max_new_tokens, context - prompt_len)


@dataclass
class StepResult:
    tokens: list[int]  # the token chosen for each row this step (pad for finished rows)
    finished: list[bool]
    reasons: list[str | None]  # "stop" or "length" once a row has finished


def generate_steps(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    image_features: torch.Tensor | None = None,
    samplers: list[Sampler] | None = None,
    vocab_limit: int | None = None,
) -> Iterator[StepResult]:
    """Prefill then decode with a preallocated KV cache, yielding one StepResult per new token.

    ``vocab_limit``: the tokenizer's size. The output layer is padded (151,552 rows for 151,343
    tokens); rows past the tokenizer are never valid choices, so they are masked out.
    """
    config = (config or GenerationConfig()).validate()
    B, L = input_ids.shape
    if pixel_values is not None and image_features is None:
        image_features = model.encode_images(pixel_values)
    image_tokens = image_features.shape[1] if image_features is not None else 0
    text_tokens = L - 3 if image_features is not None else L
    prompt_len = text_tokens + image_tokens
    max_new = check_context(text_tokens, image_tokens, config.max_new_tokens, model.config.seq_length)

    stop_ids = set(config.stop_token_ids if config.stop_token_ids is not None else model.config.eos_token_ids)
    pad_id = model.config.pad_token_id
    if samplers is None:
        rows = input_ids.tolist()
        samplers = [Sampler(config, model.device, rows[b]) for b in range(B)]
    cache = model.allocate_cache(B, prompt_len + max_new)
    finished = [False] * B
    reasons: list[str | None] = [None] * B

    with torch.inference_mode():
        out = model(input_ids, attention_mask=attention_mask, image_features=image_features, kv_cache=cache, logits_to_keep=1)
        for step in range(max_new):
            logits = out.logits[:, -1].float()
            if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                logits[:, vocab_limit:] = float("-inf")
            tokens = []
            for b in range(B):
                if finished[b]:
                    tokens.append(pad_id)
                    continue
                t = samplers[b](logits[b])
                tokens.append(t)
                if t in stop_ids:
                    finished[b], reasons[b] = True, "stop"
                elif step == max_new - 1:
                    finished[b], reasons[b] = True, "length"
            yield StepResult(tokens, list(finished), list(reasons))
            if all(finished):
                return
            out = model(torch.tensor(tokens, device=model.device)[:, None], kv_cache=cache, logits_to_keep=1)


def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    **kwargs,
) -> torch.LongTensor:
    """New tokens [B, n] (rows that stopped early are padded with the pad id after their stop token)."""
    config = GenerationConfig.from_kwargs(config, **kwargs)
    steps = [s.tokens for s in generate_steps(model, input_ids, pixel_values, attention_mask, config)]
    if not steps:
        return torch.empty(input_ids.shape[0], 0, dtype=torch.long)
    return torch.tensor(steps, dtype=torch.long).T.contiguous()


class TextStream:
    """Turns a sequence's tokens into text deltas, honouring stop strings.

    Text that might be the beginning of a stop string is held back until it is clear it is not;
    when a stop string appears, the text before it is emitted and the stream reports ``stopped``.
    """

    def __init__(self, tokenizer, stop_strings=()):
        self.decoder = tokenizer.stream_decoder()
        self.stop_strings = list(stop_strings)
        self.pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.push(token_id))

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self._emit(self.decoder.flush(), final=True)
        return text

    def _emit(self, text: str, final: bool = False) -> str:
        self.pending += text
        if not self.stop_strings:
            out, self.pending = self.pending, ""
            return out
        cut = min((i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        if final:
            out, self.pending = self.pending, ""
            return out
        hold = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out
