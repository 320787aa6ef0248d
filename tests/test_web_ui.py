"""The browser chat UI (web/) in headless Chromium, against a real uvicorn server on the tiny model.

Debian's `chromium` driven by Playwright's Python package (Playwright's own browser download needs its
CDN). Skips only when one of those two is missing; .ci/run installs both.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from tests.server import KEY, Server, idle

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

STEP_DELAY_S = 0.03  # the tiny model answers in milliseconds; slowed down, there is time to watch and Stop
MAX_TOKENS = 200  # greedy decoding of the tiny model never ends before this (no EOS), so only Stop ends it
TIMEOUT_MS = 20_000  # two shared cores run the engine and the browser at once
NUMBER = re.compile(r"^\d+(\.\d+)?( ms| s)?$")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=512, block_size=4,
                                                  quantization="none"))
    step = engine.engine.step

    def slow_step():  # runs on the engine thread, so the event loop and the socket stay responsive
        time.sleep(STEP_DELAY_S)
        return step()

    engine.engine.step = slow_step
    with Server(engine) as srv:
        _require_ui(srv)
        yield srv


def _require_ui(srv: Server) -> None:
    """The page and its socket are the gateway's (gateway/app.py, gateway/ws.py); until both exist, the
    tests here cannot run and say so rather than fail."""
    page = httpx.get(f"{srv.url}/", timeout=10)
    if page.status_code != 200 or 'data-testid="prompt"' not in page.text:
        pytest.xfail("the gateway does not serve web/ at / yet")
    ws_paths = [getattr(r, "path", None) for r in srv.server.config.app.routes]
    if "/v1/ws" not in ws_paths:
        pytest.xfail("the gateway has no /v1/ws WebSocket endpoint yet (gateway/ws.py)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Frames:
    """The JSON frames the page's WebSocket sends and receives."""

    def __init__(self, page):
        self.sent: list[dict] = []
        self.received: list[dict] = []
        page.on("websocket", self._attach)

    def _attach(self, ws) -> None:
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def requests(self) -> list[dict]:
        return [f for f in self.sent if f["type"] == "request"]


def _open(browser, **options):
    """A new context and page with the tests' timeout, and the list the page's uncaught errors go to."""
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **options})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


@pytest.fixture
def ui(browser, server):
    """The page, connected, and the frames its socket carries."""
    context, page, errors = _open(browser)
    frames = Frames(page)
    page.goto(f"{server.url}/?api_key={KEY}")
    page.wait_for_selector("[data-testid=conn-status][data-state=open]")
    yield page, frames
    context.close()
    assert not errors, errors


def _ask(page, text: str) -> None:
    page.fill("[data-testid=prompt]", text)
    page.press("[data-testid=prompt]", "Enter")


def _last_answer(page):
    return page.locator("[data-testid=assistant-message]").last


def _watch_growth(answer, samples: int = 4) -> list[int]:
    """The answer's text length, each time it has grown, until it has grown `samples` times."""
    body = answer.locator("[data-testid=message-body]")
    lengths, deadline = [0], time.monotonic() + TIMEOUT_MS / 1000
    while len(lengths) <= samples:
        assert time.monotonic() < deadline, f"the answer stopped growing: {lengths}"
        n = len(body.inner_text())
        if n > lengths[-1]:
            lengths.append(n)
        time.sleep(0.02)
    return lengths[1:]


def _wait_state(answer, *states: str) -> None:
    answer.page.wait_for_function("([el, states]) => states.includes(el.dataset.state)",
                                  arg=[answer.element_handle(), list(states)])


def _stat(page, name: str) -> str:
    return page.inner_text(f"[data-testid=stat-{name}]").strip()


