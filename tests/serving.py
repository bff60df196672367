"""Test support: a real ``glm4v serve`` app on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from tests.conftest import IMAGES_DIR

IMAGE_A = IMAGES_DIR / "img_a_160x120.png"
IMAGE_B = IMAGES_DIR / "img_b_96x80.png"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(pipe, **settings):
    """Yield (base_url, app) of a server for ``pipe``; stops it (and its engine thread) on exit."""
    import uvicorn

    from glm4v.server import ServerSettings, create_app

    settings.setdefault("model_name", "test-model")
    app = create_app(pipe, ServerSettings(**settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)


def openai_error(response) -> dict:
    """The error object of a 4xx answer, checked to be in the OpenAI shape."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def budget(config, env: str, default: int, slow: int) -> int:
    """How many iterations a fuzz or load test runs: $env if set, else `slow` with --runslow, else `default`.

    The default keeps the test inside the CI budget; the longer runs are for a quiet machine.
    """
    if os.environ.get(env):
        return int(os.environ[env])
    return slow if config.getoption("--runslow") else default
