"""Who gets in and what the server fetches or reads: the API key, the Host check, cross-site posts,
remote image URLs (SSRF), hostile images over HTTP, body limits, and pickle-free checkpoints.
docs/SECURITY.md is the threat model these tests hold the code to."""

import base64
import hashlib
import hmac
import http.server
import json
import re
import shutil
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from glm4v import cli, server
from glm4v.engine import Pipeline, load
from glm4v.errors import CheckpointError
from glm4v.server import ApiError, _public_address, allowed_hosts, fetch_remote_image
from tests.conftest import TINY_DIR
from tests.serving import openai_error, running_server
from tests.test_image import encode, noise, png_bomb

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test-model"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def pipe():
    return load(TINY_DIR)


@pytest.fixture(scope="module")
def server_url(pipe):
    with running_server(pipe) as (url, _):
        yield url


def chat(url, body, **kwargs):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30, **kwargs)


# -- the API key ----------------------------------------------------------------------------------

def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_every_path_but_health_needs_the_key_as_bearer_or_basic_password(pipe):
    with running_server(pipe, api_key="s3cret") as (url, app):
        paths = [("GET", "/"), ("GET", "/favicon.ico"), ("GET", "/static/app.js"), ("GET", "/v1/models"),
                 ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing"),
                 ("OPTIONS", "/v1/chat/completions"), ("GET", "/docs"), ("GET", "/openapi.json")]
        routes = {getattr(r, "path", None) for r in app.routes} - {None}
        assert routes <= {"/health", "/", "/v1/models", "/v1/models/{model_id:path}", "/v1/chat/completions", "/static"}
        for method, path in paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Token s3cret"},
                            {"Authorization": "s3cret"}, basic("s3cret", ""), basic("u", "s3cret "),
                            {"Authorization": "Basic !!notbase64"}, {"Authorization": "Bearer s3cret-and-more"}):
                response = httpx.request(method, url + path, headers=headers, json=HELLO if method == "POST" else None)
                assert response.status_code == 401, (method, path, headers)
                assert openai_error(response)["code"] == "invalid_api_key"
        # the page's paths challenge the browser to show its login prompt; the API's do not
        assert httpx.get(url + "/").headers["www-authenticate"].startswith('Basic realm="glm4v"')
        assert httpx.get(url + "/v1/models").headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/health").status_code == 200

        for headers in ({"Authorization": "Bearer s3cret"}, {"Authorization": "bearer  s3cret"},
                        basic("anyone", "s3cret"), basic("", "s3cret")):
            assert httpx.get(url + "/v1/models", headers=headers).status_code == 200, headers
            assert httpx.get(url + "/", headers=headers).status_code == 200
            assert httpx.get(url + "/static/app.js", headers=headers).status_code == 200
            assert chat(url, HELLO, headers=headers).status_code == 200


def test_the_key_is_compared_in_constant_time(pipe, monkeypatch):
    calls, compare = [], hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(server.hmac, "compare_digest", recording)
    key = hashlib.sha256(b"s3cret").digest()
    with running_server(pipe, api_key="s3cret") as (url, _):
        for headers, status in (({"Authorization": "Bearer s3cret"}, 200), ({"Authorization": "Bearer x"}, 401),
                                ({}, 401), (basic("u", "s3cret"), 200), ({"Authorization": "Token s3cret"}, 401)):
            calls.clear()
            assert httpx.get(url + "/v1/models", headers=headers).status_code == status
            # exactly one comparison, of two fixed-length digests, whatever was sent
            assert len(calls) == 1 and calls[0][1] == key and len(calls[0][0]) == 32, headers


# -- Host header (DNS rebinding) and cross-site posts ---------------------------------------------

