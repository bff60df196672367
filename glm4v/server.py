"""``glm4v serve``: an OpenAI-compatible HTTP API and a web chat page (FastAPI + uvicorn).

    POST /v1/chat/completions   OpenAI schema: text or image parts, system role, multi-turn,
                                streaming (SSE) or not, usage, stop, seed, max_tokens ...
    GET  /v1/models, /v1/models/{id}
    GET  /health                liveness and queue depth (the only path that never needs the API key)
    GET  /                      the chat page (static files in glm4v/static, no CDN)

Every request is validated here and handed to the ``Scheduler`` (glm4v/scheduler.py), whose one
engine thread batches the decoding of all running conversations. Everything a client can get
wrong is answered with a 4xx in the OpenAI error shape ``{"error": {"message", "type", "param",
"code"}}``; a 5xx means a bug (or 503: the engine is not running). Untrusted input is bounded: the body
size and read time, the image bytes and pixels, remote image fetches (off by default), the queue
length, and the time a request may take. docs/SECURITY.md is the threat model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request as HttpRequest

from glm4v.engine import add_model_arguments
from glm4v.errors import ContextLengthError, ConversationError, Glm4vError, ImageError, InputError
from glm4v.generate import GenerationConfig
from glm4v.image import image_digest, load_image
from glm4v.scheduler import EngineClosed, EngineFailure, QueueFull, Request, RequestTimeout, Scheduler

log = logging.getLogger("glm4v.server")
STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/health",)  # everything else needs the API key when one is set
PAGE_PATHS = ("/", "/favicon.ico")  # with /static/*: a browser asks for the key with its own login prompt
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_STOP_CHARS = 512  # each stop string is searched for after every token


@dataclass
class ServerSettings:
    model_name: str = "glm-4v"
    api_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024  # a 20 MB photo as base64 is ~27 MB
    body_timeout: float = 60.0  # seconds to receive the whole request body
    request_timeout: float = 900.0  # queue + prefill + decode; 0 = no limit
    default_max_tokens: int = 1024
    allow_remote_images: bool = False
    remote_image_max_bytes: int = 20 * 1024 * 1024
    remote_image_timeout: float = 10.0
    image_decode_slots: int = 2  # images decoded at once: each full-size decode may take ~0.5 GB
    allowed_hosts: tuple[str, ...] | None = None  # Host header values answered (None: any); see --allowed-hosts
    max_batch: int = 8
    max_queue: int = 64
    max_len: int | None = None
    prefill_chunk: int = 512
    prefix_cache_bytes: int = 1 << 30


# ------------------------------------------------------------------------------------------------
# errors

class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        # a client's text quoted in the message may hold lone surrogates ("\ud800" is valid JSON), which
        # have no UTF-8 encoding: shown escaped, so the answer can always be sent
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        param = param.encode("utf-8", "backslashreplace").decode("utf-8") if param else param
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: Exception) -> ApiError:
    """The HTTP answer for an exception raised while handling a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, EngineClosed):
        return ApiError(503, str(e), "server_error", code="shutting_down")
    if isinstance(e, RequestTimeout):
        return ApiError(408, str(e), "timeout_error", code="request_timeout")
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ImageError):
        return ApiError(422, str(e), param="messages", code="invalid_image")
    if isinstance(e, ConversationError):
        return ApiError(422, str(e), param="messages", code="unsupported_conversation")
    if isinstance(e, EngineFailure):
        return ApiError(500, str(e), "server_error", code="engine_failure")
    if isinstance(e, (InputError, Glm4vError)):
        return ApiError(400, str(e))
    log.exception("unexpected error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error")


# ------------------------------------------------------------------------------------------------
# the OpenAI request schema

# Accepted with their default (or harmless) values only; anything else is refused by name.
_IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "safety_identifier",
                   "prompt_cache_key"}
