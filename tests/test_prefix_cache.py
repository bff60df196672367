"""Prefix reuse: the KV of an earlier turn stands in for a prefill, exactly, and only when it may."""

import pytest
import torch

from glm4v.engine import Pipeline, load
from glm4v.image import image_digest, load_image
from glm4v.prefix_cache import PrefixCache, prefill_chunks
from tests.conftest import TINY_DIR
from tests.serving import IMAGE_A, IMAGE_B


@pytest.fixture(scope="module")
def pipe():
    return load(TINY_DIR)


def conversation(image=IMAGE_A, turns=1):
    conv = [{"role": "system", "content": "You look at pictures."},
            {"role": "user", "image": load_image(image), "content": "What is in the picture?"}]
    for i in range(1, turns):
        conv += [{"role": "assistant", "content": f"An answer number {i}."},
                 {"role": "user", "content": f"Follow-up question {i}?"}]
    return conv


def full_prefill_logits(pipe, ids, image):
    row = pipe.model.allocate_cache(1, 256)
    feats = (lambda: pipe.image_features(image)[0]) if image is not None else None
    image_at = ids.index(pipe.config.boi_token_id) if image is not None else None
    *_, logits = prefill_chunks(pipe.model, row, ids, 0, image_at, feats)
    return logits, row


def test_reused_prefix_gives_the_same_logits_as_a_full_prefill(pipe):
    cache = PrefixCache(1 << 24, pipe.config.boi_token_id, pipe.config.num_image_tokens + 2)
    turn1, image = pipe.tokenizer.encode_chat(conversation(turns=1))
    turn2, _ = pipe.tokenizer.encode_chat(conversation(turns=2))
    key = image_digest(image)
    _, row1 = full_prefill_logits(pipe, turn1, image)
    cache.store(turn1, key, row1)

    match = cache.lookup(turn2, key)
    assert match.tokens == len(turn1)  # turn 1's prompt is a prefix of turn 2's
    assert match.slots == len(turn1) - 3 + pipe.config.num_image_tokens + 2
    row = pipe.model.allocate_cache(1, 256)
    PrefixCache.load(match, row)
    assert int(row.positions[0]) == len(turn1)  # positions continue from the unspliced length
    *_, reused = prefill_chunks(pipe.model, row, turn2, match.tokens, turn2.index(pipe.config.boi_token_id),
                                lambda: pytest.fail("the image must not be encoded again"))
    expected, full_row = full_prefill_logits(pipe, turn2, image)
    torch.testing.assert_close(reused, expected, rtol=1e-4, atol=1e-4)
    n = int(full_row.lengths[0])
    assert int(row.lengths[0]) == n
    torch.testing.assert_close(row.k[:, 0, :, :n], full_row.k[:, 0, :, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 7, 0])
def test_chunked_prefill_matches_one_pass_and_never_splits_the_image(pipe, chunk):
    ids, image = pipe.tokenizer.encode_chat(conversation(turns=2))
    expected, full_row = full_prefill_logits(pipe, ids, image)
    row = pipe.model.allocate_cache(1, 256)
    chunks = list(prefill_chunks(pipe.model, row, ids, 0, ids.index(pipe.config.boi_token_id),
                                 lambda: pipe.image_features(image)[0], chunk_size=chunk))
    assert all(c is None for c in chunks[:-1])
    if chunk == 1:
        assert len(chunks) == len(ids) - 2  # the three image tokens go in one chunk
    torch.testing.assert_close(chunks[-1], expected, rtol=1e-4, atol=1e-4)
    assert int(row.lengths[0]) == int(full_row.lengths[0])


def store_fake(cache, ids, key, slots=None, dims=(2, 2, 16)):
    """Store an entry with recognisable keys (slot index) without running a model."""
    layers, heads, hd = dims
    from glm4v.model.language import KVCache

    slots = slots if slots is not None else len(ids)
    row = KVCache(torch.arange(slots, dtype=torch.float32).view(1, 1, 1, slots, 1).expand(layers, 1, heads, slots, hd).clone(),
                  torch.zeros(layers, 1, heads, slots, hd), torch.ones(1, slots, dtype=torch.bool),
                  torch.tensor([slots]), torch.tensor([len(ids)]))
    cache.store(ids, key, row)


BOI = 2010
IMG = [BOI, 2000, 2011]  # boi, placeholder, eoi
P = 16


