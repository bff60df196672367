"""The engine loop: continuous batching gives each request the text it gets alone, and frees rows at once."""

import threading
import time

import pytest

from glm4v.engine import Pipeline, load
from glm4v.errors import ContextLengthError, ImageError
from glm4v.generate import GenerationConfig
from glm4v.image import image_digest, load_image
from glm4v.scheduler import EngineClosed, QueueFull, RequestTimeout, Scheduler
from tests.conftest import TINY_DIR
from tests.serving import IMAGE_A, IMAGE_B


@pytest.fixture(scope="module")
def pipe():
    return load(TINY_DIR)


@pytest.fixture(scope="module")
def reference(pipe):
    """pipe.chat without any prefix reuse: the single-request ground truth."""
    return Pipeline(pipe.model, pipe.tokenizer, prefix_cache_bytes=0)


def conv(i, image=IMAGE_A):
    return [{"role": "user", "image": load_image(image), "content": f"Question number {i}: what is shown?"}]


def submit(scheduler, pipe, conversation, **gen):
    ids, image = pipe.tokenizer.encode_chat(conversation)
    kwargs = {k: gen.pop(k) for k in ("ignore_eos", "timeout") if k in gen}
    return scheduler.submit(ids, GenerationConfig.from_kwargs(**gen), image=image,
                            image_key=image_digest(image) if image is not None else None, **kwargs)


@pytest.mark.parametrize("max_batch,chunk", [(1, 0), (4, 5)])
def test_batched_requests_get_the_text_they_get_alone(pipe, reference, max_batch, chunk):
    with Scheduler(pipe, max_batch=max_batch, prefill_chunk=chunk) as scheduler:
        requests = [submit(scheduler, pipe, conv(i, IMAGE_A if i % 2 else IMAGE_B), max_new_tokens=24) for i in range(6)]
        texts = [r.text(timeout=60) for r in requests]
        stats = scheduler.snapshot()
    for i, text in enumerate(texts):
        alone = reference.chat(conv(i, IMAGE_A if i % 2 else IMAGE_B), max_new_tokens=24)
        assert text == alone.removeprefix("\n")
    assert stats["max_active"] == max_batch  # rows really decoded together
    assert stats["completed"] == 6 and stats["failed"] == 0


def test_a_new_request_joins_the_running_batch(pipe):
    with Scheduler(pipe, max_batch=2) as scheduler:
        long = submit(scheduler, pipe, conv(0), max_new_tokens=3000, ignore_eos=True)
        while not long.output_ids:
            time.sleep(0.001)
        short = submit(scheduler, pipe, conv(1), max_new_tokens=5, ignore_eos=True)
        assert short.done.wait(30)
        assert not long.done.is_set()  # the short one did not wait for the long one
        assert scheduler.snapshot()["max_active"] == 2
        scheduler.cancel(long)
        assert long.done.wait(10) and long.finish_reason == "cancelled"
    assert short.finish_reason == "length" and short.completion_tokens == 5


def test_cancel_frees_the_row_for_the_next_request(pipe):
    with Scheduler(pipe, max_batch=1) as scheduler:
        first = submit(scheduler, pipe, conv(0), max_new_tokens=5000, ignore_eos=True)
        waiting = submit(scheduler, pipe, conv(1), max_new_tokens=4, ignore_eos=True)
        while len(first.output_ids) < 3:
            time.sleep(0.001)
        assert not waiting.done.is_set()
        scheduler.cancel(first)
        assert waiting.done.wait(10)
        assert first.finish_reason == "cancelled" and first.completion_tokens < 5000
        assert waiting.finish_reason == "length"


