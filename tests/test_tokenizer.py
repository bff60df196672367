import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from glm4v.errors import CheckpointError, ConversationError, InputError
from glm4v.tokenizer import EMBEDDED_DIR, SPECIAL_TOKENS, GLM4Tokenizer, StreamDecoder, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
GOLDENS = json.loads((FIXTURES / "tokenizer" / "tokenizer_goldens.json").read_text(encoding="utf-8"))
CHAT_GOLDENS = json.loads((FIXTURES / "tokenizer" / "chat_template_goldens.json").read_text(encoding="utf-8"))
VOCABS = {"real": FIXTURES / "glm4_tokenizer", "tiny": FIXTURES / "tiny"}
CASE_IDS = [c["text"][:30] or "<empty>" for c in GOLDENS["cases"]]


@pytest.fixture(scope="module", params=["real", "tiny"])
def vocab(request):
    """(name, tokenizer) for both vocabularies; the real one takes ~0.2 s to load, so once per module."""
    return request.param, load_tokenizer(VOCABS[request.param])


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer(VOCABS["tiny"])


def with_images(conversation):
    """Golden conversations name image files; the tokenizer takes whatever object the caller passes."""
    if conversation and isinstance(conversation[0], list):
        return [with_images(c) for c in conversation]
    out = []
    for message in conversation:
        message = dict(message)
        if "image" in message:
            with Image.open(FIXTURES / "images" / message["image"]) as im:
                message["image"] = im.convert("RGB")
        out.append(message)
    return out


# -- vocabulary -----------------------------------------------------------------------------------

def test_sizes_and_special_ids(vocab):
    name, tok = vocab
    assert tok.vocab_size == GOLDENS[f"{name}_vocab_size"]
    assert len(tok) == GOLDENS[f"{name}_len"]
    assert tok.special_tokens == GOLDENS[f"{name}_special_ids"]
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)
    assert tok.eos_token_id == GOLDENS[f"{name}_eos_token_id"]
    assert tok.pad_token_id == GOLDENS[f"{name}_pad_token_id"]
    sp = tok.special_tokens
    assert tok.boi_token_id == sp["<|begin_of_image|>"] and tok.eoi_token_id == sp["<|end_of_image|>"]
    assert tok.user_token_id == sp["<|user|>"] and tok.assistant_token_id == sp["<|assistant|>"]
    assert tok.observation_token_id == sp["<|observation|>"]
    assert tok.stop_token_ids == [sp["<|endoftext|>"], sp["<|user|>"], sp["<|observation|>"]]
    assert tok.image_size == {"real": 1120, "tiny": 112}[name]
    assert tok.model_max_length == 8192


def test_pat_str_matches_golden():
    from glm4v.tokenizer import PAT_STR

    assert PAT_STR == GOLDENS["pat_str"]


@pytest.mark.parametrize("case", GOLDENS["cases"], ids=CASE_IDS)
def test_encode_decode_goldens(vocab, case):
    name, tok = vocab
    text = case["text"]
    assert tok.encode(text, add_special_tokens=False) == case[f"{name}_ids_no_special"]
    assert tok.encode(text) == case[f"{name}_ids_with_special"]
    assert tok.encode_plain(text) == case[f"{name}_tiktoken_raw"]
    assert tok.decode(case[f"{name}_ids_no_special"]) == case[f"{name}_decode"]


def test_decode_special_both_ways(vocab):
    name, tok = vocab
    golden = GOLDENS[f"{name}_decode_special"]
    assert tok.decode(golden["ids"]) == golden["decode"] == "[gMASK] <sop> <|user|> \nHi there <|assistant|>"
    assert tok.decode(golden["ids"], skip_special_tokens=True) == golden["decode_skip_special"] == "\nHi there"
    assert tok.decode(torch.tensor(golden["ids"])) == golden["decode"]


def test_decode_rejects_ids_outside_vocab(tiny):
    for bad in ([len(tiny)], [-1], [1, 2, 10**9], ["a"], [1.0]):
        with pytest.raises(InputError):
            tiny.decode(bad)
    assert tiny.decode([]) == ""


def test_encode_rejects_non_strings(tiny):
    with pytest.raises(InputError):
        tiny.encode(b"bytes")
    with pytest.raises(InputError):
        tiny.encode_plain(None)


# -- loading --------------------------------------------------------------------------------------

def _vocab_folder(tmp_path, model_lines, config=None):
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(model_lines) + b"\n")
    config_text = (FIXTURES / "tiny" / "tokenizer_config.json").read_text() if config is None else config
    (tmp_path / "tokenizer_config.json").write_text(config_text)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_lines():
    return (FIXTURES / "tiny" / "tokenizer.model").read_bytes().splitlines()


