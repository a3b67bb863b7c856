"""The chat page at /web in a real headless Chromium (Debian's, driven by Playwright).

`make test` installs Chromium (scripts/install_chromium.sh); without it on PATH these
tests fail rather than skip, as the page is part of what the server promises.
"""

from __future__ import annotations

import shutil

import pytest

from tests.server.serve_process import API_KEY, start_server, stop_server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Chromium is not on PATH: run scripts/install_chromium.sh (make test does)"
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def web_server(gemma_gguf):
    # A 1024-token context bounds every reply (the page asks for no max_tokens, as a chat does).
    server = start_server(gemma_gguf, "--api-key", API_KEY, "--ctx", "1024", "--threads", "2")
    yield server
    stop_server(server)


@pytest.fixture
def page(browser, web_server):
    server = web_server
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/web")  # redirects to /web/
    yield page
    context.close()


def test_a_message_gets_a_streamed_reply_with_its_speed(page, web_server):
    server = web_server
    page.fill("#key", API_KEY)
    page.dispatch_event("#key", "change")
    page.fill("#max-tokens", "48")  # sent as max_completion_tokens: two turns fit the context
    page.dispatch_event("#max-tokens", "change")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert page.inner_text("#model") == server.model_id
    page.fill("#input", "What is the capital of France? Answer in one sentence.")
    page.press("#input", "Enter")
    # Streaming: text shows while the stop button is still live.
    page.wait_for_function(
        "document.querySelector('.msg.assistant') && "
        "document.querySelector('.msg.assistant').textContent.length > 0 && "
        "!document.getElementById('stop').disabled",
        timeout=60_000,
    )
    page.wait_for_selector(".msg.assistant .stats", timeout=120_000)
    stats = page.inner_text(".msg.assistant .stats")
    assert "tokens/s" in stats or stats == "", stats
    assert int(stats.split()[0]) <= 48 if stats else True
    assert page.inner_text(".msg.user") == "What is the capital of France? Answer in one sentence."
    assert page.is_disabled("#stop") and not page.is_disabled("#send")
    reply = page.inner_text(".msg.assistant")
    assert len(reply.strip()) > 0 and "Error" not in reply
    # A second turn: the page sends the whole conversation, and both replies stay.
    page.fill("#input", "And of Italy?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length === 2", timeout=120_000)
    assert page.locator(".msg.user").all_inner_texts()[1] == "And of Italy?"
    assert page.locator(".msg.assistant").count() == 2
    assert page.locator(".msg.assistant.error").count() == 0


def test_the_stop_button_ends_a_reply(page):
    page.fill("#key", API_KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    page.fill("#input", "Count from 1 to 1000, one number per line.")
    page.press("#input", "Enter")
    page.wait_for_function("!document.getElementById('stop').disabled", timeout=60_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .stats", timeout=60_000)
    assert page.inner_text(".msg.assistant .stats") == "stopped"


def test_a_wrong_key_shows_the_servers_error(page):
    page.fill("#key", "wrong")
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant.error", timeout=30_000)
    assert "missing or wrong API key" in page.inner_text(".msg.assistant.error")


def test_markdown_is_rendered_and_markup_escaped(page):
    html = page.evaluate(
        "renderMarkdown('# Title\\n\\nSome **bold** and `code` <script>alert(1)</script>\\n\\n"
        "```python\\nprint(1 < 2)\\n```\\n\\n- one\\n- two\\n\\n[link](https://example.com)')"
    )
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<pre><code class="language-python">print(1 &lt; 2)</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<a href="https://example.com" target="_blank" rel="noopener noreferrer">link</a>' in html