_KNOWN_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
                 "top_p", "stop", "seed", "n", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs",
                 "logit_bias", "response_format", "tools", "tool_choice", "functions", "function_call", "modalities",
                 # extensions (vLLM names): sampling knobs of generation_config.json and fixed-length runs
                 "top_k", "repetition_penalty", "ignore_eos"} | _IGNORED_FIELDS
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ChatRequest:
    messages: list[dict]  # {"role", "content", "images": [(part index, url)]}
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _show(value, limit: int = 50) -> str:
    """A client's value, shortened, for an error message (whatever its depth or size)."""
    if isinstance(value, (list, dict)) and len(value) > limit:
        return f"a {type(value).__name__} of {len(value)} items"
    try:
        return json.dumps(value, ensure_ascii=False)[:limit]
    except (ValueError, TypeError, RecursionError):
        return type(value).__name__


def _number(body, name, low, high, default=None, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(f"'{name}' must be a number, got {_show(value)}", name, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        raise _bad(f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name, "invalid_value")
    return float(value)


def _integer(body, name, low, high, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {_show(value)}", name, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


def parse_chat_request(body, *, model_name: str, defaults: dict, context: int, default_max_tokens: int) -> ChatRequest:
    """Validate an OpenAI chat completion request; raise ApiError naming the offending field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in _KNOWN_FIELDS)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0], "unknown_parameter")
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    if model != model_name:
        raise ApiError(404, f"The model '{model[:100]}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")

    for name, ok in (("n", lambda v: v == 1), ("logprobs", lambda v: v is False), ("top_logprobs", lambda v: v == 0),
                     ("frequency_penalty", lambda v: v == 0), ("presence_penalty", lambda v: v == 0),
                     ("logit_bias", lambda v: v == {}), ("tools", lambda v: v == []), ("functions", lambda v: v == []),
                     ("tool_choice", lambda v: v == "none"), ("function_call", lambda v: v == "none"),
                     ("modalities", lambda v: v == ["text"]),
                     ("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text" and len(v) == 1)):
        value = body.get(name)
        if value is not None and not ok(value):
            raise _bad(f"'{name}' = {_show(value, 80)} is not supported by this server", name, "unsupported_parameter")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or any(k != "include_usage" for k in options) \
                or not isinstance(options.get("include_usage", False), bool):
            raise _bad("'stream_options' must be {\"include_usage\": true|false}", "stream_options", "invalid_value")
        include_usage = options.get("include_usage", False)

    max_tokens = _integer(body, "max_completion_tokens", 1, context)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, context, default_max_tokens)
    temperature = _number(body, "temperature", 0, 2)
    if temperature is None:
        temperature = defaults.get("temperature", 1.0) if defaults.get("do_sample") else 0.0
    top_p = _number(body, "top_p", 0, 1, defaults.get("top_p", 1.0), low_open=True)
    top_k = _integer(body, "top_k", 0, 1 << 31, defaults.get("top_k", 0))
    repetition_penalty = _number(body, "repetition_penalty", 0, 100, defaults.get("repetition_penalty", 1.0), low_open=True)
    seed = _integer(body, "seed", -(1 << 63), (1 << 63) - 1)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos", "invalid_type")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise _bad(f"each 'stop' string may have at most {MAX_STOP_CHARS} characters", "stop", "invalid_value")

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else 1.0, top_p=top_p, top_k=top_k,
                              repetition_penalty=repetition_penalty, seed=seed, stop_strings=stop)
    return ChatRequest(_parse_messages(body.get("messages"), context), config, stream, include_usage, ignore_eos)


def _parse_messages(messages, context: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_value")
    if len(messages) > context:  # each message takes tokens: more than the context can never fit
        raise ApiError(400, f"{len(messages):,} messages: more than the model's context of {context:,} tokens can hold",
                       param="messages", code="context_length_exceeded")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", where, "invalid_type")
        extra = sorted(k for k in message if k not in ("role", "content", "name", "refusal", "tool_calls"))
        if extra:
            raise _bad(f"{where}: unrecognized field(s) {', '.join(extra)}", f"{where}.{extra[0]}", "unknown_parameter")
        if message.get("tool_calls") or message.get("refusal"):
            raise _bad(f"{where}: tool calls and refusals are not supported", where, "unsupported_parameter")
        if not isinstance(message.get("name", ""), str):
            raise _bad(f"{where}.name must be a string", f"{where}.name", "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            supported = ", ".join(_ROLES)
            raise _bad(f"{where}.role must be one of {supported}; got {_show(role, 40)}", f"{where}.role",
                       "invalid_value")
        role = _ROLES[role]
        content = message.get("content")
        texts, images = [], []
        if content is None:
            if role != "assistant":
                raise _bad(f"{where}.content is missing", f"{where}.content", "invalid_value")
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str) or not url:
                        raise _bad(f"{at}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}", at, "invalid_value")
                    if role != "user":
                        raise _bad(f"{at}: only user messages can carry an image", at, "invalid_value")
                    images.append((at, url))
                else:
                    raise _bad(f"{at} must be {{\"type\": \"text\", \"text\": ...}} or "
                               f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}", at, "invalid_value")
        else:
            raise _bad(f"{where}.content must be a string or a list of parts", f"{where}.content", "invalid_type")
        parsed.append({"role": role, "content": "\n".join(texts), "images": images})
    return parsed


# ------------------------------------------------------------------------------------------------
# images

def image_bytes(url: str, settings: ServerSettings, where: str) -> bytes:
    """The bytes behind an image URL: a data URL, or (only if allowed) a public http(s) URL."""
    if url[:5].lower() == "data:":
        header, comma, data = url[5:].partition(",")
        if not comma:
            raise _bad(f"{where}: malformed data URL (no comma)", where, "invalid_image_url")
        if header.lower().endswith(";base64"):
            payload = re.sub(r"\s+", "", data)
            try:
                return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise _bad(f"{where}: the data URL is not valid base64", where, "invalid_image_url") from None
        return urllib.parse.unquote_to_bytes(data)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise _bad(f"{where}: image URLs must be data: URLs{' or http(s)' if settings.allow_remote_images else ''}; "
                   f"got {scheme or 'no'} scheme", where, "invalid_image_url")
    if not settings.allow_remote_images:
        raise _bad(f"{where}: remote image URLs are disabled on this server; send the image inline as a "
                   "data:image/...;base64 URL (or start the server with --allow-remote-images)", where,
                   "remote_images_disabled")
    return fetch_remote_image(url, settings.remote_image_max_bytes, settings.remote_image_timeout, where)


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _public_address(address: str) -> bool:
    """True for a globally routable unicast address; IPv6 forms that carry an IPv4 address (mapped,
    compatible, 6to4, NAT64) are judged by that address: 64:ff9b::10.0.0.1 reaches 10.0.0.1."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and (int(ip) >> 32 == 0 or any(ip in net for net in _NAT64)):
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return _public_address(str(inner))
        if ip.is_site_local:
            return False
    return ip.is_global and not ip.is_multicast


def fetch_remote_image(url: str, max_bytes: int, timeout: float, where: str = "image_url", redirects: int = 3) -> bytes:
    """GET a public http(s) URL with size and time limits, refusing private and loopback hosts.

    The host name is resolved once and the connection goes to the checked address, so a DNS
    answer that changes between the check and the connection cannot redirect us inside.
    """
    deadline = time.monotonic() + timeout
    for _ in range(redirects + 1):
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError as e:
            raise _bad(f"{where}: malformed image URL ({e})", where, "invalid_image_url") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad(f"{where}: only http(s) image URLs with a host are allowed", where, "invalid_image_url")
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError, UnicodeError) as e:
            raise ApiError(422, f"{where}: cannot resolve {host!r}: {e}", param=where, code="image_fetch_failed") from None
        addresses = [info[4][0] for info in infos]
        if not addresses or not all(_public_address(a) for a in addresses):
            raise _bad(f"{where}: {host!r} is a private, loopback or otherwise non-public address; refused",
                       where, "image_url_refused")
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if parts.scheme == "https":
            connection = _PinnedHTTPS(host, port, addresses[0], left)
        else:
            connection = _PinnedHTTP(host, port, addresses[0], left)
        try:
            path = parts.path or "/"
            connection.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                               headers={"User-Agent": "glm4v", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ApiError(422, f"{where}: fetching the image gave HTTP {response.status}", param=where,
                               code="image_fetch_failed")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ApiError(422, f"{where}: the image is {int(length):,} bytes, above the limit of {max_bytes:,}",
                               param=where, code="image_too_large")
            data = bytearray()
            while chunk := response.read(min(1 << 16, max_bytes + 1 - len(data))):
                data += chunk
                if len(data) > max_bytes:
                    raise ApiError(422, f"{where}: the image is larger than the limit of {max_bytes:,} bytes",
                                   param=where, code="image_too_large")
                if time.monotonic() > deadline:
                    raise socket.timeout()
            return bytes(data)
        except (OSError, ValueError, http.client.HTTPException, ssl.SSLError) as e:  # ValueError: a bad path
            reason = "timed out" if isinstance(e, socket.timeout) or time.monotonic() > deadline else str(e)
            raise ApiError(422, f"{where}: fetching the image failed ({reason}; limit {timeout:g} s)", param=where,
                           code="image_fetch_failed") from None
        finally:
            connection.close()
    raise ApiError(422, f"{where}: too many redirects or out of time fetching the image", param=where,
                   code="image_fetch_failed")


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address checked beforehand, whatever the host name resolves to by now."""

    def __init__(self, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(_PinnedHTTP):
    def connect(self):
        super().connect()
        # TLS to the pinned address, with the host name for SNI and the certificate check
        self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)


class ConversationBuilder:
    """A validated ``ChatRequest`` -> (prompt ids, picture or None, image key or None), in a worker thread.

    Bounded before anything costly runs: a conversation whose text cannot fit the context (from its
    byte count: no token is longer than the vocabulary's longest) is refused without tokenizing it,
    and at most ``image_decode_slots`` images are decoded at once. The picture handed on is the
    model-size resize (what the vision encoder sees, identical pixels), not the full-size upload: a
    queue of waiting requests then holds a few MB each, not hundreds.
    """

    def __init__(self, pipe, settings: ServerSettings, context: int):
        self.tokenizer = pipe.tokenizer
        self.processor = pipe.image_processor
        self.settings = settings
        self.context = context
        self.image_slots = pipe.config.num_image_tokens + 2
        vocab = self.tokenizer.vocab_size
        self.max_token_bytes = max(len(self.tokenizer.token_bytes(i)) for i in range(vocab)) or 1
        self._decoding = threading.BoundedSemaphore(max(1, settings.image_decode_slots))

    def __call__(self, chat: ChatRequest):
        self._check_size(chat)
        conversation, picture, key = [], None, None
        for message in chat.messages:
            entry = {"role": message["role"], "content": message["content"]}
            for where, url in message["images"]:
                resized = self._load(url, where)
                digest = image_digest(resized)
                if key is None:
                    picture, key = resized, digest
                    entry["image"] = resized
                elif digest != key:
                    # clients often resend the same picture every turn: that one is kept once
                    raise ApiError(422, f"{where}: this model takes one image per conversation, and this is a "
                                   "second, different one; start a new conversation for a new image", param=where,
                                   code="too_many_images")
            conversation.append(entry)
        ids, _ = self.tokenizer.encode_chat(conversation)
        return ids, picture, key

    def _load(self, url: str, where: str):
        data = image_bytes(url, self.settings, where)
        with self._decoding:
            try:
                return self.processor.resize(load_image(data))
            except ImageError as e:
                raise ApiError(422, f"{where}: {e}", param=where, code="invalid_image") from None

    def _check_size(self, chat: ChatRequest) -> None:
        text_bytes, least = 0, 3  # [gMASK] <sop> ... <|assistant|>
        for message in chat.messages:
            if message["content"] or message["images"]:
                size = len(message["content"].encode("utf-8", "surrogatepass"))
                text_bytes += size
                least += 2 + -(-size // self.max_token_bytes)  # <|role|> "\n" and the content
        if any(m["images"] for m in chat.messages):
            least += self.image_slots
        if least >= self.context:
            raise ContextLengthError(
                f"the messages hold {text_bytes:,} bytes of text, at least {least:,} tokens, which leaves no room in "
                f"the model's context of {self.context:,} tokens; shorten the conversation")


# ------------------------------------------------------------------------------------------------
# the app

class _Guard:
    """ASGI middleware in front of every route: the Host allow-list, the API key, security headers.

    With a key, every path but /health needs it, either as ``Authorization: Bearer KEY`` (API
    clients) or as the password of HTTP Basic auth, any user name: a browser opening the chat page
    gets its own login prompt (the page's paths answer 401 with a Basic challenge), and then sends
    the same credentials with the page's API calls. The key is compared in constant time: both
    sides are hashed first, so neither the content nor the length of the key leaks through timing.

    The Host check stops DNS rebinding: a web page whose name an attacker re-points to 127.0.0.1
    reaches a loopback server from the victim's browser as same-origin, but still sends its own name.
    """

    def __init__(self, app, api_key: str | None, allowed_hosts=None):
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        async def refuse(error: ApiError, challenge: str | None = None):
            from starlette.responses import JSONResponse

            headers = {"WWW-Authenticate": challenge} if challenge else None
            response = JSONResponse(error.body(), status_code=error.status, headers=headers)
            return await response(scope, receive, send_with_headers)

        headers = dict(scope.get("headers", []))
        if self.allowed_hosts is not None:
            host = _host_name(headers.get(b"host", b""))
            if host is not None and host not in self.allowed_hosts:
                return await refuse(ApiError(400, f"this server does not answer to the host name {host[:100]!r} "
                                             "(start it with --allowed-hosts to add names)", code="invalid_host"))
        path = scope.get("path", "")
        needs_key = self.key_digest is not None and path not in PUBLIC_PATHS
        if needs_key and not self._authorized(headers.get(b"authorization", b"")):
            if path in PAGE_PATHS or path.startswith("/static/"):
                return await refuse(ApiError(401, "This server needs its API key: log in with any user name and "
                                             "the key as the password", code="invalid_api_key"),
                                    'Basic realm="glm4v", charset="UTF-8"')
            return await refuse(ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer "
                                         "<key>'", code="invalid_api_key"), "Bearer")
        return await self.app(scope, receive, send_with_headers)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, credential = header.partition(b" ")
        scheme, credential = scheme.lower(), credential.strip()
        if scheme == b"basic":
            try:
                credential = base64.b64decode(credential, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                credential = b""
        # compared whatever the scheme, so a refusal takes as long as an acceptance
        match = hmac.compare_digest(hashlib.sha256(credential).digest(), self.key_digest)
        return match and scheme in (b"bearer", b"basic")


def _host_name(header: bytes) -> str | None:
    """The name in a Host header, without its port ('[::1]:8000' -> '::1'); None when absent or unreadable."""
    try:
        host = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return "?"
    if not host:
        return None
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


def create_app(pipe, settings: ServerSettings | None = None, scheduler: Scheduler | None = None):
    """The FastAPI app serving ``pipe``; its engine thread starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    settings = settings or ServerSettings()
    if scheduler is None:
        scheduler = Scheduler(pipe, max_batch=settings.max_batch, max_queue=settings.max_queue, max_len=settings.max_len,
                              prefill_chunk=settings.prefill_chunk, prefix_cache_bytes=settings.prefix_cache_bytes,
                              start=False)
    created = int(time.time())
    build = ConversationBuilder(pipe, settings, scheduler.context)

    def prepare(raw: bytes):
        """Body bytes -> (ChatRequest, ids, picture, image key); CPU-bound, so off the event loop."""
        chat = parse_chat_request(parse_json(raw), model_name=settings.model_name, defaults=pipe.generation_defaults,
                                  context=scheduler.context, default_max_tokens=settings.default_max_tokens)
        return (chat, *build(chat))

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="glm4v", version=__import__("glm4v").__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.settings = settings

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        messages = {404: f"Unknown path {request.url.path[:200]}", 405: f"Method {request.method} is not allowed here"}
        return error_response(ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                                       code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(400, f"invalid request: {exc.errors()[:3]}"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        return error_response(api_error(exc))

    model_card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "glm4v"}

    @app.get("/health")
    async def health():
        stats = scheduler.snapshot()
        body = {"status": "ok" if scheduler.running else "engine stopped", "model": settings.model_name,
                **{k: stats[k] for k in ("active", "queued", "max_batch", "max_queue")}}
        return JSONResponse(body, status_code=200 if scheduler.running else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise ApiError(404, f"The model '{model_id[:100]}' does not exist", param="model", code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        media_type = http.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            # a browser sends a cross-site POST without asking first only as a form or text/plain;
            # JSON needs a CORS preflight, which this server never grants
            raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                           f"(got {media_type[:60] or 'none'})", code="unsupported_media_type")
        raw = await _read_body(http, settings)
        try:
            chat, ids, picture, key = await run_in_threadpool(prepare, raw)
        except Exception as e:  # noqa: BLE001 - mapped to a 4xx by kind
            raise api_error(e) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            request = scheduler.submit_request(Request(ids, chat.config, image=picture, image_key=key,
                                                       ignore_eos=chat.ignore_eos, timeout=settings.request_timeout,
                                                       sink=sink))
        except Exception as e:  # noqa: BLE001
            raise api_error(e) from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name,
                "system_fingerprint": f"glm4v-{app.version}"}
        if chat.stream:
            return StreamingResponse(_stream(request, events, meta, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(http, request, events, meta)

    async def _complete(http, request: Request, events: asyncio.Queue, meta: dict):
        watcher = asyncio.create_task(_cancel_on_disconnect(http, request))
        pieces = []
        try:
            while True:
                event = await events.get()
                if event.kind == "text":
                    pieces.append(event.text)
                elif event.kind == "error":
                    raise api_error(event.error)
                else:
                    break
        finally:
            watcher.cancel()
            if not request.done.is_set():
                scheduler.cancel(request)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": None, "finish_reason": event.finish_reason}],
                "usage": _usage(request)}

    async def _cancel_on_disconnect(http, request: Request):
        while not request.done.is_set():
            if await http.is_disconnected():
                scheduler.cancel(request)
                return
            await asyncio.sleep(0.25)

    async def _stream(request: Request, events: asyncio.Queue, meta: dict, include_usage: bool):
        def chunk(delta: dict, finish_reason=None) -> str:
            body = {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                text = []
                while event.kind == "text":  # send what piled up since the last send as one chunk
                    text.append(event.text)
                    if events.empty():
                        event = None
                        break
                    event = events.get_nowait()
                if text:
                    yield chunk({"content": "".join(text)})
                if event is None:
                    continue
                if event.kind == "error":
                    yield f"data: {json.dumps(api_error(event.error).body(), ensure_ascii=False)}\n\n"
                else:
                    yield chunk({}, event.finish_reason)
                    if include_usage:
                        yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(request)})}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (the task is cancelled) or the answer is complete
            if not request.done.is_set():
                scheduler.cancel(request)

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_Guard, api_key=settings.api_key, allowed_hosts=settings.allowed_hosts)
    return app


_PAGE_HEADERS = {
    # the page renders model output: no inline script, nothing loaded from anywhere but this server
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}


def _usage(request: Request) -> dict:
    return {"prompt_tokens": request.prompt_tokens, "completion_tokens": request.completion_tokens,
            "total_tokens": request.prompt_tokens + request.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": request.cached_tokens}}


async def _read_body(http, settings: ServerSettings) -> bytes:
    limit = settings.max_body_bytes
    declared = http.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than the limit of {limit:,} bytes (--max-body-mb)",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > 4 * limit:
        raise too_large  # not worth reading; a smaller excess is read so that the client sees the answer
    body, size = bytearray(), 0

    async def receive_all():
        nonlocal size
        async for piece in http.stream():
            size += len(piece)
            if size <= limit:
                body.extend(piece)
            elif size > 4 * limit:
                return  # stop reading; the answer below closes the connection
    try:
        await asyncio.wait_for(receive_all(), settings.body_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {settings.body_timeout:g} s (--body-timeout)",
                       "timeout_error", code="body_timeout") from None
    except Exception:  # noqa: BLE001 - the client went away while sending
        raise ApiError(400, "the request body could not be read") from None
    if size > limit:
        raise too_large
    return bytes(body)


def parse_json(raw: bytes):
    """The request body as JSON: strict UTF-8 (RFC 8259), no NaN/Infinity, bounded nesting."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except RecursionError:
        raise _bad("the JSON body is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise _bad(f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                   code="invalid_json") from None
    except ValueError as e:
        raise _bad(f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


# ------------------------------------------------------------------------------------------------
# command line

def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require the key on every path but /health, as 'Authorization: Bearer KEY' or as the "
                             "HTTP Basic password (the browser's login prompt for the page) "
                             "(default: $GLM4V_API_KEY; unset = no key)")
    parser.add_argument("--allowed-hosts", default=None,
                        help="comma-separated host names the server answers to (the Host header; stops DNS "
                             "rebinding); '*' = any. Default: localhost,127.0.0.1,::1 when --host is a loopback "
                             "address, else any")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: the folder name)")
    parser.add_argument("--max-batch", type=int, default=8, help="conversations decoded together (batch rows)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; more get 429")
    parser.add_argument("--max-len", type=int, default=None,
                        help="cache slots per row (prompt + answer; default: the model's context)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt tokens prefilled per engine step between decode steps (0 = whole prompt)")
    parser.add_argument("--prefix-cache-mb", type=float, default=1024, help="memory for reusing conversation prefixes")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="answer length when a request gives none (default: generation_config.json or 1024)")
    parser.add_argument("--max-body-mb", type=float, default=32, help="largest request body accepted (413 above)")
    parser.add_argument("--request-timeout", type=float, default=900, help="seconds a request may take (0 = no limit)")
    parser.add_argument("--body-timeout", type=float, default=60, help="seconds a client may take to send its request body")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (public addresses only, with size and time limits)")
    parser.add_argument("--remote-image-max-mb", type=float, default=20)
    parser.add_argument("--remote-image-timeout", type=float, default=10)
    parser.add_argument("--image-decode-slots", type=int, default=2,
                        help="uploaded images decoded at the same time (each may take ~0.5 GB while decoding)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def allowed_hosts(flag: str | None, listen: str) -> tuple[str, ...] | None:
    """--allowed-hosts: the names given; by default the loopback names for a loopback server, else any."""
    if flag is None:
        return LOOPBACK_HOSTS if listen in LOOPBACK_HOSTS else None
    names = tuple(h.strip().lower() for h in flag.split(",") if h.strip())
    return None if "*" in names or not names else names


def settings_from_args(args, pipe) -> ServerSettings:
    for name in ("max_batch", "port"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_decode_slots < 1:
        raise InputError("--image-decode-slots must be at least 1")
    if args.remote_image_max_mb <= 0 or args.remote_image_timeout <= 0 or args.body_timeout <= 0 \
            or (args.max_tokens is not None and args.max_tokens < 1):
        raise InputError("--remote-image-max-mb, --remote-image-timeout, --body-timeout and --max-tokens must be positive")
    if args.max_queue < 0 or args.max_body_mb <= 0 or args.request_timeout < 0 or args.prefix_cache_mb < 0:
        raise InputError("--max-queue, --max-body-mb, --request-timeout and --prefix-cache-mb must not be negative")
    from glm4v.engine import EMBEDDED_MODEL

    folder = pipe.path.name if pipe.path is not None and pipe.path != EMBEDDED_MODEL else "glm4v-embedded"
    name = args.served_model_name or folder
    return ServerSettings(
        model_name=name, api_key=args.api_key or os.environ.get("GLM4V_API_KEY") or None,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), request_timeout=args.request_timeout,
        body_timeout=args.body_timeout,
        default_max_tokens=args.max_tokens or pipe.generation_defaults.get("max_new_tokens", 1024),
        allow_remote_images=args.allow_remote_images,
        remote_image_max_bytes=int(args.remote_image_max_mb * 1024 * 1024), remote_image_timeout=args.remote_image_timeout,
        image_decode_slots=args.image_decode_slots, allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
        max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
        prefix_cache_bytes=int(args.prefix_cache_mb * 1024 * 1024))


def run(args) -> int:
    import sys

    import uvicorn

    from glm4v.engine import load_from_args

    pipe = load_from_args(args, progress=sys.stderr.isatty())
    settings = settings_from_args(args, pipe)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    app = create_app(pipe, settings)
    print(f"glm4v: serving {settings.model_name} at http://{args.host}:{args.port}/ (API under /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5,
                limit_concurrency=1024, timeout_graceful_shutdown=5)
    return 0
