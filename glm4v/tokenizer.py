"""GLM-4 tokenizer and the GLM-4V chat format, without transformers.

The vocabulary is a tiktoken BPE file (``tokenizer.model``: one ``base64(token bytes) rank`` per
line) plus 14 special tokens appended right after it (ids from ``tokenizer_config.json``). The
behaviour mirrors the official ``ChatGLM4Tokenizer`` (see tests/fixtures/GOLDEN_README.md §4.1):

* ``encode`` recognises special-token strings typed in the text (Hugging Face added-token
  splitting) and prefixes ``[gMASK]<sop>``;
* the chat template encodes message contents with raw tiktoken, so a user typing
  ``"<|assistant|>"`` cannot inject a role switch;
* ``decode`` joins special tokens and runs of regular tokens with a single space.
"""

import base64
import binascii
import codecs
import json
import operator
from pathlib import Path

import tiktoken

from glm4v.errors import CheckpointError, ConversationError, InputError

EMBEDDED_DIR = Path(__file__).parent / "assets" / "embedded"

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Official order; the ids come from tokenizer_config.json and must follow the regular vocab.
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
ROLES = ("system", "user", "assistant", "observation")

# The fixed system prompt the official template emits when a message carries ``tools``.
TOOLS_PREAMBLE = (
    "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
TOOL_CALL_HINT = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"

DEFAULT_IMAGE_SIZE = 1120
DEFAULT_MODEL_MAX_LENGTH = 8192


# ------------------------------------------------------------------------------------------------
# loading

def _read_ranks(path):
    if not path.is_file():
        raise CheckpointError(f"tokenizer vocabulary not found: {path}")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read tokenizer vocabulary {path}: {e}") from e
    ranks = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{path}, line {lineno}"
        if len(parts) != 2:
            raise CheckpointError(f"{where}: expected 'base64 rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError) as e:
            raise CheckpointError(f"{where}: malformed entry {line[:80]!r} ({e})") from e
        if rank != len(ranks):
            # ids are positions in the embedding matrix: a gap or reordering would shift every id
            raise CheckpointError(
                f"{where}: rank {rank} breaks the contiguous sequence, expected {len(ranks)}"
            )
        if token in ranks:
            raise CheckpointError(f"{where}: token {token!r} appears twice (first at rank {ranks[token]})")
        ranks[token] = rank
    # tiktoken panics (an exception that is not an Exception) on a byte it cannot represent
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} of the 256 single-byte tokens are missing (e.g. byte {missing[0]})"
        )
    return ranks


def _read_config(path):
    if not path.is_file():
        raise CheckpointError(f"tokenizer config not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return config


def _special_tokens_from_config(config, vocab_size, path):
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict) or not decoder:
        raise CheckpointError(f"{path}: 'added_tokens_decoder' is missing or empty")
    specials = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str):
            raise CheckpointError(f"{path}: added_tokens_decoder[{key!r}] has no string 'content'")
        try:
            specials[content] = int(key)
        except ValueError as e:
            raise CheckpointError(f"{path}: added_tokens_decoder key {key!r} is not an integer id") from e
    missing = [t for t in SPECIAL_TOKENS if t not in specials]
    if missing:
        raise CheckpointError(f"{path}: special tokens missing from added_tokens_decoder: {missing}")
    ids = sorted(specials.values())
    if ids != list(range(vocab_size, vocab_size + len(ids))):
        raise CheckpointError(
            f"{path}: special token ids {ids[0]}..{ids[-1]} must follow the {vocab_size} regular tokens "
            f"contiguously (expected {vocab_size}..{vocab_size + len(ids) - 1})"
        )
    return specials


def _positive_int(config, key, default, path):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def load_tokenizer(path=None):
    """Load ``tokenizer.model`` + ``tokenizer_config.json`` from a folder (None: the embedded model)."""
    if path is None:
        if not EMBEDDED_DIR.is_dir():
            raise CheckpointError(
                f"no embedded model folder at {EMBEDDED_DIR}; pass the path of a folder holding "
                "tokenizer.model and tokenizer_config.json"
            )
        path = EMBEDDED_DIR
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    ranks = _read_ranks(folder / "tokenizer.model")
    config_path = folder / "tokenizer_config.json"
    config = _read_config(config_path)
    return GLM4Tokenizer(
        ranks,
        _special_tokens_from_config(config, len(ranks), config_path),
        image_size=_positive_int(config, "image_size", DEFAULT_IMAGE_SIZE, config_path),
        model_max_length=_positive_int(config, "model_max_length", DEFAULT_MODEL_MAX_LENGTH, config_path),
    )


# ------------------------------------------------------------------------------------------------
# tokenizer