def test_host_header_allow_list_stops_dns_rebinding(pipe):
    with running_server(pipe, allowed_hosts=allowed_hosts(None, "127.0.0.1")) as (url, _):
        port = url.rsplit(":", 1)[1]
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "localhost.evil", "[::2]"):
            for path in ("/v1/models", "/", "/health"):
                response = httpx.get(url + path, headers={"Host": host})
                assert response.status_code == 400 and openai_error(response)["code"] == "invalid_host", host
        response = chat(url, HELLO, headers={"Host": "attacker.example"})
        assert openai_error(response)["code"] == "invalid_host"


def test_allowed_hosts_flag():
    assert allowed_hosts(None, "127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts(None, "localhost") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts(None, "0.0.0.0") is None  # listening everywhere: names are unknown, use a key
    assert allowed_hosts("*", "127.0.0.1") is None
    assert allowed_hosts("Chat.Example.com, 10.0.0.5", "0.0.0.0") == ("chat.example.com", "10.0.0.5")
    parser, _ = cli.build_parser()
    args = parser.parse_args(["serve", "--allowed-hosts", "a.example", "--image-decode-slots", "3", "--body-timeout", "5"])
    settings = server.settings_from_args(args, load(TINY_DIR))
    assert settings.allowed_hosts == ("a.example",) and settings.image_decode_slots == 3 and settings.body_timeout == 5


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_posts_a_browser_could_send_cross_site_are_refused(server_url, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(server_url + "/v1/chat/completions", content=json.dumps(HELLO).encode(), headers=headers)
    assert response.status_code == 415 and openai_error(response)["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_fine_and_no_cors_is_granted(server_url):
    response = httpx.post(server_url + "/v1/chat/completions", content=json.dumps(HELLO).encode(),
                          headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200
    preflight = httpx.options(server_url + "/v1/chat/completions", headers={
        "Origin": "https://attacker.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code >= 400
    answer = chat(server_url, HELLO, headers={"Origin": "https://attacker.example"})
    assert "access-control-allow-origin" not in answer.headers  # a browser hides the answer from that page


# -- remote image URLs (server-side request forgery) ----------------------------------------------

@pytest.mark.parametrize("address,public", [
    ("93.184.216.34", True), ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("::ffff:8.8.8.8", True),
    ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
    ("224.0.0.251", False), ("198.18.0.1", False), ("192.0.2.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("fd12::1", False),
    ("fec0::1", False), ("ff02::1", False), ("2001:db8::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::127.0.0.1", False), ("::10.0.0.1", False),
    ("64:ff9b::7f00:1", False), ("64:ff9b::a00:1", False), ("64:ff9b:1::a9fe:a9fe", False),
    ("2002:7f00:1::", False), ("2002:a00:1::1", False), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ("not-an-address", False),
])
def test_only_public_unicast_addresses_are_fetched(address, public):
    assert _public_address(address) is public


def test_remote_urls_are_refused_by_default(server_url):
    for url in ("http://169.254.169.254/latest/meta-data/", "https://example.com/cat.png", "HTTP://127.0.0.1/x.png"):
        response = chat(server_url, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]})
        assert openai_error(response)["code"] == "remote_images_disabled", url


def test_with_the_flag_only_http_to_public_hosts(pipe):
    refused = {
        "file:///etc/passwd": "invalid_image_url", "ftp://example.com/a.png": "invalid_image_url",
        "gopher://example.com/": "invalid_image_url", "javascript:alert(1)": "invalid_image_url",
        "http://[::1": "invalid_image_url", "http://example.com:99999/a.png": "invalid_image_url", "http:///a.png": "invalid_image_url",
        "http://localhost/a.png": "image_url_refused", "http://127.1/a.png": "image_url_refused",
        "http://0x7f000001/a.png": "image_url_refused", "http://[::1]:8000/a.png": "image_url_refused",
        "http://169.254.169.254/latest/meta-data/": "image_url_refused", "http://[64:ff9b::7f00:1]/": "image_url_refused",
        "http://user:pass@10.0.0.1/a.png": "image_url_refused",
    }
    with running_server(pipe, allow_remote_images=True) as (url, _):
        for target, code in refused.items():
            response = chat(url, {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": target}}]}]})
            assert openai_error(response)["code"] == code, target


def test_dns_is_resolved_once_and_the_connection_pinned_to_the_checked_address(monkeypatch):
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])  # a rebinding DNS server
    resolved, connected = [], []

    def getaddrinfo(host, port, *args, **kwargs):
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in next(answers)]

    def create_connection(address, *args, **kwargs):
        connected.append(address)
        raise ConnectionRefusedError("test: not connecting anywhere")

    monkeypatch.setattr(server.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(server.socket, "create_connection", create_connection)
    with pytest.raises(ApiError) as e:
        fetch_remote_image("http://rebind.example/a.png", 1 << 20, 2)
    assert e.value.code == "image_fetch_failed"
    assert resolved == ["rebind.example"] and connected == [("93.184.216.34", 80)]

    # a name with one private address among public ones is refused outright
    monkeypatch.setattr(server.socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.216.34", "10.0.0.7")])
    with pytest.raises(ApiError) as e:
        fetch_remote_image("http://mixed.example/a.png", 1 << 20, 2)
    assert e.value.code == "image_url_refused" and e.value.status == 400


class _Redirector(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/to-private":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/a.png")
            self.end_headers()
        elif self.path == "/lying-length":
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 12))
            self.end_headers()
        elif self.path == "/not-an-image":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


def test_redirects_are_checked_again_and_sizes_bounded(pipe, monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setattr(server, "_public_address", lambda a: a == "127.0.0.1")  # the test server stands in for the internet
    try:
        with pytest.raises(ApiError) as e:
            fetch_remote_image(local + "/to-private", 1 << 20, 5)
        assert e.value.code == "image_url_refused" and "10.0.0.1" in e.value.message
        with pytest.raises(ApiError) as e:
            fetch_remote_image(local + "/lying-length", 1 << 20, 5)
        assert e.value.code == "image_too_large"
        with pytest.raises(ApiError) as e:
            fetch_remote_image(local + "/missing", 1 << 20, 5)
        assert e.value.code == "image_fetch_failed" and "404" in e.value.message
        with running_server(pipe, allow_remote_images=True) as (url, _):
            response = chat(url, {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": local + "/not-an-image"}}]}]})
            assert response.status_code == 422 and openai_error(response)["code"] == "invalid_image"
            response = chat(url, {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": local + "/a b\r\nX-Injected: 1"}}]}]})
            assert 400 <= response.status_code < 500
            openai_error(response)
    finally:
        httpd.shutdown()


# -- hostile images through the API (data URLs) ---------------------------------------------------

def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_request(url: str) -> dict:
    return {"model": MODEL, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}


PNG = encode(noise(64, 48), "PNG")
JPEG = encode(noise(64, 48), "JPEG")

HOSTILE = {
    "bomb-30000x30000": (data_url(png_bomb(30000, 30000)), "64,000,000"),
    "bomb-10000x10000": (data_url(png_bomb(10000, 10000)), "64,000,000"),
    "truncated-png": (data_url(PNG[: len(PNG) // 2]), "truncated"),
    "truncated-jpeg": (data_url(JPEG[: len(JPEG) // 3], "image/jpeg"), "truncated"),
    "corrupt-png": (data_url(PNG[:40] + bytes(200) + PNG[240:]), "PNG"),
    "zero-bytes": ("data:image/png;base64,", "empty"),
    "random-bytes": (data_url(bytes(range(256)) * 4), "not a recognised image"),
    "svg": (data_url(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>',
                     "image/svg+xml"), "SVG"),
    "svg-as-png": (data_url(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'), "SVG"),
    "pdf": (data_url(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n", "application/pdf"), "PDF"),
    "eps": (data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n"), "PostScript"),
    "ico": (data_url(encode(noise(16, 16), "ICO")), "supported formats"),
    "html": ("data:text/html,<script>alert(1)</script>", "not a recognised image"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_images_over_http_get_422_in_the_openai_shape(server_url, name):
    url, words = HOSTILE[name]
    started = time.monotonic()
    response = chat(server_url, image_request(url))
    assert response.status_code == 422, response.text[:300]
    error = openai_error(response)
    assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[0]"
    assert words in error["message"], error["message"]
    assert time.monotonic() - started < 5


def exif_rotated() -> bytes:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    return encode(im, "PNG", transparency=0)


def animated(fmt) -> bytes:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                  **({"lossless": True} if fmt == "WEBP" else {}))


USABLE = {
    "16-bit-grey": lambda: encode(Image.fromarray(np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)), "PNG"),
    "cmyk-jpeg": lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
    "palette-transparency": palette_with_transparency,
    "la": lambda: encode(Image.new("LA", (8, 8), (0, 128)), "PNG"),
    "animated-gif": lambda: animated("GIF"),
    "animated-webp": lambda: animated("WEBP"),
    "1x1": lambda: encode(noise(1, 1), "PNG"),
    "10000x3": lambda: encode(noise(10000, 3), "PNG"),
    "exif-rotated": exif_rotated,
    "declared-as-gif": lambda: PNG,  # the declared type is not trusted: the bytes are sniffed
}


@pytest.mark.parametrize("name", sorted(USABLE))
def test_unusual_but_valid_images_answer_as_the_python_api_does(pipe, server_url, name):
    data = USABLE[name]()
    response = chat(server_url, image_request(data_url(data, "image/gif" if name == "declared-as-gif" else "image/png")))
    assert response.status_code == 200, response.text[:300]
    reference = Pipeline(pipe.model, pipe.tokenizer, prefix_cache_bytes=0)
    expected = reference.chat([{"role": "user", "image": data, "content": "What is it?"}], max_new_tokens=3)
    assert response.json()["choices"][0]["message"]["content"] == expected.removeprefix("\n")


def test_a_queued_request_keeps_only_the_model_size_picture_and_decodes_are_bounded(pipe, monkeypatch):
    from glm4v.server import ConversationBuilder, ServerSettings, parse_chat_request

    build = ConversationBuilder(pipe, ServerSettings(image_decode_slots=2), pipe.config.seq_length)
    big = encode(noise(1600, 1200), "PNG")
    chat = parse_chat_request(image_request(data_url(big)), model_name=MODEL, defaults={}, context=8192,
                              default_max_tokens=4)
    ids, picture, key = build(chat)
    size = pipe.config.vision_config.image_size
    assert picture.size == (size, size) and picture.mode == "RGB"  # not the 1600x1200 upload
    assert key == server.image_digest(pipe.image_processor.resize(big))

    running, most = [0], [0]
    lock = threading.Lock()
    real_load = server.load_image

    def slow_load(data):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)  # long enough that a busy machine still starts the next decode meanwhile
        with lock:
            running[0] -= 1
        return real_load(data)

    monkeypatch.setattr(server, "load_image", slow_load)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: build(chat), range(6)))
    assert most[0] == 2


# -- request bodies -------------------------------------------------------------------------------

def test_body_size_and_time_limits(pipe):
    with running_server(pipe, max_body_bytes=100_000, body_timeout=0.5) as (url, _):
        big = {"messages": [{"role": "user", "content": "x" * 150_000}]}
        assert openai_error(chat(url, big))["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 50_000

        response = httpx.post(url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and openai_error(response)["code"] == "request_too_large"
        host, port = url.removeprefix("http://").split(":")

        def raw(length: int, body: bytes) -> tuple[str, float]:
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (length, body))
                started = time.monotonic()
                reply = b""
                while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
                        re.search(rb"content-length: (\d+)", reply.lower()).group(1)):
                    piece = s.recv(4096)
                    if not piece:
                        break
                    reply += piece
                return reply.decode(), time.monotonic() - started

        # a terabyte announced: refused at once, unread
        reply, waited = raw(10 ** 12, b"{")
        assert reply.startswith("HTTP/1.1 413") and '"request_too_large"' in reply and waited < 2
        # a client that announces a body and never sends it is cut off after body_timeout
        reply, waited = raw(1000, b'{"messages":')
        assert reply.startswith("HTTP/1.1 408") and '"body_timeout"' in reply and waited < 5
        assert httpx.get(url + "/health").json()["status"] == "ok"


# -- checkpoints: safetensors only ----------------------------------------------------------------

PICKLE_BOMB = b"\x80\x04cposix\nsystem\n(S'touch PWNED'\ntR."


def test_no_module_can_unpickle():
    pattern = re.compile(r"torch\.load\(|\bimport pickle\b|\bfrom pickle\b|pickle\.loads?\(|allow_pickle\s*=\s*True|"
                         r"\bimport (dill|joblib|cloudpickle)\b|yaml\.load\(|\bmarshal\.loads?\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "glm4v").rglob("*.py"))
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_a_pickle_file_beside_safetensors_is_never_opened(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(TINY_DIR, folder)
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (folder / name).write_bytes(PICKLE_BOMB)
    opened = []
    real_open = open

    def watching_open(file, *args, **kwargs):
        opened.append(Path(file).name if isinstance(file, (str, Path)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)
    monkeypatch.chdir(tmp_path)
    pipe = load(folder)
    assert pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=2) is not None
    assert not any(str(name).endswith((".bin", ".pt")) for name in opened), opened
    assert not (tmp_path / "PWNED").exists()


def broken_folders(tmp_path):
    """(folder, file the error must name) for every way a checkpoint folder can be broken."""
    shard = "model-00002-of-00002.safetensors"

    def copy(name):
        folder = tmp_path / name
        shutil.copytree(TINY_DIR, folder)
        return folder

    truncated = copy("truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) * 2 // 3])

    lying = copy("lying")
    data = (lying / shard).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    raw = json.dumps(header, separators=(",", ":")).encode()
    (lying / shard).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])

    huge_header = copy("huge-header")
    (huge_header / shard).write_bytes(struct.pack("<Q", 1 << 40) + data[8:])

    missing = copy("missing")
    (missing / shard).unlink()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, pickled)
    (pickled / "pytorch_model.bin").write_bytes(PICKLE_BOMB)
    return [(truncated, shard), (lying, shard), (huge_header, shard), (missing, shard), (pickled, "pytorch_model.bin")]


def test_broken_checkpoints_give_clear_errors_naming_the_file(tmp_path, capsys):
    for folder, named in broken_folders(tmp_path):
        with pytest.raises(CheckpointError) as e:
            load(folder)
        assert named in str(e.value), (folder.name, str(e.value))
        # the same through the command line: exit 1 and the message, no traceback
        assert cli.main(["chat", "--model", str(folder), "hi"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.browser
def test_the_chat_page_works_behind_the_key_with_the_browsers_login(pipe):
    from tests.test_web_page import CHROMIUM, CHROMIUM_FLAGS

    if CHROMIUM is None:
        pytest.skip("headless chromium is not installed (scripts/test.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    with running_server(pipe, api_key="s3cret") as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            stranger = browser.new_context().new_page()
            try:  # without credentials the headless browser cannot answer the login prompt
                assert stranger.goto(url + "/").status == 401
            except sync_api.Error as e:
                assert "AUTH" in str(e)
            # the login prompt answered once: the page loads and its own API calls carry the same credentials
            page = browser.new_context(http_credentials={"username": "me", "password": "s3cret"}).new_page()
            assert page.goto(url + "/").status == 200
            sync_api.expect(page.locator("#model-name")).to_have_text(MODEL)
            page.click("#toggle-settings")
            page.fill("#max-tokens", "4")
            page.fill("#prompt", "Hello?")
            page.press("#prompt", "Enter")
            answer = page.locator(".message.assistant").first
            sync_api.expect(answer).to_have_attribute("data-finish", re.compile("stop|length"), timeout=30_000)
            assert page.locator("#api-key").input_value() == ""  # no key was typed into the page
        finally:
            browser.close()
