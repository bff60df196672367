"""The chat page served at `/`: offline assets, and a real headless Chromium conversation about an image."""

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from glm4v.engine import load
from glm4v.server import STATIC_DIR
from tests.conftest import TINY_DIR
from tests.serving import IMAGE_A, IMAGE_B, data_url, running_server

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def pipe():
    return load(TINY_DIR)


@pytest.fixture(scope="module")
def server(pipe):
    with running_server(pipe, max_batch=4) as (url, app):
        yield url, app


def test_page_and_assets_are_served_with_a_strict_policy(server):
    url = server[0]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert asset.startswith("/static/"), asset  # nothing from a CDN: the page works offline
        assert httpx.get(url + asset).status_code == 200
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", text), path
        assert "<script>" not in text  # the policy forbids inline scripts; none may be needed


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium is not installed (scripts/test.sh installs it)")
def test_chat_in_headless_chromium(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    url = server[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    def api_answer(messages, max_tokens):
        response = client.chat.completions.create(model="test-model", messages=messages, max_tokens=max_tokens,
                                                  temperature=0)
        return response.choices[0].message.content

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            outside, errors = [], []
            page.on("request", lambda r: r.url.startswith((url, "data:", "blob:")) or outside.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            sync_api.expect(page.locator("#model-name")).to_have_text("test-model")

            page.click("#toggle-settings")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.set_input_files("#image-input", str(IMAGE_A))
            sync_api.expect(page.locator("#image-bar")).to_be_visible()

            def ask(question):
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
                answers = page.locator(".message.assistant")
                last = answers.nth(answers.count() - 1)
                sync_api.expect(last).to_have_attribute("data-finish", re.compile("stop|length"), timeout=30_000)
                return last.locator(".body").inner_html()

            def rendered(text):
                return page.evaluate("t => renderMarkdown(t)", text)

            first = ask("What is in the picture?")
            image_turn = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}},
                                                      {"type": "text", "text": "What is in the picture?"}]}
            answer1 = api_answer([image_turn], 12)
            assert first == rendered(answer1)
            assert page.locator(".message.user img").count() == 1

            second = ask("Anything else?")  # the follow-up is about the same image
            answer2 = api_answer([image_turn, {"role": "assistant", "content": answer1},
                                  {"role": "user", "content": "Anything else?"}], 12)
            assert second == rendered(answer2)
            assert "reused" in page.locator("#status").inner_text()

            # a long answer streams in pieces and the stop button ends it (the request is made to ignore
            # the end-of-answer token, so that any model is still writing when Stop is clicked)
            def endless(route):
                body = json.loads(route.request.post_data)
                route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

            page.route("**/v1/chat/completions", endless)
            page.fill("#max-tokens", "6000")
            page.fill("#prompt", "Tell me everything.")
            page.press("#prompt", "Enter")
            sync_api.expect(page.locator("#stop")).to_be_visible()
            streaming = page.locator(".message.assistant.streaming .body")
            sync_api.expect(streaming).not_to_be_empty(timeout=30_000)
            page.click("#stop")
            sync_api.expect(page.locator(".message.assistant").nth(2)).to_have_attribute("data-finish", "stopped")
            sync_api.expect(page.locator("#send")).to_be_visible()
            page.unroute("**/v1/chat/completions")
            scheduler = server[1].state.scheduler
            deadline = time.monotonic() + 10
            while scheduler.snapshot()["active"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert scheduler.snapshot()["active"] == 0  # Stop ended the generation on the server too

            # new chat, then an image dropped onto the conversation
            page.click("#new-chat")
            assert page.locator(".message").count() == 0
            page.evaluate("""async (png) => {
                const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                document.getElementById("chat").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
            }""", data_url(IMAGE_B).split(",", 1)[1])
            sync_api.expect(page.locator("#image-name")).to_have_text("dropped.png")

            # the Markdown renderer formats, and never lets markup or script through
            html = rendered("**bold** `<b>x</b>` <img src=x onerror=alert(1)> [a](javascript:alert(1)) [b](https://e.org)")
            assert "<strong>bold</strong>" in html and "<code>&lt;b&gt;x&lt;/b&gt;</code>" in html
            assert "<img" not in html and 'href="javascript' not in html
            assert '<a href="https://e.org" target="_blank" rel="noopener noreferrer">b</a>' in html
            fenced = rendered("```python\nprint('<hi>')\n```\n- one\n- two\n\n1. first")
            assert "<pre><code class=\"language-python\">print(&#39;&lt;hi&gt;&#39;)</code></pre>" in fenced
            assert "<ul><li>one</li><li>two</li></ul>" in fenced and "<ol><li>first</li></ol>" in fenced
            assert not outside and not errors, (outside, errors)
        finally:
            browser.close()
