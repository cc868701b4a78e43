"""The web chat page (src/internvl/serve/static/) in headless Debian Chromium, driven by playwright, against a real
uvicorn server on loopback that serves the demo model with an API key configured.

* scripted answers (`scripted`: the real engine samples known tokens) give exact grounding boxes: the page must stream
  the text, hide the tags, escape the markup in it and draw each box where its 0..1000 coordinates say;
* the real demo model answers a grounding question of its training set (boxes read back with internvl.grounding);
* stop, the key gate, HTTP and in-stream errors.

Skipped only when Chromium is missing (`apt-get install -y chromium`; .ci/run installs it). The screenshot goes to
a temporary folder; `INTERNVL_WEB_SCREENSHOT=docs/web-chat.png` also writes it there (how docs/web-chat.png was made).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from internvl.demo.scenes import GROUNDING_PROMPT
from internvl.grounding import parse_boxes

from serve.app_fixtures import MODEL, engine_idle, live_server, scripted

CHROMIUM = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")

MEDIA = Path(__file__).resolve().parents[2] / "examples" / "media"
KEY = "sk-web-page-test"
CHAT = "/v1/chat/completions"

# Two labelled boxes, one <ref> with two boxes, and markup that must stay text.
ANSWER = ('Found <ref>the red triangle</ref><box>[[710, 701, 893, 848]]</box> and <ref>shapes</ref>'
          '<box>[[150, 100, 300, 280], [420, 780, 650, 985]]</box>. <img src=x onerror="window.pwned=1"> & done')
ANSWER_TEXT = 'Found the red triangle and shapes. <img src=x onerror="window.pwned=1"> & done'
ANSWER_BOXES = [("the red triangle", (710, 701, 893, 848)), ("shapes", (150, 100, 300, 280)),
                ("shapes", (420, 780, 650, 985))]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server():
    with live_server(api_keys=(KEY,)) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.problems = []  # script errors and CSP violations; the keyless first GET v1/models is an expected 401
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" and "status of 401" not in m.text
            else None)
    page.urls = []
    page.on("request", lambda r: page.urls.append(r.url))
    page.chats = []
    page.on("request", lambda r: page.chats.append(r) if r.url.endswith(CHAT) else None)
    page.goto(server.base + "/")
    yield page
    context.close()


def enter_key(page) -> None:
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model")).to_have_text(MODEL)


def ask(page, text: str, answers_before: int) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    expect(page.locator(".turn.assistant.done")).to_have_count(answers_before + 1, timeout=120_000)


def record_answer_lengths(page) -> None:
    """Log every length the newest answer's text takes, from a MutationObserver (every DOM update, none missed)."""
    page.evaluate("""() => {
        window.lengths = [];
        const conversation = document.getElementById('conversation');
        new MutationObserver(() => {
            const turns = conversation.querySelectorAll('.turn.assistant');
            const text = turns.length ? turns[turns.length - 1].querySelector('.text') : null;
            const n = text ? text.textContent.length : 0;
            if (n && n !== window.lengths[window.lengths.length - 1]) window.lengths.push(n);
        }).observe(conversation, {subtree: true, childList: true, characterData: true});
    }""")


def answer(page, k: int) -> dict:
    """The k-th answer as shown: its text without the box chips, the chips, the ref labels, and every drawn box
    as a fraction of the image it is drawn on (from the layout, not from styles)."""
    return page.evaluate("""k => {
        const turn = document.querySelectorAll('.turn.assistant')[k];
        const text = turn.querySelector('.text').cloneNode(true);
        const chips = [...text.querySelectorAll('.box-chip')].map(c => c.textContent);
        text.querySelectorAll('.box-chip').forEach(c => c.remove());
        const img = turn.querySelector('.grounded img');
        const r = img ? img.getBoundingClientRect() : null;
        const boxes = [...turn.querySelectorAll('.grounded .box')].map(b => {
            const q = b.getBoundingClientRect();
            return {label: b.querySelector('.box-label').textContent,
                    box: [(q.left - r.left) / r.width, (q.top - r.top) / r.height,
                          (q.right - r.left) / r.width, (q.bottom - r.top) / r.height]};
        });
        return {text: text.textContent, chips, refs: [...turn.querySelectorAll('.text .ref')].map(e => e.textContent),
                markup: turn.querySelector('.text').querySelectorAll('*:not(.ref):not(.box-chip)').length,
                image: img ? img.src : null, size: r ? [r.width, r.height] : null, boxes,
                notes: [...turn.querySelectorAll(':scope > p')].map(p => p.textContent)};
    }""", k)


