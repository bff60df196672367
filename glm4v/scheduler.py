"""One engine loop that owns the model and serves many conversations at once (continuous batching).

Requests wait in a bounded queue (``QueueFull`` when it is full). A single background thread runs
the model; on every turn of its loop it

1. admits the next queued request if a batch row is free, looks up the longest cached prefix of
   its conversation (``PrefixCache``) and starts prefilling the rest into a one-row scratch cache;
2. runs one prefill chunk of that request (long prompts are cut into chunks so that the requests
   already decoding keep getting tokens); when the prompt is done the first token is sampled and
   the row is copied into the shared, preallocated ``KVCache``;
3. decodes one token for every active row together: one forward over ``cache.narrow(0, n)``,
   whose rows may have different lengths (``build_step`` masks each row's own slots).

So a new request joins the running batch at the next step, and a finished, cancelled or
timed-out request leaves it at once: the last active row is moved into its place, which keeps
the active rows contiguous so that a step never computes an idle row. Each request has its own
``Sampler`` (and seed), stop tokens, stop strings and token budget; its text is sent as events to
a sink the caller supplies (the server's asyncio queue, or a thread-safe queue by default).
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from glm4v.errors import Glm4vError, InputError
from glm4v.generate import GenerationConfig, Sampler, TextStream, check_context
from glm4v.prefix_cache import PrefixCache, prefill_chunks


class QueueFull(Glm4vError):
    """The request queue is full: try again later (HTTP 429)."""


class EngineClosed(Glm4vError):
    """The engine is shutting down (HTTP 503)."""


class RequestTimeout(Glm4vError):
    """The request ran past its time limit (HTTP 408)."""


class EngineFailure(Glm4vError):
    """The model failed while running a request (a bug or an out-of-memory, not bad input)."""


@dataclass
class Event:
    kind: str  # "text", "done" or "error"
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" (kind "done"), "timeout"
    error: Exception | None = None


_ids = itertools.count(1)


class Request:
    """One generation: its prompt and settings, and the counters the engine fills in."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, *, image=None, image_key: str | None = None,
                 ignore_eos: bool = False, timeout: float | None = None, sink: Callable[[Event], None] | None = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.config = config
        self.image = image
        self.image_key = image_key
        self.ignore_eos = ignore_eos
        self.submitted_at = time.monotonic()
        self.deadline = self.submitted_at + timeout if timeout else None
        self._events: queue.Queue | None = None
        if sink is None:
            self._events = queue.Queue()
            sink = self._events.put
        self.sink = sink
        self.cancelled = False
        self.done = threading.Event()
        # Filled in by the engine. Token counts are cache slots: an image counts as its P+2 rows.
        self.max_new_tokens = config.max_new_tokens
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.prefilled_tokens = 0
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.started_at = self.first_token_at = self.finished_at = None
        # engine-private state
        self._sampler: Sampler | None = None
        self._text: TextStream | None = None
        self._stop_ids: set[int] = set()
        self._prefill = None
        self._at_start = True
        self._fast_greedy = False

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def cancel(self) -> None:
        """Stop generating as soon as possible (checked by the engine every step)."""
        self.cancelled = True

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events of a request submitted without a sink, until "done" or "error"."""
        if self._events is None:
            raise RuntimeError("this request was submitted with its own sink")
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.kind != "text":
                return

    def text(self, timeout: float | None = None) -> str:
        """The whole answer (blocking); raises the request's error if it failed."""
        pieces = []
        for event in self.events(timeout):
            if event.kind == "error":
                raise event.error
            pieces.append(event.text)
        return "".join(pieces)


