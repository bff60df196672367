"""A bounded load test of `glm4v serve` on loopback, the server in its own process.

64 clients send a few hundred requests (GLM4V_LOAD_REQUESTS=N or --runslow for more): streamed and
non-streamed greedy requests, streams dropped after their first words, and invalid requests of
every kind. The queue is kept short so that some requests are refused with 429 and retried. At the
end every valid request got exactly its solo answer, nothing got a 5xx, the server logged no
exception, it is idle and healthy, and its resident memory is back near where it started.
"""

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import IMAGES_DIR, TINY_DIR
from tests.serving import budget, data_url, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "load-model"
CLIENTS = 64
TOKENS = 12
IMAGES = [IMAGES_DIR / name for name in ("img_a_160x120.png", "img_b_96x80.png", "img_c_112x112.png")]


def conversation(i: int) -> list[dict]:
    question = f"Question {i}: what do you see, and what colour is it?"
    if i % 2 == 0:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[i % 3])}},
                                         {"type": "text", "text": question}]}]


def body(i: int, **extra) -> dict:
    return {"model": MODEL, "messages": conversation(i), "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            **extra}


def invalid_requests() -> list[tuple[str, dict | bytes, str, int]]:
    """(name, body, content type, expected status)"""
    hello = [{"role": "user", "content": "hi"}]
    picture = {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}
    other = {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}}
    json_type = "application/json"
    return [
        ("malformed-json", b'{"messages": [', json_type, 400),
        ("unknown-field", {"model": MODEL, "messages": hello, "frobnicate": 1}, json_type, 400),
        ("n-2", {"model": MODEL, "messages": hello, "n": 2}, json_type, 400),
        ("huge-max-tokens", {"model": MODEL, "messages": hello, "max_tokens": 10 ** 9}, json_type, 400),
        ("negative-temperature", {"model": MODEL, "messages": hello, "temperature": -1}, json_type, 400),
        ("over-context", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, json_type, 400),
        ("unknown-model", {"model": "gpt-4o", "messages": hello}, json_type, 404),
        ("text-plain", {"model": MODEL, "messages": hello}, "text/plain", 415),
        ("too-large", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1_200_000}]}, json_type, 413),
        ("corrupt-image", {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA"}}]}]}, json_type, 422),
        ("two-images", {"model": MODEL, "messages": [{"role": "user", "content": [picture, other]}]}, json_type, 422),
    ]


class Server:
    """`glm4v serve` in a subprocess: its URL, pid and stderr."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "server.log", "w+")
        command = [sys.executable, "-m", "glm4v.cli", "serve", "--model", str(TINY_DIR), "--port", str(self.port),
                   "--served-model-name", MODEL, "--max-batch", "8", "--max-queue", "16", "--max-body-mb", "1",
                   "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.output()}")
            time.sleep(0.1)

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.statuses: Counter = Counter()
        self.kinds: Counter = Counter()
        self.failures: list[str] = []

    def saw(self, status: int):
        with self.lock:
            self.sent += 1
            self.statuses[status] += 1

    def fail(self, message: str):
        with self.lock:
            self.failures.append(message)


def read_stream(response) -> tuple[str, str | None, dict | None]:
    text, finish, usage = [], None, None
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            break
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish, usage


def run_job(http: httpx.Client, url: str, job: tuple, solo: dict, tally: Tally, rng: random.Random):
    kind, arg = job
    endpoint = url + "/v1/chat/completions"
    if kind == "invalid":
        name, payload, content_type, expected = arg
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response = http.post(endpoint, content=content, headers={"Content-Type": content_type})
        tally.saw(response.status_code)
        error = response.json().get("error", {})
        if response.status_code != expected or not error.get("message"):
            tally.fail(f"{name}: {response.status_code} {response.text[:200]}")
        return
    i = arg
    for _ in range(500):  # retried while the queue is full (429), as a client should
        if kind == "complete":
            response = http.post(endpoint, json=body(i))
            tally.saw(response.status_code)
            if response.status_code == 429:
                time.sleep(rng.uniform(0.05, 0.2))
                continue
            answer = response.json()
            if response.status_code != 200 or answer["choices"][0]["message"]["content"] != solo[i] \
                    or answer["usage"]["completion_tokens"] != TOKENS:
                tally.fail(f"complete {i}: {response.status_code} {response.text[:200]}")
            return
        with http.stream("POST", endpoint, json=body(i, stream=True, stream_options={"include_usage": True})) as response:
            tally.saw(response.status_code)
            if response.status_code == 429:
                response.read()
                time.sleep(rng.uniform(0.05, 0.2))
                continue
            if response.status_code != 200:
                tally.fail(f"{kind} {i}: {response.status_code} {response.read()[:200]}")
                return
            if kind == "cancel":  # read the first words, then hang up mid-answer
                for line in response.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break
                return
            text, finish, usage = read_stream(response)
            if text != solo[i] or finish != "length" or usage["completion_tokens"] != TOKENS:
                tally.fail(f"stream {i}: {text!r} != {solo[i]!r} ({finish}, {usage})")
            return
    tally.fail(f"{kind} {i}: still refused with 429 after 500 tries")


def test_load_on_loopback(request, tmp_path, capsys):
    total = budget(request.config, "GLM4V_LOAD_REQUESTS", 320, 3000)
    prompts = 16
    server = Server(tmp_path)
    try:
        with httpx.Client(timeout=120) as http:
            solo = {i: http.post(server.url + "/v1/chat/completions", json=body(i)).json()["choices"][0]["message"]["content"]
                    for i in range(prompts)}
        assert len(set(solo.values())) > 1
        rss_start = server.rss()

        rng = random.Random(5)
        invalid = invalid_requests()
        kinds = rng.choices(["stream", "complete", "cancel", "invalid"], weights=[35, 30, 15, 20], k=total)
        jobs = [(kind, rng.choice(invalid) if kind == "invalid" else rng.randrange(prompts)) for kind in kinds]
        tally = Tally()
        tally.kinds.update(kinds)
        peak, sampling = [rss_start], threading.Event()

        def sample():
            while not sampling.wait(0.02):
                peak[0] = max(peak[0], server.rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        queue = iter(jobs)
        lock = threading.Lock()

        def client(seed):
            rng = random.Random(seed)
            with httpx.Client(timeout=120) as http:
                while True:
                    with lock:
                        job = next(queue, None)
                    if job is None:
                        return
                    try:
                        run_job(http, server.url, job, solo, tally, rng)
                    except Exception as e:  # noqa: BLE001 - reported below with the others
                        tally.fail(f"{job[0]}: {type(e).__name__}: {e}")

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        elapsed = time.monotonic() - started

        # every row freed, every cancelled stream cleaned up
        deadline = time.monotonic() + 15
        while True:
            health = httpx.get(server.url + "/health").json()
            if (health["active"], health["queued"]) == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        sampling.set()
        sampler.join()
        rss_final = server.rss()
        with httpx.Client(timeout=60) as http:  # still answering, and still the same answer
            after = http.post(server.url + "/v1/chat/completions", json=body(3)).json()["choices"][0]["message"]["content"]
    finally:
        code = server.stop()
    log = server.output()

    refused = {s: n for s, n in sorted(tally.statuses.items()) if s >= 400}
    mib = 1 / (1024 * 1024)
    with capsys.disabled():
        print(f"\n[load] {total} requests ({dict(tally.kinds)}) from {CLIENTS} clients in {elapsed:.1f} s: "
              f"{tally.sent} HTTP requests sent (with 429 retries), {tally.statuses[200]} answered 200, "
              f"refused by status {refused}; server RSS start {rss_start * mib:.0f} MiB, "
              f"peak {peak[0] * mib:.0f} MiB, final {rss_final * mib:.0f} MiB")
    assert tally.failures == [], tally.failures[:10]
    assert not any(status >= 500 for status in tally.statuses), tally.statuses
    assert (health["active"], health["queued"]) == (0, 0), health
    assert after == solo[3]
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    assert code in (0, -15), log[-2000:]  # uvicorn re-raises the SIGTERM it handled, after a clean shutdown
    assert rss_final - rss_start < max(64 * 1024 * 1024, 0.15 * rss_start), (rss_start, rss_final)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread re-raises, for the log
def test_an_engine_that_dies_answers_everyone_and_reports_it(monkeypatch):
    """A fault the engine loop cannot survive (here: SystemExit in a decode step) must not leave any
    client waiting forever: the requests in flight get an error, later ones a 503, /health says so."""
    from glm4v.engine import load
    from tests.serving import running_server

    pipe = load(TINY_DIR)
    with running_server(pipe, max_batch=2) as (url, app):
        scheduler = app.state.scheduler
        real_step = scheduler._decode_step
        calls = []

        def dying_step():
            # Die only once both requests decode together, so that both are in flight whatever
            # order the two posts reach the server in.
            if len(scheduler._active) == 2:
                calls.append(1)
            if len(calls) == 3:
                raise SystemExit("injected fault")
            real_step()

        monkeypatch.setattr(scheduler, "_decode_step", dying_step)
        long = {"model": "test-model", "messages": [{"role": "user", "content": "Tell a long story"}],
                "max_tokens": 4000, "ignore_eos": True}
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda body: httpx.post(url + "/v1/chat/completions", json=body, timeout=30),
                                    [long, {**long, "stream": True}]))
        assert time.monotonic() - started < 10
        complete, streamed = answers
        assert complete.status_code == 500 and complete.json()["error"]["code"] == "engine_failure"
        assert "injected fault" in complete.json()["error"]["message"]
        assert streamed.status_code == 200 and '"engine_failure"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
        assert not scheduler.running
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "engine stopped"
        later = httpx.post(url + "/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=30)
        assert later.status_code == 503 and later.json()["error"]["code"] == "shutting_down"