def assert_boxes_drawn(shown: dict, expected) -> None:
    assert [b["label"] for b in shown["boxes"]] == [label for label, _ in expected], shown
    width, height = shown["size"]
    for got, (_, coords) in zip(shown["boxes"], expected):
        want = [min(max(v, 0), 1000) / 1000 for v in coords]
        # within a pixel of where the 0..1000 coordinates put the box on the displayed image
        assert all(abs(g - w) * (width if i % 2 == 0 else height) <= 1.0 for i, (g, w) in
                   enumerate(zip(got["box"], want))), (got, coords, shown["size"])


def test_page_is_open_but_the_api_keeps_its_key(server):
    page = httpx.get(server.base + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in page.text
    for asset in ("app.js", "api.js", "grounding.js", "style.css"):
        assert httpx.get(f"{server.base}/static/{asset}", timeout=10).status_code == 200, asset
    assert httpx.get(server.base + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.base + "/static/missing.js", timeout=10).status_code == 401  # unknown paths stay guarded


def test_streamed_answer_with_boxes_drawn_over_the_asked_image_then_a_second_turn(page, server, monkeypatch):
    scene1, scene2 = MEDIA / "scene1.png", MEDIA / "scene2.png"
    enter_key(page)
    page.set_input_files("#file", str(scene1))
    page.evaluate("""b64 => {  // paste scene2 from the clipboard
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""", base64.b64encode(scene2.read_bytes()).decode())
    expect(page.locator("#attachments .thumb")).to_have_count(2)
    page.click("#attachments .attachment:nth-child(1) .remove")  # drop the uploaded scene1, upload it once more
    page.set_input_files("#file", str(scene1))
    expect(page.locator("#attachments .thumb")).to_have_count(2)
    thumbs = page.eval_on_selector_all("#attachments .thumb", "els => els.map(e => e.src)")
    assert thumbs == [data_url(scene2), data_url(scene1)]
    page.fill("#tiles", "1")
    page.fill("#temperature", "0")

    scripted(monkeypatch, ANSWER, delay=0.01)
    record_answer_lengths(page)
    ask(page, "Where are the shapes?", 0)

    body = page.chats[-1].post_data_json
    assert page.chats[-1].headers["authorization"] == f"Bearer {KEY}"
    assert body["stream"] is True and body["model"] == MODEL and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(scene2), "max_dynamic_patch": 1}},
        {"type": "image_url", "image_url": {"url": data_url(scene1), "max_dynamic_patch": 1}},
        {"type": "text", "text": "Where are the shapes?"}]}]

    shown = answer(page, 0)
    assert shown["text"] == ANSWER_TEXT, shown  # tags gone, markup kept as text
    assert shown["markup"] == 0 and not page.evaluate("window.pwned"), shown
    assert shown["chips"] == ["1", "2", "3"] and shown["refs"] == ["the red triangle", "shapes"], shown
    lengths = page.evaluate("window.lengths")
    final = len(ANSWER_TEXT) + 3
    assert lengths[-1] == final and len([n for n in lengths if 0 < n < final]) >= 2, lengths  # it streamed
    assert shown["image"] == data_url(scene1), "boxes belong on the last image of the question"
    assert shown["size"][0] > 200, shown["size"]
    assert_boxes_drawn(shown, ANSWER_BOXES)
    assert shown["notes"] == [], shown

    # second turn, no new image: the whole conversation is resent, and the boxes go over the same image
    monkeypatch.undo()
    scripted(monkeypatch, "Here: <box>[[0, 500, 500, 1000]]</box>", delay=0.0)
    ask(page, "And the bottom left quarter?", 1)
    messages = page.chats[-1].post_data_json["messages"]
    assert messages[1:] == [{"role": "assistant", "content": ANSWER},
                            {"role": "user", "content": "And the bottom left quarter?"}]
    assert messages[0] == body["messages"][0]
    second = answer(page, 1)
    assert second["text"] == "Here: " and second["image"] == data_url(scene1), second
    assert_boxes_drawn(second, [("box 1", (0, 500, 500, 1000))])
    assert page.problems == [] and all(u.startswith(server.base) or u.startswith("data:") for u in page.urls), \
        (page.problems, page.urls)


