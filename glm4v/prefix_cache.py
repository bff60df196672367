"""Reuse of keys/values across the turns of a conversation (prefix caching).

A chat client resends the whole history every turn. The keys/values of a sequence depend only on
the tokens before them (causal attention), so the KV of a finished turn is exactly the KV of the
next turn's prompt up to the point where the two differ. ``PrefixCache`` keeps the KV of recent
sequences, keyed by their token ids and the hash of their image, and hands back the longest
usable prefix; only the tokens after it are prefilled.

The image needs care, because its three template tokens ``<|begin_of_image|> <|endoftext|>
<|end_of_image|>`` are the same for every picture while the KV behind them is not:

* a prefix that reaches into the image is only reused when it was made from the same pixels
  (``image_digest``); otherwise the match stops before ``<|begin_of_image|>``;
* a match never ends inside the three tokens (the splice needs all three);
* a cached image occupies P+2 cache slots for its 3 tokens, so "m tokens" means m + P - 1 slots
  once the image is inside, while the RoPE position after m tokens is m (the patches share one
  position, GOLDEN_README 4.3). A row loaded with a prefix continues from position m.

Entries are copies (not views of a live batch row), bounded by a memory budget, evicted LRU.
An entry whose ids extend an older entry with the same image supersedes it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from glm4v.model.language import KVCache


@dataclass(eq=False)
class Prefix:
    ids: torch.Tensor  # [n] int64 on the CPU: the tokens whose keys/values are stored
    image_key: str | None
    boi: int | None  # index of the image's <|begin_of_image|> in ids (None: no image inside)
    k: torch.Tensor  # [layers, kv_heads, slots, head_dim]
    v: torch.Tensor

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def slots_for(self, tokens: int) -> int:
        """Cache slots taken by the first ``tokens`` ids (the image expands 3 tokens to P+2 slots)."""
        if self.boi is not None and tokens > self.boi:
            return tokens + self.slots - len(self.ids)
        return tokens


@dataclass
class Match:
    entry: Prefix | None
    tokens: int = 0  # how many leading ids are covered
    slots: int = 0  # how many cache slots they fill


class PrefixCache:
    """LRU store of conversation prefixes' keys/values, bounded by ``budget_bytes``. Thread-safe."""

    def __init__(self, budget_bytes: int, boi_token_id: int, image_slots: int):
        self.budget_bytes = int(budget_bytes)
        self.boi_token_id = boi_token_id
        self.image_slots = image_slots  # P+2: the slots an image's 3 template tokens expand to
        self._entries: OrderedDict[int, Prefix] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def image_start(self, ids: Sequence[int], image_key: str | None) -> int | None:
        if image_key is None:
            return None
        try:
            return list(ids).index(self.boi_token_id)
        except ValueError:
            return None

    def lookup(self, ids: Sequence[int], image_key: str | None) -> Match:
        """The longest reusable prefix of ``ids`` (always leaving at least one token to prefill)."""
        if not self._entries or len(ids) < 2:
            with self._lock:
                self.misses += 1
            return Match(None)
        query = torch.as_tensor(ids, dtype=torch.long)
        image_at = self.image_start(ids, image_key)
        best = Match(None)
        with self._lock:
            for entry in reversed(self._entries.values()):  # most recent first: wins ties
                tokens = _common_prefix(entry.ids, query)
                tokens = min(tokens, len(ids) - 1)
                if image_at is not None and tokens > image_at:
                    if entry.image_key != image_key or tokens < image_at + 3:
                        tokens = image_at
                if tokens > best.tokens:
                    best = Match(entry, tokens, entry.slots_for(tokens))
            if best.entry is None:
                self.misses += 1
                return best
            self._entries.move_to_end(id(best.entry))
            self.hits += 1
            self.hit_tokens += best.tokens
        return best

    @staticmethod
    def load(match: Match, row: KVCache) -> None:
        """Write a match into a one-row cache view, which then continues after the prefix."""
        row.reset()
        if match.entry is None:
            return
        n = match.slots
        row.k[:, 0, :, :n].copy_(match.entry.k[:, :, :n])
        row.v[:, 0, :, :n].copy_(match.entry.v[:, :, :n])
        row.valid[0, :n] = True
        row.lengths[0] = n
        row.positions[0] = match.tokens

    def store(self, ids: Sequence[int], image_key: str | None, row: KVCache) -> None:
        """Keep the keys/values of ``ids`` held by the one-row view ``row`` (its first ``lengths`` slots)."""
        if self.budget_bytes <= 0 or len(ids) < 2:
            return
        slots = int(row.lengths[0])
        image_at = self.image_start(ids, image_key)
        expected = len(ids) + (self.image_slots - 3 if image_at is not None else 0)
        if slots != expected or slots > row.max_len or (image_at is not None and image_at + 3 > len(ids)):
            return  # not a complete, consistent prefix: never cache something we cannot trust
        per_slot = 2 * row.k[:, 0, :, :1].numel() * row.k.element_size()
        if per_slot * slots > self.budget_bytes:
            return
        key_ids = torch.tensor(list(ids), dtype=torch.long)
        with self._lock:
            for key, old in list(self._entries.items()):
                if old.image_key == image_key and len(old.ids) <= len(key_ids) and _common_prefix(old.ids, key_ids) == len(old.ids):
                    self._drop(key)  # the new entry serves every match the old one could
        entry = Prefix(key_ids, image_key, image_at, row.k[:, 0, :, :slots].clone(), row.v[:, 0, :, :slots].clone())
        with self._lock:
            self._entries[id(entry)] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.budget_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens}

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def prefill_chunks(model, row: KVCache, ids: Sequence[int], start: int, image_at: int | None,
                   image_features: Callable[[], torch.Tensor] | None, chunk_size: int = 0,
                   vocab_limit: int | None = None) -> Iterator[torch.Tensor | None]:
    """Feed ``ids[start:]`` into a one-row cache that already holds ``ids[:start]``.

    Yields None after every chunk but the last, then the float32 logits [V] of the last position,
    so a scheduler can interleave decode steps of other rows between the chunks of a long prompt
    (logits at and past ``vocab_limit``, the output layer's padding rows, are -inf).
    ``image_features`` is called (once) only when the image's tokens are among the new ones; the
    chunk holding them is extended to include all three.
    """
    pos, total = start, len(ids)
    if pos >= total:
        raise ValueError("prefill needs at least one new token")
    device = model.device
    while True:
        end = total if chunk_size <= 0 else min(total, pos + chunk_size)
        features = None
        if image_at is not None and pos <= image_at < end:
            end = max(end, image_at + 3)  # never split the three image tokens
            features = image_features()
        chunk = torch.tensor([list(ids[pos:end])], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model(chunk, image_features=features, kv_cache=row, logits_to_keep=1 if end >= total else 0)
            if end >= total:
                logits = out.logits[0, -1].float()
                logits[vocab_limit:] = float("-inf")
        pos = end
        if pos >= total:
            yield logits
            return
        yield None


def generate_cached(pipe, ids: list[int], image, config, sampler) -> Iterator:
    """``generate_steps`` for one conversation, reusing (and then keeping) its prefix in ``pipe.prefix_cache``.

    Yields the same ``StepResult`` objects; the keys/values of every token fed are stored when the
    generator ends, however it ends (finished, stopped by the caller, or interrupted).
    """
    from glm4v.generate import StepResult, check_context
    from glm4v.image import image_digest, load_image

    model, cache = pipe.model, pipe.prefix_cache
    picture = load_image(image) if image is not None else None
    image_key = image_digest(picture) if picture is not None else None
    image_slots = cache.image_slots if picture is not None else 0
    text_tokens = len(ids) - (3 if picture is not None else 0)
    max_new = check_context(text_tokens, image_slots, config.max_new_tokens, model.config.seq_length)
    stop_ids = set(config.stop_token_ids if config.stop_token_ids is not None else model.config.eos_token_ids)
    vocab = len(pipe.tokenizer)

    row = model.allocate_cache(1, text_tokens + image_slots + max_new)
    match = cache.lookup(ids, image_key)
    PrefixCache.load(match, row)
    fed = list(ids)
    try:
        logits = None
        for logits in prefill_chunks(model, row, ids, match.tokens, cache.image_start(ids, image_key),
                                     lambda: pipe.image_features(picture)[0], vocab_limit=vocab):
            pass
        for step in range(max_new):
            token = sampler(logits)
            reason = "stop" if token in stop_ids else "length" if step == max_new - 1 else None
            yield StepResult([token], [reason is not None], [reason])
            if reason is not None:
                return
            with torch.inference_mode():
                out = model(torch.tensor([[token]], device=model.device), kv_cache=row, logits_to_keep=1)
                logits = out.logits[0, -1].float()
                logits[vocab:] = float("-inf")
            fed.append(token)
    finally:
        if int(row.lengths[0]) > 0:
            cache.store(fed, image_key, row)
