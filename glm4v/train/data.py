"""Conversations in the official fine-tuning JSONL format -> token ids, loss targets and pixels.

One line per conversation::

    {"messages": [{"role": "user", "content": "...", "image": "photo.png"}, {"role": "assistant", "content": "..."}]}

Image paths are relative to the JSONL file. At most one image per conversation (the model splices
one block of vision features per sequence).

Loss targets follow the official GLM-4V fine-tuning script: the model learns every token of an
assistant message after its ``<|assistant|>`` role token (the ``\\n`` and the content) plus the
token that ends the turn -- the next ``<|user|>``, or the ``<|user|>`` appended after the last
message -- and nothing of the system/user/observation messages or the image.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from glm4v.errors import ConversationError, Glm4vError, InputError
from glm4v.image import ImageProcessor
from glm4v.tokenizer import ROLES, GLM4Tokenizer

IGNORE = -100


@dataclass
class Record:
    messages: list[dict]
    image: Path | None  # resolved path of the conversation's image
    line: int
    meta: dict  # other keys of the line (id, skill, lang, ...)


def read_jsonl(path) -> list[Record]:
    """Parse and validate a conversations file; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list) or not raw["messages"]:
                raise InputError(f"{where}: expected an object with a non-empty 'messages' list")
            image = None
            for k, m in enumerate(raw["messages"]):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise InputError(f"{where}: message {k} needs a role in {ROLES}")
                if not isinstance(m.get("content", ""), str):
                    raise InputError(f"{where}: message {k} content must be a string")
                if m.get("image") is not None:
                    if image is not None:
                        raise InputError(f"{where}: only one image per conversation is supported")
                    if not isinstance(m["image"], str):
                        raise InputError(f"{where}: message {k} 'image' must be a file path")
                    image = path.parent / m["image"]
            if not any(m["role"] == "assistant" for m in raw["messages"]):
                raise InputError(f"{where}: the conversation has no assistant message to learn")
            meta = {k: v for k, v in raw.items() if k != "messages"}
            records.append(Record(raw["messages"], image, n, meta))
    if not records:
        raise InputError(f"{path}: no conversations")
    return records


def encode_for_training(tokenizer: GLM4Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and targets (``IGNORE`` where no loss) of a whole conversation."""
    ids = [tokenizer.special_tokens["[gMASK]"], tokenizer.special_tokens["<sop>"]]
    learn = [False, False]
    for m in messages:
        # one message at a time through the official template, minus its [gMASK]<sop> prefix
        part = tokenizer.encode_chat([m], add_generation_prompt=False)[0][2:]
        ids += part
        learn += [m["role"] == "assistant"] * len(part)
    ids.append(tokenizer.user_token_id)  # ends the last turn, as in the official script
    learn.append(False)
    # token i is a target when token i-1 belongs to an assistant message: this skips the
    # <|assistant|> role token and includes the token that ends the turn
    targets = [ids[i] if i > 0 and learn[i - 1] else IGNORE for i in range(len(ids))]
    return ids, targets


@dataclass
class Sample:
    input_ids: list[int]
    targets: list[int]
    pixels: torch.Tensor | None  # [3, S, S]


class ConversationDataset:
    """Tokenises every conversation up front (cheap) and loads the image of one on demand."""

    def __init__(self, path, tokenizer: GLM4Tokenizer, max_length: int = 1024, drop_images: bool = False):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.processor = ImageProcessor(tokenizer.image_size)
        self.records = read_jsonl(self.path)
        if drop_images:  # the same conversations as text alone (no image placeholder either)
            self.records = [Record([{k: v for k, v in m.items() if k != "image"} for m in r.messages], None, r.line, r.meta)
                            for r in self.records]
        self.encoded = []
        for r in self.records:
            try:
                ids, targets = encode_for_training(tokenizer, r.messages)
            except (ConversationError, InputError) as e:
                raise InputError(f"{self.path}, line {r.line}: {e}") from None
            if len(ids) > max_length:
                image_end = ids.index(tokenizer.eoi_token_id) + 1 if r.image is not None else 0
                if max_length <= image_end:
                    raise InputError(f"{self.path}, line {r.line}: max_length {max_length} cuts the image off")
                ids, targets = ids[:max_length], targets[:max_length]
            if all(t == IGNORE for t in targets):
                raise InputError(f"{self.path}, line {r.line}: nothing left to learn after truncation to {max_length} tokens")
            self.encoded.append((ids, targets))

    def __len__(self) -> int:
        return len(self.records)

    def length(self, i: int) -> int:
        return len(self.encoded[i][0])

    def has_image(self, i: int) -> bool:
        return self.records[i].image is not None

    def __getitem__(self, i: int) -> Sample:
        ids, targets = self.encoded[i]
        record = self.records[i]
        pixels = None
        if record.image is not None:
            try:
                pixels = self.processor(record.image)[0]
            except Glm4vError as e:
                raise InputError(f"{self.path}, line {record.line}: {e}") from None
        return Sample(ids, targets, pixels)


def collate(samples: list[Sample], pad_id: int, padding_side: str = "right") -> dict:
    """Pad a batch. Right padding for training (causal attention never sees the pads), left for generation."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    with_image = [s.pixels is not None for s in samples]
    if any(with_image) and not all(with_image):
        raise InputError("a batch must be all conversations with an image or all without")
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(s.input_ids)
        targets[row, cols] = torch.tensor(s.targets)
        mask[row, cols] = 1
    pixels = torch.stack([s.pixels for s in samples]) if all(with_image) else None
    return {"input_ids": ids, "targets": targets, "attention_mask": mask, "pixel_values": pixels,
            "padding_side": padding_side}


def batch_order(dataset: ConversationDataset, batch_size: int, seed: int, epoch: int,
                group_by_length: int = 0) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch) so that a resumed run replays them.

    Images and text-only never mix, and the batches come in random order. With
    ``group_by_length=k`` conversations are sorted by length within windows of k batches (less
    padding), but then each batch holds one kind of question (one template, one language) and
    the gradient swings between kinds; 0 keeps batches random.
    """
    rng = random.Random(f"glm4v-batches/{seed}/{epoch}")
    batches = []
    for want_image in (True, False):
        pool = [i for i in range(len(dataset)) if dataset.has_image(i) == want_image]
        rng.shuffle(pool)
        if not group_by_length:
            batches += [pool[k:k + batch_size] for k in range(0, len(pool), batch_size)]
            continue
        window = batch_size * group_by_length
        for start in range(0, len(pool), window):
            chunk = sorted(pool[start:start + window], key=dataset.length)
            batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