def test_stop_aborts_the_stream_and_the_server_frees_the_request(page, server, monkeypatch):
    enter_key(page)
    scripted(monkeypatch, " word", delay=0.02, repeat=True)
    page.fill("#prompt", "Say words forever.")
    page.press("#prompt", "Enter")
    expect(page.locator(".turn.assistant .text")).to_contain_text(" word word word word", timeout=60_000)
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_selector(".turn.assistant.done")
    shown = answer(page, 0)
    assert shown["notes"] == ["(stopped)"] and shown["text"].startswith(" word word"), shown
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    assert engine_idle(server.engine, timeout=10), "the aborted request still holds the engine"


def test_key_gate_http_error_and_in_stream_error_are_shown(page, server):
    expect(page.locator("#model")).to_contain_text("API key")
    page.fill("#prompt", "Hello?")
    page.press("#prompt", "Enter")
    expect(page.locator("#status")).to_contain_text("API key")
    assert page.locator(".turn").count() == 0 and page.input_value("#prompt") == "Hello?"  # nothing was lost

    enter_key(page)
    chunk = ('data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "%s", "choices": '
             '[{"index": 0, "delta": {"content": %s}, "logprobs": null, "finish_reason": null}]}\n\n')
    stream = (chunk % (MODEL, '""') + chunk % (MODEL, '"Partial <ref>the re"') +
              'data: {"error": {"message": "The engine failed while answering.", "type": "server_error", '
              '"param": null, "code": "internal_error"}}\n\n' + "data: [DONE]\n\n")
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, body=stream,
                                                         headers={"Content-Type": "text/event-stream"}))
    ask(page, "Hello?", 0)
    shown = answer(page, 0)
    assert shown["text"] == "Partial the re", shown  # the unfinished tag is not shown raw
    assert shown["notes"] == ["Error: The engine failed while answering."], shown
    assert page.is_enabled("#send")


def test_demo_model_grounding_answer_is_drawn(page, server, tmp_path):
    """The real model, unscripted: its answer (read from the response, parsed by internvl.grounding) is drawn.
    (Streaming is shown above; here the response passes through the test whole.)"""
    scene1 = MEDIA / "scene1.png"
    enter_key(page)
    page.set_input_files("#file", str(scene1))
    page.fill("#tiles", "1")
    page.fill("#temperature", "0")
    bodies = []  # the server's SSE body, passed through (whole, so this test sees what the page was sent)

    def pass_through(route):
        response = route.fetch()
        bodies.append(response.text())
        route.fulfill(response=response, body=bodies[-1])

    page.route("**" + CHAT, pass_through)
    ask(page, GROUNDING_PROMPT.format("the red triangle"), 0)
    events = [json.loads(e[len("data: "):]) for e in bodies[0].split("\n\n") if e.startswith("data: {")]
    raw = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    expected = parse_boxes(raw)
    assert expected, f"the demo model gave no box: {raw!r}"
    shown = answer(page, 0)
    assert "<box>" not in shown["text"] and "<ref>" not in shown["text"], shown
    assert_boxes_drawn(shown, [(b.phrase or f"box {i + 1}", b.box_0_1000) for i, b in enumerate(expected)])
    shot = page.screenshot(path=str(tmp_path / "web-chat.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    if os.environ.get("INTERNVL_WEB_SCREENSHOT"):
        Path(os.environ["INTERNVL_WEB_SCREENSHOT"]).write_bytes(shot)
    assert page.problems == [], page.problems