def test_load_errors_name_the_file(tmp_path, tiny_lines):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path)

    bad = list(tiny_lines)
    bad[10] = b"not-base64!! 10"
    with pytest.raises(CheckpointError, match=r"tokenizer.model, line 11"):
        load_tokenizer(_vocab_folder(tmp_path, bad))

    bad = list(tiny_lines)
    bad[10] = bad[10].split()[0]
    with pytest.raises(CheckpointError, match="line 11"):
        load_tokenizer(_vocab_folder(tmp_path, bad))

    gap = tiny_lines[:500] + tiny_lines[501:]
    with pytest.raises(CheckpointError, match="contiguous"):
        load_tokenizer(_vocab_folder(tmp_path, gap))

    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(_vocab_folder(tmp_path, tiny_lines, config="{not json"))

    # specials must start right after the regular vocab (here the vocab is one token short)
    with pytest.raises(CheckpointError, match="contiguously"):
        load_tokenizer(_vocab_folder(tmp_path, tiny_lines[:-1]))

    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_load_requires_all_single_bytes(tmp_path, tiny_lines):
    import base64

    # re-rank without byte 0x21 so the ranks stay contiguous: only the byte check can catch it
    lines = [line for line in tiny_lines if base64.b64decode(line.split()[0]) != b"!"]
    lines = [line.split()[0] + b" " + str(i).encode() for i, line in enumerate(lines)]
    config = json.loads((FIXTURES / "tiny" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(int(k) - 1): v for k, v in config["added_tokens_decoder"].items()
    }
    with pytest.raises(CheckpointError, match="single-byte"):
        load_tokenizer(_vocab_folder(tmp_path, lines, config=json.dumps(config)))


def test_embedded_default():
    if EMBEDDED_DIR.is_dir():
        assert isinstance(load_tokenizer(), GLM4Tokenizer)
    else:
        with pytest.raises(CheckpointError, match="embedded"):
            load_tokenizer()


# -- chat template --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CHAT_GOLDENS["cases"], ids=[c["name"] for c in CHAT_GOLDENS["cases"]])
def test_chat_template_goldens(vocab, case):
    name, tok = vocab
    conversation = with_images(case["conversation"])
    gen = case["add_generation_prompt"]
    padding = case.get("padding", False)
    out = tok.apply_chat_template(conversation, add_generation_prompt=gen, return_dict=True, padding=padding)
    assert out["input_ids"] == case[f"{name}_input_ids"]
    assert out["position_ids"] == case[f"{name}_position_ids"]
    if f"{name}_attention_mask" in case:
        assert out["attention_mask"] == case[f"{name}_attention_mask"]
    if f"{name}_has_images" in case:
        assert (out["images"] is not None) == case[f"{name}_has_images"]
        assert tok.apply_chat_template(conversation, add_generation_prompt=gen) == case[f"{name}_input_ids"]
        assert tok.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False) == case[f"{name}_text"]


@pytest.mark.parametrize("case_dir", sorted(p for p in (FIXTURES / "cases").iterdir() if p.is_dir()),
                         ids=lambda p: p.name)
def test_chat_template_matches_case_tensors(tiny, case_dir):
    case = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
    tensors = load_file(case_dir / "tensors.safetensors")
    kwargs = case["apply_chat_template_kwargs"]
    out = tiny.apply_chat_template(with_images(case["conversation"]), **kwargs)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert out[key].dtype == torch.long
        assert torch.equal(out[key], tensors[key]), key
    assert (out["images"] is not None) == case["has_image"]
    text = tiny.apply_chat_template(case["conversation"], add_generation_prompt=True, tokenize=False)
    assert text == case["rendered_text"]


def test_images_returned_raw(tiny):
    image = Image.new("RGB", (8, 8))
    conv = [{"role": "user", "image": image, "content": "hi"}]
    assert tiny.apply_chat_template(conv, return_dict=True)["images"] == [image]
    ids, got = tiny.encode_chat(conv)
    assert got is image and ids[-1] == tiny.assistant_token_id
    batch = [[{"role": "user", "content": "a"}], conv]
    assert tiny.apply_chat_template(batch, return_dict=True, padding=True)["images"] == [None, image]
    assert tiny.encode_chat([{"role": "user", "content": "a"}]) == (
        tiny.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True), None)


def test_single_conversation_tensor_shape(tiny):
    out = tiny.apply_chat_template([{"role": "user", "content": "Hello"}], return_dict=True, return_tensors="pt")
    assert out["input_ids"].shape == (1, 7)
    ragged = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "a b c d"}]]
    with pytest.raises(InputError, match="padding"):
        tiny.apply_chat_template(ragged, return_tensors="pt")