def make_cache(budget=1 << 20):
    return PrefixCache(budget, BOI, P + 2)


def test_a_different_image_stops_the_match_before_the_image():
    cache = make_cache()
    ids = [1, 2, 3] + IMG + [4, 5, 6]
    store_fake(cache, ids, "image-1", slots=len(ids) + P - 1)
    same = cache.lookup(ids + [7], "image-1")
    assert (same.tokens, same.slots) == (len(ids), len(ids) + P - 1)
    other = cache.lookup(ids + [7], "image-2")
    assert (other.tokens, other.slots) == (3, 3)
    assert cache.lookup([1, 2, 3, 4], None).tokens == 3


def test_a_match_never_ends_inside_the_image_tokens_and_leaves_a_token_to_prefill():
    cache = make_cache()
    ids = [1, 2] + IMG + [4]
    store_fake(cache, ids, "k", slots=len(ids) + P - 1)
    # the query diverges on the placeholder position: reuse stops before <|begin_of_image|>
    assert cache.lookup([1, 2, BOI, 99, 2011, 4], "k").tokens == 2
    # the whole query is cached: one token is still prefilled to get the next logits
    assert cache.lookup(ids, "k").tokens == len(ids) - 1
    # a text-only entry of the same text never lends its slots past the prefix
    text = make_cache()
    store_fake(text, [1, 2, 3, 4], None)
    assert text.lookup([1, 2] + IMG + [4], "k").tokens == 2


def test_load_writes_the_prefix_and_positions_into_a_row():
    cache = make_cache()
    ids = [1, 2] + IMG + [4, 5]
    store_fake(cache, ids, "k", slots=len(ids) + P - 1)
    match = cache.lookup(ids + [9, 9], "k")
    from glm4v.model.language import KVCache

    row = KVCache.allocate(type("C", (), {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16})(), 1, 64,
                           torch.float32, "cpu")
    row.valid.fill_(True)
    PrefixCache.load(match, row)
    assert int(row.lengths[0]) == match.slots == len(ids) + P - 1
    assert int(row.positions[0]) == len(ids)
    assert row.valid[0, : match.slots].all() and not row.valid[0, match.slots :].any()
    assert torch.equal(row.k[0, 0, 0, : match.slots, 0], torch.arange(match.slots, dtype=torch.float32))


def test_memory_budget_lru_and_superseded_entries():
    per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers x 2 heads x 16 dims, fp32
    cache = make_cache(budget=per_token * 25)
    store_fake(cache, [1, 2, 3, 4, 5], None)
    store_fake(cache, [1, 2, 3, 4, 5, 6, 7], None)  # extends the first: replaces it
    assert len(cache) == 1 and cache.nbytes == 7 * per_token
    store_fake(cache, [8] * 10, None)
    cache.lookup([1, 2, 3, 4, 5, 6, 7, 0], None)  # touch: [1..7] is now the most recent
    store_fake(cache, [9] * 10, None)  # over budget: the least recently used entry goes
    assert cache.nbytes <= cache.budget_bytes
    assert cache.lookup([8] * 10 + [0], None).entry is None
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 0], None).tokens == 7
    store_fake(cache, [7] * 30, None)  # larger than the whole budget: not kept
    assert cache.lookup([7] * 30, None).entry is None


def test_pipeline_chat_reuses_the_previous_turn(pipe):
    plain = Pipeline(pipe.model, pipe.tokenizer, prefix_cache_bytes=0)
    assert plain.prefix_cache is None
    cached = Pipeline(pipe.model, pipe.tokenizer)
    answer1 = cached.chat(conversation(IMAGE_B, turns=1), max_new_tokens=12)
    assert answer1 == plain.chat(conversation(IMAGE_B, turns=1), max_new_tokens=12)
    conv2 = conversation(IMAGE_B, turns=1) + [{"role": "assistant", "content": answer1.removeprefix("\n")},
                                               {"role": "user", "content": "And then?"}]
    before = cached.prefix_cache.hit_tokens
    assert cached.chat(conv2, max_new_tokens=12) == plain.chat(conv2, max_new_tokens=12)
    turn1_ids, _ = pipe.tokenizer.encode_chat(conversation(IMAGE_B, turns=1))
    assert cached.prefix_cache.hit_tokens - before >= len(turn1_ids)