class Scheduler:
    def __init__(self, pipe, *, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 prefill_chunk: int = 512, prefix_cache_bytes: int = 1 << 30, strip_leading_newline: bool = True,
                 start: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.pipe = pipe
        self.model = pipe.model
        config = self.model.config
        self.context = min(config.seq_length, max_len or config.seq_length)
        self.image_slots = config.num_image_tokens + 2
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.strip_leading_newline = strip_leading_newline
        self.eos_ids = set(config.eos_token_ids)
        self.vocab_size = len(pipe.tokenizer)
        self.cache = self.model.allocate_cache(max_batch, self.context)
        self.scratch = self.model.allocate_cache(1, self.context)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, config.boi_token_id, self.image_slots)
        self.stats = dict(submitted=0, rejected=0, completed=0, cancelled=0, timed_out=0, failed=0,
                          prefill_tokens=0, cached_tokens=0, prefill_seconds=0.0,
                          decode_steps=0, decode_tokens=0, decode_seconds=0.0, max_active=0)
        self._queue: deque[Request] = deque()
        self._active: list[Request] = []  # request of batch row i is _active[i]
        self._prefilling: Request | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="glm4v-engine", daemon=True)
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the engine thread (once)."""
        with self._cond:
            if self._started or self._closed:
                return
            self._started = True
        self._thread.start()
        # a daemon thread still inside a torch op at interpreter exit aborts the process
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- client side (any thread) -----------------------------------------------------------------
    def submit(self, prompt_ids: list[int], config: GenerationConfig | None = None, **kwargs) -> Request:
        """Queue a generation; raises ContextLengthError, QueueFull or EngineClosed right away."""
        return self.submit_request(Request(prompt_ids, config or GenerationConfig(), **kwargs))

    def submit_request(self, request: Request) -> Request:
        request.config.validate()
        has_image = request.image is not None
        if has_image and request.image_key is None:
            raise InputError("a request with an image needs its image_key (glm4v.image.image_digest)")
        text_tokens = len(request.prompt_ids) - (3 if has_image else 0)
        request.max_new_tokens = check_context(text_tokens, self.image_slots if has_image else 0,
                                               request.config.max_new_tokens, self.context)
        request.prompt_tokens = text_tokens + (self.image_slots if has_image else 0)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is not running (shut down, or stopped by an error: see the server log)")
            self._sweep_queue()
            if len(self._queue) - self._free_rows() >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the server is busy: {len(self._queue)} requests are already waiting "
                                f"(queue limit {self.max_queue}); retry later")
            self._queue.append(request)
            self.stats["submitted"] += 1
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._cond:
            self._cond.notify()

    def snapshot(self) -> dict:
        with self._cond:
            return {**self.stats, "active": len(self._active), "queued": len(self._queue),
                    "prefilling": int(self._prefilling is not None), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "prefix_cache": self.prefix_cache.stats()}

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _free_rows(self) -> int:
        # queued requests up to this many are not waiting: they take a row at the next steps
        return self.max_batch - len(self._active) - (self._prefilling is not None)

    def _sweep_queue(self) -> None:
        now = time.monotonic()
        for request in [r for r in self._queue if r.cancelled or (r.deadline and now > r.deadline)]:
            self._queue.remove(request)
            self._end_early(request)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        stopped_by = None
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        self._sweep_queue()
                        while not (self._closed or self._queue or self._prefilling or self._active):
                            self._cond.wait()
                        if self._closed:
                            break
                        admitted = None
                        if self._prefilling is None and self._queue and len(self._active) < self.max_batch:
                            admitted = self._prefilling = self._queue.popleft()
                    self._guard(list(self._active), self._expire)
                    if admitted is not None:
                        self._guard([admitted], self._begin_prefill, admitted)
                    if self._prefilling is not None:
                        self._guard([self._prefilling], self._prefill_step)
                    if self._active:
                        self._guard(list(self._active), self._decode_step)
        except BaseException as e:  # not an Exception (those end in _guard): the loop cannot go on
            stopped_by = e
            raise
        finally:
            # however the loop ends, nobody is left waiting: a stopped engine serves no one, and
            # every request it held gets an answer now (a client must never hang on a dead thread)
            with self._cond:
                self._closed = True
                pending = list(self._queue) + ([self._prefilling] if self._prefilling else []) + self._active
                self._queue.clear()
                self._active.clear()
                self._prefilling = None
            for request in pending:
                if not request.done.is_set():
                    self._fail(request, EngineClosed("the engine shut down before this request finished")
                               if stopped_by is None else
                               EngineFailure(f"the engine stopped: {type(stopped_by).__name__}: {stopped_by}"))

    @property
    def running(self) -> bool:
        """True while the engine thread serves requests (False before start, after close or a fatal error)."""
        return self._started and self._thread.is_alive() and not self._closed

    def _guard(self, requests: list[Request], step, *args) -> None:
        """Run one engine step; a failure ends the requests involved and the engine goes on."""
        try:
            step(*args)
        except Exception as e:  # noqa: BLE001 - the engine must survive anything one request causes
            error = e if isinstance(e, Glm4vError) else EngineFailure(f"generation failed: {type(e).__name__}: {e}")
            for request in requests:
                if request.finish_reason is None:
                    self._fail(request, error)
            if self._prefilling in requests:
                self._prefilling = None
            if any(r in requests for r in self._active):
                self._active = [r for r in self._active if r not in requests]
                self._compact_after_failure()

    def _begin_prefill(self, request: Request) -> None:
        if request.cancelled or self._expired(request):
            self._prefilling = None
            self._end_early(request)
            return
        request.started_at = time.monotonic()
        config = request.config
        request._sampler = Sampler(config, self.model.device, request.prompt_ids)
        request._fast_greedy = config.greedy and request._sampler.seen is None
        request._text = TextStream(self.pipe.tokenizer, config.stop_strings)
        if not request.ignore_eos:
            request._stop_ids = set(config.stop_token_ids) if config.stop_token_ids is not None else self.eos_ids
        match = self.prefix_cache.lookup(request.prompt_ids, request.image_key)
        PrefixCache.load(match, self.scratch)
        request.cached_tokens = match.slots
        request.prefilled_tokens = request.prompt_tokens - match.slots
        image_at = self.prefix_cache.image_start(request.prompt_ids, request.image_key)
        request._prefill = prefill_chunks(self.model, self.scratch, request.prompt_ids, match.tokens, image_at,
                                          lambda: self.pipe.image_features(request.image)[0], self.prefill_chunk,
                                          vocab_limit=self.vocab_size)

    def _prefill_step(self) -> None:
        request = self._prefilling
        if request.cancelled or self._expired(request):
            self._prefilling = None
            self._end_early(request)
            return
        started = time.monotonic()
        logits = next(request._prefill)
        self.stats["prefill_seconds"] += time.monotonic() - started
        if logits is None:
            return
        request._prefill = None
        self.stats["prefill_tokens"] += request.prefilled_tokens
        self.stats["cached_tokens"] += request.cached_tokens
        self.prefix_cache.store(request.prompt_ids, request.image_key, self.scratch)
        request.first_token_at = time.monotonic()
        if self._accept(request, request._sampler(logits)):
            self._announce(request)
        else:
            self._join(request)
        # only now: submit() counts free rows without waiting for this thread, and a request that is
        # neither prefilling nor active for an instant would let one more in than the queue limit
        self._prefilling = None

    def _join(self, request: Request) -> None:
        """Copy the scratch row into the next batch row: the request decodes from the next step."""
        row, n = len(self._active), int(self.scratch.lengths[0])
        cache = self.cache
        cache.k[:, row, :, :n].copy_(self.scratch.k[:, 0, :, :n])
        cache.v[:, row, :, :n].copy_(self.scratch.v[:, 0, :, :n])
        cache.valid[row, :n] = True
        cache.lengths[row] = n
        cache.positions[row] = self.scratch.positions[0]
        self._active.append(request)
        self.stats["max_active"] = max(self.stats["max_active"], len(self._active))

    def _decode_step(self) -> None:
        active = self._active
        n = len(active)
        started = time.monotonic()
        tokens = torch.tensor([r.output_ids[-1] for r in active], dtype=torch.long, device=self.model.device)
        out = self.model(tokens[:, None], kv_cache=self.cache.narrow(0, n), logits_to_keep=1)
        logits = out.logits[:, -1]
        logits[:, self.vocab_size:] = float("-inf")  # the output layer's padding rows are no tokens
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row instead of one per row
        finished = []
        for i, request in enumerate(active):
            token = greedy[i] if request._fast_greedy else request._sampler(logits[i].float())
            if self._accept(request, token):
                finished.append(i)
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += n
        self.stats["decode_seconds"] += time.monotonic() - started
        done = [self._active[i] for i in finished]
        for i in reversed(finished):
            self._release(i)
        for request in done:  # after the release: a client told "done" finds its row already free
            self._announce(request)

    def _accept(self, request: Request, token: int) -> bool:
        """Record a sampled token; True when the request is finished."""
        request.output_ids.append(token)
        if token in request._stop_ids:
            return self._finish(request, "stop")
        delta = request._text.push(token)
        if delta and request._at_start:
            request._at_start = False
            if self.strip_leading_newline and delta.startswith("\n"):
                delta = delta[1:]  # the template's "\n" after <|assistant|>, not part of the answer
        if delta:
            self._emit(request, Event("text", delta))
        if request._text.stopped:
            return self._finish(request, "stop")
        if len(request.output_ids) >= request.max_new_tokens:
            return self._finish(request, "length")
        return False

    def _finish(self, request: Request, reason: str) -> bool:
        tail = request._text.finish() if request._text is not None else ""
        if tail and request._at_start and self.strip_leading_newline and tail.startswith("\n"):
            tail = tail[1:]
        if tail:
            self._emit(request, Event("text", tail))
        request.finish_reason = reason
        request.finished_at = time.monotonic()
        self.stats["completed" if reason in ("stop", "length") else "cancelled"] += 1
        return True

    def _announce(self, request: Request) -> None:
        self._emit(request, Event("done", finish_reason=request.finish_reason))
        request.done.set()

    def _release(self, i: int) -> None:
        """Free batch row i (keeping its keys/values in the prefix cache) and close the gap."""
        request = self._active[i]
        fed = request.prompt_ids + request.output_ids[:-1]  # the last sampled token was never fed
        self.prefix_cache.store(fed, request.image_key, self.cache.narrow(i, 1))
        last = len(self._active) - 1
        if i != last:
            self._move_row(last, i)
            self._active[i] = self._active[last]
        self._active.pop()

    def _move_row(self, src: int, dst: int) -> None:
        cache = self.cache
        n = int(cache.lengths[src])
        cache.k[:, dst, :, :n].copy_(cache.k[:, src, :, :n])
        cache.v[:, dst, :, :n].copy_(cache.v[:, src, :, :n])
        cache.valid[dst, :n] = cache.valid[src, :n]
        cache.lengths[dst] = cache.lengths[src]
        cache.positions[dst] = cache.positions[src]

    def _compact_after_failure(self) -> None:
        # after a failed step the rows' contents are unknown: drop every row (their requests failed)
        for request in self._active:
            self._fail(request, EngineFailure("generation failed in a batch this request was part of"))
        self._active = []
        self.cache.reset()

    def _expired(self, request: Request) -> bool:
        return request.deadline is not None and time.monotonic() > request.deadline

    def _expire(self) -> None:
        for i in reversed(range(len(self._active))):
            request = self._active[i]
            if request.cancelled or self._expired(request):
                self._release(i)
                self._end_early(request)

    def _end_early(self, request: Request) -> None:
        if request.finish_reason is not None:
            return
        if request.cancelled:
            self._finish(request, "cancelled")
            self._announce(request)
            return
        self.stats["timed_out"] += 1
        request.finish_reason = "timeout"
        limit = request.deadline - request.submitted_at
        self._fail(request, RequestTimeout(f"the request took longer than its time limit of {limit:g} s"), count=False)

    def _fail(self, request: Request, error: Exception, count: bool = True) -> None:
        if count:
            self.stats["failed"] += 1
        request.error = error
        if request.finish_reason is None:
            request.finish_reason = "error"
        request.finished_at = time.monotonic()
        self._emit(request, Event("error", error=error))
        request.done.set()

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:  # noqa: BLE001 - a client that went away must not stop the engine
            request.cancelled = True


def _close_at_exit(ref) -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.close()