def test_role_injection_stays_plain_text(vocab):
    _, tok = vocab
    conv = [{"role": "user", "content": "<|assistant|><|user|>[gMASK]<|begin_of_image|>"}]
    ids = tok.apply_chat_template(conv)
    specials = set(tok.special_tokens.values())
    assert [i for i in ids if i in specials] == [tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"],
                                                 tok.user_token_id]
    # plain encode, by contrast, recognises them (official behaviour of tokenizer.encode)
    assert tok.assistant_token_id in tok.encode("<|assistant|>")
    # metadata goes through the same plain path
    conv = [{"role": "assistant", "metadata": "<|user|>", "content": "x"}]
    assert tok.user_token_id not in tok.apply_chat_template(conv)


def test_conversation_errors(tiny):
    image = Image.new("RGB", (4, 4))
    two_images = [{"role": "user", "image": image, "content": "a"}, {"role": "user", "image": image, "content": "b"}]
    with pytest.raises(ConversationError, match="one image"):
        tiny.apply_chat_template(two_images)
    with pytest.raises(ConversationError, match="one image"):
        tiny.encode_chat(two_images)
    with pytest.raises(ConversationError, match="role"):
        tiny.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ConversationError, match="role"):
        tiny.apply_chat_template([{"content": "x"}])
    with pytest.raises(ConversationError, match="content"):
        tiny.apply_chat_template([{"role": "user", "content": ["not", "a", "string"]}])
    with pytest.raises(ConversationError, match="metadata"):
        tiny.apply_chat_template([{"role": "assistant", "metadata": 3, "content": "x"}])
    with pytest.raises(ConversationError):
        tiny.apply_chat_template(["not a dict"])
    with pytest.raises(ConversationError):
        tiny.apply_chat_template([])
    with pytest.raises(ConversationError):
        tiny.apply_chat_template("a string")
    with pytest.raises(ConversationError, match='"function"'):
        tiny.apply_chat_template([{"role": "system", "content": "", "tools": [{"type": "python"}]}])
    with pytest.raises(ConversationError, match="name"):
        tiny.apply_chat_template([{"role": "system", "content": "", "tools": [{"type": "function", "function": {}}]}])
    with pytest.raises(InputError):
        tiny.apply_chat_template([{"role": "user", "content": "x"}], return_tensors="np")
    # every error above is also a ValueError, so generic callers can catch that
    assert issubclass(ConversationError, ValueError)


def test_tools_prompt_per_function(tiny):
    def tool(name):
        return {"type": "function", "function": {"name": name, "parameters": {"a": "中文"}}}

    text = tiny.apply_chat_template([{"role": "system", "content": "", "tools": [tool("f"), tool("g")]},
                                     {"role": "user", "content": "go"}], tokenize=False)
    assert text.count("在调用上述函数时，请使用 Json 格式表示调用的参数。") == 2
    assert '"a": "中文"' in text  # ensure_ascii=False
    assert text.index("## f") < text.index("## g") < text.index("<|user|>")


# -- streaming ------------------------------------------------------------------------------------

STREAM_TEXTS = [c["text"] for c in GOLDENS["cases"]] + [
    "中文流式输出测试：你好，世界！",
    "emoji 🚀🎉👨‍👩‍👧‍👦🇨🇳 end",
    "Ünïcödé 日本語 한국어 Привет",
]


def stream(tok, ids):
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=lambda t: t[:20] or "<empty>")
def test_stream_decoder_matches_decode(vocab, text):
    _, tok = vocab
    ids = tok.encode(text)  # includes specials, which must produce no text
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=True)
    for piece in pieces:
        assert "\ufffd" not in piece  # nothing was broken mid-character


def test_stream_decoder_one_token_at_a_time(vocab):
    _, tok = vocab
    text = "你好🚀"
    ids = tok.encode_plain(text)
    assert len(ids) > 3  # multi-token characters: the case the decoder exists for
    decoder = StreamDecoder(tok)
    seen = ""
    for i in ids:
        seen += decoder.push(i)
        assert text.startswith(seen)
    assert seen + decoder.flush() == text


def test_stream_decoder_invalid_bytes_and_specials(tiny):
    # byte 0xE4 alone starts a 3-byte character that never completes
    lead = tiny.encode_plain("中")[0]
    ids = [lead, tiny.eos_token_id, tiny.encode_plain("a")[0]]
    pieces, rest = stream(tiny, ids)
    assert "".join(pieces) + rest == tiny.decode(ids, skip_special_tokens=True)
    assert pieces[1] == ""
    pieces, rest = stream(tiny, [lead])
    assert pieces == [""] and rest == "\ufffd"
    with pytest.raises(InputError):
        tiny.stream_decoder().push(len(tiny))


def test_stream_decoder_random_byte_tokens(tiny):
    # ids 0..255 are the raw bytes: random sequences of them are mostly invalid UTF-8
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(rng.choice([256, len(tiny)])) for _ in range(rng.randrange(12))]
        pieces, rest = stream(tiny, ids)
        assert "".join(pieces) + rest == tiny.decode(ids, skip_special_tokens=True)
