"""Schema fuzzing of the chat API: arbitrary JSON bodies, mutated valid requests and raw bytes.

Whatever arrives, the answer is never a 5xx; a 4xx is always in the OpenAI error shape; a 200 is a
well-formed completion (or a well-formed event stream without a server error in it). The app runs
in-process (starlette's TestClient) with the golden tiny checkpoint, so valid requests really
generate. CI runs a few hundred examples per strategy; GLM4V_FUZZ_EXAMPLES=N or --runslow for more.
"""

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from glm4v.engine import load
from glm4v.server import ServerSettings, create_app
from tests.conftest import TINY_DIR
from tests.serving import IMAGE_B, budget, data_url

MODEL = "test-model"
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "stop", "seed", "n", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "logit_bias",
          "response_format", "tools", "tool_choice", "functions", "function_call", "modalities", "top_k",
          "repetition_penalty", "ignore_eos", "user", "metadata", "store"]
STATUSES: Counter = Counter()


@pytest.fixture(scope="module")
def client():
    settings = ServerSettings(model_name=MODEL, default_max_tokens=4, max_body_bytes=512 * 1024, request_timeout=20)
    with TestClient(create_app(load(TINY_DIR), settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    total = sum(STATUSES.values())
    if total:
        capsys = request.config.pluginmanager.getplugin("capturemanager")
        with capsys.global_and_fixture_disabled():
            print(f"\n[server fuzz] {total} requests, by status: "
                  + ", ".join(f"{status}: {n}" for status, n in sorted(STATUSES.items())))


def check(client, content: bytes, content_type="application/json"):
    response = client.post("/v1/chat/completions", content=content, headers={"Content-Type": content_type})
    status = response.status_code
    STATUSES[status] += 1
    assert status < 500, (status, response.text[:500], content[:300])
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert body["error"]["param"] is None or isinstance(body["error"]["param"], str)
        return
    assert status == 200
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.split("\n") if line]
        assert events and all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]", events[-3:]
        for line in events[:-1]:
            event = json.loads(line[6:])
            assert "error" not in event or event["error"]["type"] != "server_error", event
    else:
        body = response.json()
        assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
        assert body["usage"]["completion_tokens"] >= 1


# -- strategies -------------------------------------------------------------------------------------

EXTREMES = st.sampled_from([0, 1, -1, 2, 4, 8193, 10 ** 12, 2 ** 63, -(2 ** 63) - 1, 10 ** 400, 0.0, -0.0, 0.5, 1.5,
                            1e-40, 5e-324, 1e308, -1e308, 2.0000001, True, False, None, "", "1", [], {}, [1], {"a": 1}])
leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30), EXTREMES)
json_values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))

IMAGE = data_url(IMAGE_B)
URLS = st.sampled_from([IMAGE, "data:", "data:image/png;base64,", "data:image/png;base64,####", "data:,hello",
                        "data:image/png," + "%89PNG%0D%0A", IMAGE[: len(IMAGE) // 2], "http://127.0.0.1:1/x.png",
                        "file:///etc/passwd", "https://example.com/cat.png", "", "javascript:alert(1)",
                        "http://[::1", "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4="])
ROLES = st.sampled_from(["system", "user", "assistant", "developer", "tool", "function", "", "USER", None, 3])
TEXTS = st.one_of(st.text(max_size=40), st.sampled_from(["<|user|>", "<|assistant|>hi", "<|begin_of_image|>",
                                                         "\x00\x01\x1b[2J", "\ud800", "<|endoftext|>" * 3]))


def base_requests():
    hello = {"role": "user", "content": "Hello"}
    picture = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                           {"type": "text", "text": "What is it?"}]}
    return [
        {"model": MODEL, "messages": [hello], "max_tokens": 3},
        {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, hello,
                                      {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "More"}],
         "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"]},
        {"model": MODEL, "messages": [picture], "max_tokens": 2, "temperature": 0},
        {"model": MODEL, "messages": [hello], "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3},
        {"messages": [hello], "max_completion_tokens": 2, "top_k": 5, "repetition_penalty": 1.2, "ignore_eos": True},
    ]