class GLM4Tokenizer:
    def __init__(self, mergeable_ranks, special_tokens, image_size=DEFAULT_IMAGE_SIZE,
                 model_max_length=DEFAULT_MODEL_MAX_LENGTH):
        self.vocab_size = len(mergeable_ranks)
        self.special_tokens = dict(special_tokens)
        self._enc = tiktoken.Encoding(
            "glm4", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens,
        )
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self.image_size = image_size
        self.model_max_length = model_max_length

        sp = self.special_tokens
        self.eos_token_id = sp["<|endoftext|>"]
        self.pad_token_id = sp["<|endoftext|>"]
        self.boi_token_id = sp["<|begin_of_image|>"]
        self.eoi_token_id = sp["<|end_of_image|>"]
        self.user_token_id = sp["<|user|>"]
        self.assistant_token_id = sp["<|assistant|>"]
        self.observation_token_id = sp["<|observation|>"]
        self.stop_token_ids = [self.eos_token_id, self.user_token_id, self.observation_token_id]
        self._prefix = [sp["[gMASK]"], sp["<sop>"]]

    def __len__(self):
        return self.vocab_size + len(self.special_tokens)

    def __repr__(self):
        return (f"GLM4Tokenizer(vocab_size={self.vocab_size}, specials={len(self.special_tokens)}, "
                f"image_size={self.image_size})")

    # -- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text, add_special_tokens=True):
        """Like the official ``encode``: special-token strings in ``text`` become special ids."""
        _check_text(text)
        ids = _bpe(self._enc.encode, text, allowed_special="all")
        return self._prefix + ids if add_special_tokens else ids

    def encode_plain(self, text):
        """Raw BPE: special-token strings are encoded as ordinary text (used for message contents)."""
        _check_text(text)
        return _bpe(self._enc.encode_ordinary, text)

    def decode(self, ids, skip_special_tokens=False):
        """Like the official ``decode``: special tokens and byte runs of regular tokens, joined by spaces."""
        pieces, run = [], []
        for i in self._check_ids(ids):
            if i < self.vocab_size:
                run.append(i)
                continue
            if skip_special_tokens:
                # a skipped special does not end the byte run (a character split around it survives)
                continue
            if run:
                pieces.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
                run = []
            pieces.append(self._special_by_id[i])
        if run:
            pieces.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
        return " ".join(pieces)

    def token_bytes(self, token_id):
        """The bytes of a regular token (b"" for a special token)."""
        (token_id,) = self._check_ids([token_id])
        return self._enc.decode_single_token_bytes(token_id) if token_id < self.vocab_size else b""

    def stream_decoder(self):
        return StreamDecoder(self)

    def _check_ids(self, ids):
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)
            except TypeError:
                raise InputError(f"token ids must be integers, got {type(i).__name__}") from None
            if not 0 <= i < len(self):
                raise InputError(f"token id {i} is outside the vocabulary (0..{len(self) - 1})")
            out.append(i)
        return out

    # -- chat format ------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=True,
                            return_dict=False, padding=False, return_tensors=None):
        """Render one conversation (a list of messages) or a batch (a list of conversations).

        Returns the string (``tokenize=False``; the three image tokens are not rendered, as in the
        official code), the ids (``list[int]`` / ``list[list[int]]``, or a LongTensor [B, L] with
        ``return_tensors="pt"``), or with ``return_dict`` a dict with ``input_ids``,
        ``attention_mask``, ``position_ids`` and ``images`` (None if no conversation has an image,
        else one raw image value per conversation, None where a conversation has none). A batch
        with ``padding=True`` is padded on the left with ``<|endoftext|>`` (mask 0, position 0).
        """
        if return_tensors not in (None, "pt"):
            raise InputError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        batched = _is_batch(conversation)
        convs = list(conversation) if batched else [conversation]
        if not convs:
            raise ConversationError("the batch of conversations is empty")

        if not tokenize:
            texts = [self._render_text(c, add_generation_prompt) for c in convs]
            return texts if batched else texts[0]

        encoded = [self._encode_conversation(c, add_generation_prompt) for c in convs]
        input_ids = [ids for ids, _ in encoded]
        images = [image for _, image in encoded]
        attention_mask = [[1] * len(ids) for ids in input_ids]
        position_ids = [list(range(len(ids))) for ids in input_ids]

        if padding:
            width = max(len(ids) for ids in input_ids)
            for row in range(len(input_ids)):
                pad = width - len(input_ids[row])
                input_ids[row] = [self.pad_token_id] * pad + input_ids[row]
                attention_mask[row] = [0] * pad + attention_mask[row]
                position_ids[row] = [0] * pad + position_ids[row]

        if return_tensors == "pt":
            import torch

            if len({len(ids) for ids in input_ids}) > 1:
                raise InputError("conversations of different lengths need padding=True to make a tensor")
            input_ids, attention_mask, position_ids = (
                torch.tensor(x, dtype=torch.long) for x in (input_ids, attention_mask, position_ids)
            )
        elif not batched:
            input_ids, attention_mask, position_ids = input_ids[0], attention_mask[0], position_ids[0]

        if not return_dict:
            return input_ids
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "images": images if any(image is not None for image in images) else None,
        }

    def encode_chat(self, conversation, add_generation_prompt=True):
        """Ids of one conversation and the raw ``image`` value of the message holding it (or None)."""
        if _is_batch(conversation):
            raise ConversationError("encode_chat takes one conversation (a list of messages), not a batch")
        return self._encode_conversation(conversation, add_generation_prompt)

    def _encode_conversation(self, conversation, add_generation_prompt):
        ids = list(self._prefix)
        image = None
        for role, metadata, content, msg_image, tools_prompt in _messages(conversation):
            if tools_prompt is not None:
                ids += self._message_ids("system", "", tools_prompt)
            if msg_image is not None:
                image = msg_image
            if content or msg_image is not None:
                ids += self._message_ids(role, metadata, content, with_image=msg_image is not None)
        if add_generation_prompt:
            ids.append(self.assistant_token_id)
        return ids, image

    def _message_ids(self, role, metadata, content, with_image=False):
        ids = [self.special_tokens[f"<|{role}|>"]] + self.encode_plain(metadata + "\n")
        if with_image:
            # the <|endoftext|> placeholder is replaced by the vision features inside the model
            ids += [self.boi_token_id, self.eos_token_id, self.eoi_token_id]
        return ids + self.encode_plain(content)

    def _render_text(self, conversation, add_generation_prompt):
        text = "[gMASK]<sop>"
        for role, metadata, content, image, tools_prompt in _messages(conversation):
            if tools_prompt is not None:
                text += f"<|system|>\n{tools_prompt}"
            if content or image is not None:
                text += f"<|{role}|>{metadata}\n{content}"
        return text + ("<|assistant|>" if add_generation_prompt else "")