def test_stop_strings_stop_tokens_and_length(pipe):
    with Scheduler(pipe) as scheduler:
        full = submit(scheduler, pipe, conv(3), max_new_tokens=30, ignore_eos=True).text(timeout=30)
        stop = full[len(full) // 2: len(full) // 2 + 3]
        stopped = submit(scheduler, pipe, conv(3), max_new_tokens=30, stop_strings=[stop], ignore_eos=True)
        assert stopped.text(timeout=30) == full[: full.index(stop)]
        assert stopped.finish_reason == "stop"
        first = submit(scheduler, pipe, conv(3), max_new_tokens=1)
        first.text(timeout=30)
        token = first.output_ids[0]
        by_token = submit(scheduler, pipe, conv(3), max_new_tokens=30, stop_token_ids=[token])
        assert by_token.text(timeout=30) == "" and by_token.finish_reason == "stop"
        length = submit(scheduler, pipe, conv(3), max_new_tokens=7, ignore_eos=True)
        length.text(timeout=30)
        assert length.finish_reason == "length" and length.completion_tokens == 7


def test_seeded_sampling_is_the_same_alone_and_batched(pipe):
    settings = dict(max_new_tokens=20, do_sample=True, temperature=1.0, top_p=0.9, seed=1234)
    with Scheduler(pipe, max_batch=1) as scheduler:
        alone = submit(scheduler, pipe, conv(5), **settings).text(timeout=30)
    with Scheduler(pipe, max_batch=4, prefix_cache_bytes=0) as scheduler:
        others = [submit(scheduler, pipe, conv(i), **{**settings, "seed": i}) for i in range(3)]
        batched = submit(scheduler, pipe, conv(5), **settings)
        assert batched.text(timeout=30) == alone
        assert all(o.text(timeout=30) is not None for o in others)


def test_turn_two_prefills_only_its_new_tokens(pipe):
    with Scheduler(pipe) as scheduler:
        turn1 = conv(7)
        first = submit(scheduler, pipe, turn1, max_new_tokens=16)
        answer = first.text(timeout=30)
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]
        second = submit(scheduler, pipe, turn2, max_new_tokens=4)
        second.text(timeout=30)
    ids1, _ = pipe.tokenizer.encode_chat(turn1)
    ids2, _ = pipe.tokenizer.encode_chat(turn2)
    assert first.cached_tokens == 0 and first.prefilled_tokens == first.prompt_tokens
    assert second.cached_tokens >= first.prompt_tokens  # turn 1's prompt, image included, was reused
    assert second.prefilled_tokens <= len(ids2) - len(ids1)
    assert second.prefilled_tokens + second.cached_tokens == second.prompt_tokens


def test_bounded_queue_context_limit_and_timeout(pipe):
    with Scheduler(pipe, max_batch=1, max_queue=1) as scheduler:
        running = submit(scheduler, pipe, conv(0), max_new_tokens=5000, ignore_eos=True)
        while not running.output_ids:
            time.sleep(0.001)
        queued = submit(scheduler, pipe, conv(1), max_new_tokens=2)
        with pytest.raises(QueueFull, match="queue limit 1"):
            submit(scheduler, pipe, conv(2), max_new_tokens=2)
        assert scheduler.snapshot()["rejected"] == 1
        scheduler.cancel(running)
        assert queued.done.wait(10) and queued.finish_reason in ("stop", "length")
        with pytest.raises(ContextLengthError, match="tokens"):
            submit(scheduler, pipe, [{"role": "user", "content": "word " * 9000}], max_new_tokens=2)
        slow = submit(scheduler, pipe, conv(3), max_new_tokens=5000, ignore_eos=True, timeout=0.3)
        with pytest.raises(RequestTimeout, match="0.3 s"):
            slow.text(timeout=30)
        assert slow.completion_tokens < 5000


def test_a_failing_request_does_not_stop_the_engine(pipe):
    with Scheduler(pipe) as scheduler:
        ids, _ = pipe.tokenizer.encode_chat(conv(0))
        broken = scheduler.submit(ids, GenerationConfig(max_new_tokens=3), image=b"not an image", image_key="bogus")
        with pytest.raises(ImageError):
            broken.text(timeout=30)
        fine = submit(scheduler, pipe, conv(1), max_new_tokens=3, ignore_eos=True)
        fine.text(timeout=30)
        assert fine.finish_reason == "length"
        assert scheduler.snapshot()["failed"] == 1


def test_close_fails_what_is_pending(pipe):
    scheduler = Scheduler(pipe, max_batch=1)
    running = submit(scheduler, pipe, conv(0), max_new_tokens=5000, ignore_eos=True)
    waiting = submit(scheduler, pipe, conv(1), max_new_tokens=5)
    while not running.output_ids:
        time.sleep(0.001)
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    closer.join(10)
    for request in (running, waiting):
        with pytest.raises(EngineClosed):
            request.text(timeout=10)
    with pytest.raises(EngineClosed):
        submit(scheduler, pipe, conv(2), max_new_tokens=1)


def test_serving_benchmark_measures_both_goals(pipe):
    from glm4v.bench_serving import measure_throughput, measure_ttft

    throughput = measure_throughput(pipe, concurrency=3, tokens=6)
    assert throughput["batch"]["requests"] == 3 and throughput["batch"]["decode_tokens"] >= 3 * 5
    assert throughput["batch"]["steps"] < throughput["batch"]["decode_tokens"]  # several rows per step
    assert throughput["speedup"] > 0
    ttft = measure_ttft(pipe, repeats=1)
    run = ttft["runs"][0]
    assert run["turn2_prefilled_tokens"] <= run["turn2_prompt_tokens"] - run["turn1_prompt_tokens"]
    assert 0 < ttft["ratio"] and run["turn2_s"] > 0