def _cheap(field, value):
    # valid but long answers would only slow the run down: they are covered by the load test
    if field in ("max_tokens", "max_completion_tokens") and type(value) is int and 16 < value <= 8192:
        return 16
    return value


@st.composite
def mutated_requests(draw):
    body = json.loads(json.dumps(draw(st.sampled_from(base_requests()))))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "drop", "message", "message", "part", "url", "extra-message"]))
        if op == "set":
            field = draw(keys)
            body[field] = _cheap(field, draw(st.one_of(EXTREMES, json_values)))
        elif op == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif op in ("message", "part", "url", "extra-message") and isinstance(body.get("messages"), list) and body["messages"]:
            messages = body["messages"]
            i = draw(st.integers(0, len(messages) - 1))
            message = messages[i]
            if op == "extra-message":
                messages.insert(i, draw(st.fixed_dictionaries({"role": ROLES, "content": st.one_of(TEXTS, json_values)})))
            elif not isinstance(message, dict):
                messages[i] = draw(json_values)
            elif op == "message":
                message[draw(st.sampled_from(["role", "content", "name", "tool_calls", "image", "refusal", "x"]))] = \
                    draw(st.one_of(ROLES, TEXTS, json_values))
            elif isinstance(message.get("content"), list) and message["content"]:
                parts = message["content"]
                j = draw(st.integers(0, len(parts) - 1))
                if op == "url":
                    parts[j] = {"type": "image_url", "image_url": draw(st.one_of(
                        st.fixed_dictionaries({"url": URLS}), URLS, json_values))}
                else:
                    parts[j] = draw(st.one_of(json_values, st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image_url", "audio", "input_image"]), "text": TEXTS})))
            else:
                message["content"] = draw(st.one_of(TEXTS, st.lists(st.fixed_dictionaries(
                    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS})}), max_size=3)))
    return body


def fuzz(request, strategy, send):
    examples = budget(request.config, "GLM4V_FUZZ_EXAMPLES", 150, 3000)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(strategy)
    def run(value):
        send(value)

    run()


def test_arbitrary_json_bodies(request, client):
    bodies = st.one_of(json_values, st.dictionaries(keys, json_values, max_size=6),
                       st.builds(lambda extra, messages: {"messages": messages, **extra},
                                 st.dictionaries(keys, json_values, max_size=3), json_values))
    fuzz(request, bodies, lambda body: check(client, json.dumps(body).encode()))


def test_mutated_valid_requests(request, client):
    fuzz(request, mutated_requests(), lambda body: check(client, json.dumps(body).encode()))


@st.composite
def broken_json(draw):
    text = json.dumps(draw(st.sampled_from(base_requests())))
    cut = draw(st.integers(0, len(text)))
    kind = draw(st.sampled_from(["truncate", "insert", "bytes", "nest", "encoding"]))
    if kind == "truncate":
        return text[:cut].encode()
    if kind == "insert":
        return (text[:cut] + draw(st.text(min_size=1, max_size=5)) + text[cut:]).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "nest":
        depth = draw(st.integers(1, 5000))
        return ('{"messages": ' + "[" * depth + "]" * depth + "}").encode()
    return text.encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1"])), "replace")


def test_raw_bytes_and_broken_json(request, client):
    fuzz(request, broken_json(), lambda content: check(client, content))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        check(client, json.dumps(base_requests()[0]).encode(), content_type)


@pytest.mark.parametrize("body", [
    {"messages": [{"role": ["user"], "content": "hi"}]},  # an unhashable role once gave a 500 (TypeError)
    {"messages": [{"role": "\ud800", "content": "hi"}]},  # quoted back, a lone surrogate once broke the answer
    {"messages": [{"role": "user", "content": "hi"}], "temperature": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]},
    {"messages": [{"role": "user", "content": "hi"}], "model": "\udfff" * 3},
    {"messages": [{"role": "user", "content": "hi"}], "seed": list(range(50_000))},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 513]},
])
def test_regressions_found_by_fuzzing(client, body):
    depth = 900
    if "temperature" in body:  # as deep as the JSON parser goes
        body["temperature"] = json.loads("[" * depth + "1" + "]" * depth)
    check(client, json.dumps(body).encode())
    assert STATUSES[500] == 0