def _bpe(encode, text, **kwargs):
    try:
        return encode(text, **kwargs)
    except BaseException as e:
        # tiktoken's Rust code panics (pyo3's PanicException, a BaseException) when its regex gives
        # up, e.g. on a run of about a million whitespace characters
        if type(e).__name__ != "PanicException":
            raise
        raise InputError(f"the text ({len(text):,} characters) cannot be tokenized: the tokenizer gave up on it "
                         "(e.g. on a run of a million whitespace characters); shorten it") from None


def _check_text(text):
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")


def _is_batch(conversation):
    return (isinstance(conversation, (list, tuple)) and len(conversation) > 0
            and isinstance(conversation[0], (list, tuple)))


def _messages(conversation):
    """Validate a conversation; yield (role, metadata, content, image, tools_prompt) per message."""
    if not isinstance(conversation, (list, tuple)):
        raise ConversationError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    if not conversation:
        raise ConversationError("the conversation has no messages")
    checked, image_at = [], None
    for n, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise ConversationError(f"message {n} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ConversationError(f"message {n}: role must be one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise ConversationError(
                f"message {n}: content must be a string, got {type(content).__name__} "
                "(put the image in the message's 'image' key)"
            )
        metadata = message.get("metadata")
        metadata = "" if metadata is None else metadata
        if not isinstance(metadata, str):
            raise ConversationError(f"message {n}: metadata must be a string, got {type(metadata).__name__}")
        image = message.get("image")
        if image is not None:
            if image_at is not None:
                # the model splices exactly one block of vision features per sequence
                raise ConversationError(
                    f"message {n}: only one image per conversation is supported (message {image_at} already has one)"
                )
            image_at = n
        tools = message.get("tools")
        checked.append((role, metadata, content, image, _tools_prompt(tools, n) if tools else None))
    return checked


def _tools_prompt(tools, n):
    if not isinstance(tools, (list, tuple)):
        raise ConversationError(f"message {n}: 'tools' must be a list, got {type(tools).__name__}")
    prompt = TOOLS_PREAMBLE
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise ConversationError(f"message {n}: only tools of type \"function\" are supported, got {kind!r}")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ConversationError(f"message {n}: a function tool needs a 'function' object with a string 'name'")
        try:
            spec = json.dumps(function, ensure_ascii=False, indent=4)
        except (TypeError, ValueError) as e:
            raise ConversationError(f"message {n}: function {function['name']!r} is not JSON-serialisable: {e}") from e
        prompt += f"\n\n## {function['name']}\n\n{spec}" + TOOL_CALL_HINT
    return prompt


# ------------------------------------------------------------------------------------------------
# streaming

class StreamDecoder:
    """Turns generated ids into text as they arrive, never emitting half a UTF-8 character.

    A Chinese character or an emoji often spans several BPE tokens; the incremental UTF-8 decoder
    holds back an incomplete trailing sequence until the next token completes it. Special tokens
    are control/stop tokens and produce no text. The concatenation of every ``push`` and the final
    ``flush`` equals ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self):
        """The held-back rest (replacement characters for bytes that never formed a character)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