def test_chat_streams_stops_and_keeps_the_conversation(ui, server):
    page, frames = ui
    assert "api_key" not in page.url  # taken from the address bar into localStorage
    assert page.evaluate("localStorage.getItem('sluice.api_key')") == KEY
    page.fill("[data-testid=max-tokens]", str(MAX_TOKENS))
    page.fill("[data-testid=temperature]", "0")
    page.fill("[data-testid=system-prompt]", "You are terse.")

    _ask(page, "Tell me a story.")
    answer = _last_answer(page)
    lengths = _watch_growth(answer)
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)  # text grows over time
    assert answer.get_attribute("data-state") == "streaming"
    assert page.is_visible("[data-testid=stop]") and not page.is_visible("[data-testid=send]")
    assert NUMBER.match(_stat(page, "ttft")) and NUMBER.match(_stat(page, "tps")), page.inner_text("#stats")

    page.click("[data-testid=stop]")
    _wait_state(answer, "stopped")
    assert answer.get_attribute("data-finish-reason") == "cancelled"
    assert answer.locator("[data-testid=message-meta]").inner_text() == "Stopped"
    stopped_text = answer.locator("[data-testid=message-body]").inner_text()
    time.sleep(0.3)
    assert answer.locator("[data-testid=message-body]").inner_text() == stopped_text  # nothing after Stop
    assert page.is_visible("[data-testid=send]") and not page.is_visible("[data-testid=stop]")

    request = frames.requests()[0]
    done = next(f for f in frames.received if f["type"] == "done" and f["id"] == request["id"])
    assert done["finish_reason"] == "cancelled"
    assert {f["type"] for f in frames.sent} == {"request", "cancel"}
    assert request["body"]["messages"] == [{"role": "system", "content": "You are terse."},
                                           {"role": "user", "content": "Tell me a story."}]
    assert request["body"]["temperature"] == 0 and request["body"]["max_tokens"] == MAX_TOKENS
    assert _stat(page, "tokens") == str(done["usage"]["completion_tokens"])
    assert 1 < done["usage"]["completion_tokens"] < MAX_TOKENS
    assert NUMBER.match(_stat(page, "ttft")) and float(_stat(page, "tps")) > 0
    assert idle(server.engine)  # the cancel reached the engine: the request's blocks are free

    # The second turn sends the whole conversation, the stopped answer included; Esc stops it.
    _ask(page, "And another one.")
    second = _last_answer(page)
    _watch_growth(second, samples=2)
    page.keyboard.press("Escape")
    _wait_state(second, "stopped")
    assert frames.requests()[1]["body"]["messages"][1:] == [
        {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": stopped_text},
        {"role": "user", "content": "And another one."}]
    assert page.locator("[data-testid=user-message]").count() == 2

    page.click("[data-testid=new-chat]")
    assert page.locator("[data-testid=assistant-message]").count() == 0
    assert page.evaluate("window.sluice.conversation()") == []


def test_json_schema_field(ui):
    page, frames = ui
    page.fill("[data-testid=json-schema]", '{"type": "object",')
    assert "not valid JSON" in page.inner_text("[data-testid=json-schema-error]")
    assert page.get_attribute("[data-testid=json-schema]", "aria-invalid") == "true"
    _ask(page, "Hi")
    assert frames.requests() == [] and page.locator("[data-testid=user-message]").count() == 0
    assert page.input_value("[data-testid=prompt]") == "Hi"  # kept, to send once the schema is fixed

    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    page.fill("[data-testid=json-schema]", json.dumps(schema))
    assert page.inner_text("[data-testid=json-schema-error]") == ""
    page.fill("[data-testid=max-tokens]", "8")
    page.press("[data-testid=prompt]", "Enter")
    answer = _last_answer(page)
    _wait_state(answer, "done", "error")
    request = frames.requests()[0]
    assert request["body"]["response_format"] == {"type": "json_schema",
                                                  "json_schema": {"name": "ui", "schema": schema}}
    error = next((f for f in frames.received if f["type"] == "error" and f["id"] == request["id"]), None)
    if error is not None:  # e.g. "response_format is not supported by this server yet": shown in the chat
        assert answer.get_attribute("data-state") == "error"
        assert error["error"]["message"] in answer.locator("[data-testid=message-meta]").inner_text()


def test_markdown_renderer_escapes_html(ui):
    page, _ = ui
    source = ("<script>window.pwned = 1</script> <img src=x onerror=\"window.pwned = 2\">\n"
              "# Title\n**bold** *it* `<b>code</b>`\n- one\n- two\n\n"
              "[ok](https://example.com/?a=1&b=2) [bad](javascript:alert(1)) [q](https://x.y/\"onclick=\"z)\n"
              "```html\n<script>alert(1)</script>\n```")
    html = page.evaluate("async src => (await import('./markdown.js')).renderMarkdown(src)", source)
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    rendered = page.evaluate("""html => {
        const box = document.createElement('div');
        box.innerHTML = html;
        document.body.append(box);
        return {
            tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
            attrs: [...box.querySelectorAll('*')].flatMap(e => e.getAttributeNames()),
            hrefs: [...box.querySelectorAll('a')].map(a => a.getAttribute('href')),
            code: [...box.querySelectorAll('pre code')].map(c => c.textContent),
            pwned: window.pwned ?? null,
        };
    }""", html)
    assert set(rendered["tags"]) <= {"p", "h1", "strong", "em", "code", "ul", "li", "a", "pre", "br"}
    assert {"h1", "strong", "em", "code", "ul", "li", "a", "pre"} <= set(rendered["tags"])
    assert not [a for a in rendered["attrs"] if a.startswith("on")]
    assert rendered["hrefs"] == ["https://example.com/?a=1&b=2", "https://x.y/"]
    assert rendered["code"] == ["<script>alert(1)</script>"]
    assert rendered["pwned"] is None


def test_phone_width_layout(browser, server):
    context, pg, _ = _open(browser, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    pg.goto(f"{server.url}/?api_key={KEY}")
    pg.wait_for_selector("[data-testid=conn-status][data-state=open]")
    assert pg.evaluate("document.documentElement.scrollWidth") <= 360  # nothing scrolls sideways
    assert pg.is_visible("[data-testid=prompt]") and pg.is_visible("[data-testid=send]")
    assert not pg.is_visible("[data-testid=settings]")  # folded away on a phone, behind its toggle
    pg.click("[data-testid=settings-toggle]")
    assert pg.is_visible("[data-testid=max-tokens]")
    assert pg.get_attribute("[data-testid=settings-toggle]", "aria-expanded") == "true"
    context.close()


def test_markdown_lists_code_and_links(ui):
    """Code blocks inside list items, code spans inside link labels, parentheses inside URLs."""
    page, _ = ui
    cases = {
        "steps": "1. Install:\n   ```bash\n   pip install x\n   ```\n2. Run:\n\n   ```\n   sluice serve\n   ```\n3. Done",
        "streaming": "1. Step\n   ```py\n   x = 1",  # the fence is still open mid-stream
        "label": "[the `LLM` class](https://example.com/llm)",
        "parens": "[Rust](https://en.wikipedia.org/wiki/Rust_(programming_language)) or "
                  "https://en.wikipedia.org/wiki/Foo_(bar).",
    }
    out = page.evaluate("""cases => {
        const result = {};
        for (const [name, source] of Object.entries(cases)) {
            const box = document.createElement('div');
            box.innerHTML = window.sluice.renderMarkdown(source);
            result[name] = {
                html: box.innerHTML,
                lists: box.querySelectorAll('ol').length,
                items: [...box.querySelectorAll('ol > li')].map(li => li.querySelector('pre code')?.textContent ?? null),
                links: [...box.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.innerHTML]),
            };
        }
        return result;
    }""", cases)
    assert out["steps"]["lists"] == 1, out["steps"]["html"]  # one list: the code blocks do not split it
    assert out["steps"]["items"] == ["pip install x", "sluice serve", None], out["steps"]["html"]
    assert out["streaming"]["items"] == ["x = 1"], out["streaming"]["html"]
    assert out["label"]["links"] == [["https://example.com/llm", "the <code>LLM</code> class"]]
    assert "\x00" not in out["label"]["html"]
    assert [href for href, _ in out["parens"]["links"]] == [
        "https://en.wikipedia.org/wiki/Rust_(programming_language)", "https://en.wikipedia.org/wiki/Foo_(bar)"]


def test_keyboard_focus_follows_send_and_stop(ui):
    page, _ = ui
    page.fill("[data-testid=max-tokens]", str(MAX_TOKENS))
    page.fill("[data-testid=prompt]", "Tell me a story.")
    page.focus("[data-testid=prompt]")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.testid") == "send"
    page.keyboard.press("Enter")  # Send turns into Stop, and the focus goes with it
    answer = _last_answer(page)
    _watch_growth(answer, samples=1)
    assert page.evaluate("document.activeElement.dataset.testid") == "stop"
    # While the cancel is on its way Stop is inactive (seen from a listener after the page's own, as the
    # cancelled answer may end at once), but not disabled, which would throw the focus to <body>...
    page.evaluate("""() => document.querySelector('[data-testid=stop]').addEventListener('click', (event) => {
        window.afterStop = [event.target.getAttribute('aria-disabled'), event.target.disabled];
    })""")
    page.keyboard.press("Enter")
    _wait_state(answer, "stopped")
    assert page.evaluate("window.afterStop") == ["true", False]
    # ...and focus goes back to the message box once the answer has ended.
    assert page.evaluate("document.activeElement.dataset.testid") == "prompt"


def test_a_request_refused_unread_ends_the_answer(ui):
    """A request frame over the server's size limit gets an error with id null: the answer must end with it
    rather than wait forever, and the page stays usable."""
    page, frames = ui
    _ask(page, "x" * (1 << 20))
    answer = _last_answer(page)
    _wait_state(answer, "error")
    assert "body_too_large" in answer.locator("[data-testid=message-meta]").inner_text()
    assert page.input_value("[data-testid=prompt]") == "x" * (1 << 20)  # handed back to fix and retry
    assert page.is_visible("[data-testid=send]") and not page.is_visible("[data-testid=stop]")
    assert page.evaluate("window.sluice.conversation()") == []
    page.fill("[data-testid=max-tokens]", "4")
    _ask(page, "Hi")
    _wait_state(_last_answer(page), "done")


def test_new_chat_while_streaming_leaves_nothing_of_the_old_answer(ui):
    page, frames = ui
    page.fill("[data-testid=max-tokens]", str(MAX_TOKENS))
    _ask(page, "Tell me a story.")
    _watch_growth(_last_answer(page), samples=1)
    # Hold the page's frame callbacks, so that a render of the old answer is still queued at New chat.
    page.evaluate("""() => {
        window.heldFrames = [];
        window.requestAnimationFrame = (callback) => window.heldFrames.push(callback);
    }""")
    page.wait_for_function("window.heldFrames.length > 0", polling=20)
    page.click("[data-testid=new-chat]")
    page.evaluate("window.heldFrames.forEach((callback) => callback(performance.now()))")
    assert page.locator("[data-testid=assistant-message]").count() == 0
    assert [_stat(page, name) for name in ("ttft", "tps", "tokens")] == ["–", "–", "–"]
    assert [f["type"] for f in frames.sent] == ["request", "cancel"]


def test_without_the_api_key(browser, server):
    context, page, _ = _open(browser)
    page.goto(f"{server.url}/")
    page.wait_for_selector("[data-testid=conn-status][data-state=refused]")
    _ask(page, "Hi")
    answer = _last_answer(page)
    _wait_state(answer, "error")
    # The page says what is wrong and where to fix it (not "it will reconnect": it will not).
    assert "API key" in answer.locator("[data-testid=message-meta]").inner_text()
    assert page.evaluate("document.activeElement.dataset.testid") == "api-key"
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-testid=conn-status][data-state=open]")
    page.fill("[data-testid=max-tokens]", "4")
    _ask(page, "Hi")
    _wait_state(_last_answer(page), "done")
    context.close()


def test_a_dropped_socket_ends_the_answer_and_reconnects(browser, server):
    context, page, errors = _open(browser)
    sockets, models = [], []

    def proxy(ws):  # the page's socket, through Playwright, so that the test can cut it
        sockets.append((ws, ws.connect_to_server()))

    def models_route(route):  # after the drop the "restarted" server serves a model under another name
        models.append(route.request.url)
        if len(sockets) < 2:
            route.continue_()
        else:
            route.fulfill(json={"object": "list", "data": [{"id": "renamed", "object": "model"}]})

    page.route_web_socket(re.compile(r".*/v1/ws.*"), proxy)
    page.route(re.compile(r".*/v1/models$"), models_route)
    frames = Frames(page)
    page.goto(f"{server.url}/?api_key={KEY}")
    page.wait_for_selector("[data-testid=conn-status][data-state=open]")
    page.fill("[data-testid=max-tokens]", str(MAX_TOKENS))
    _ask(page, "Tell me a story.")
    answer = _last_answer(page)
    _watch_growth(answer, samples=1)

    for ws in sockets[-1]:
        ws.close(code=1011)
    _wait_state(answer, "error")  # the answer ends with a visible error rather than spinning
    assert "connection was lost" in answer.locator("[data-testid=message-meta]").inner_text()
    assert page.input_value("[data-testid=prompt]") == "Tell me a story."
    assert page.get_attribute("[data-testid=conn-status]", "data-state") in ("closed", "connecting")

    page.wait_for_selector("[data-testid=conn-status][data-state=open]")  # on its own
    assert len(sockets) == 2
    page.wait_for_function("document.querySelector('[data-testid=model-name]').textContent === 'renamed'")
    page.press("[data-testid=prompt]", "Enter")
    second = _last_answer(page)
    _wait_state(second, "error")  # this server does not know the new name: its 404 is shown
    assert frames.requests()[-1]["body"]["model"] == "renamed"
    assert "model_not_found" in second.locator("[data-testid=message-meta]").inner_text()
    context.close()
    assert not errors, errors
