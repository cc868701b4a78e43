"""Shared helpers of the server tests (tests/serve/test_app*.py, test_openai_client.py).

* `demo()`: the shipped demo model and tokenizer, loaded once per test session.
* `app_client(**config)`: a TestClient on `create_app(demo model, ServerConfig(**config))`, ready.
* `live_server(**config)`: the same app under a real uvicorn on 127.0.0.1 (a free port), in a thread.
* `scripted(monkeypatch, text_or_ids)`: the engine samples exactly these tokens (then the end-of-turn token), so
  streaming, stop strings and UTF-8 hold-back can be tested on known text with the real engine.
* `assert_error(response, status, type, code, param)`, `keeps_serving(client)`: the checklist conventions (§13).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import threading
import time

import httpx
from fastapi.testclient import TestClient
from PIL import Image

from internvl.serve.app import create_app
from internvl.serve.config import MIB, ServerConfig

MODEL = "internvl-demo"
SMALL_KV = 32 * MIB  # 5461 tokens of the demo model: more than its 4096-token context


@functools.lru_cache(maxsize=None)
def demo():
    from internvl import InternVLChatModel, load_tokenizer
    from internvl.demo.model import DEMO_MODEL_DIR

    return InternVLChatModel.from_pretrained(DEMO_MODEL_DIR).eval(), load_tokenizer(DEMO_MODEL_DIR)


def tile_geometry() -> tuple[int, int]:
    """(tile side in px, image tokens per tile) of the demo model. Its own tile limit is 1 (trained on single tiles):
    multi-tile cases ask for more."""
    cfg = demo()[0].config
    return cfg.image_size, cfg.num_image_token


def make_config(**over) -> ServerConfig:
    over.setdefault("kv_budget_bytes", SMALL_KV)
    over.setdefault("model_name", MODEL)
    over.setdefault("log_requests", False)
    return ServerConfig(**over)


def make_app(max_dynamic_patch: int | None = None, **over):
    """`max_dynamic_patch`: serve the demo weights with this tile limit in their config (a checkpoint default
    above 1, as every real InternVL checkpoint has); None = the shipped config."""
    model, tok = demo()
    if max_dynamic_patch is not None:
        import copy

        model = copy.copy(model)  # shares the weights; only the config differs
        model.config = model.config.replace(max_dynamic_patch=max_dynamic_patch)
    return create_app(model, make_config(**over), tokenizer=tok)


def wait_ready(get, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/health").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("server did not become ready")


@contextlib.contextmanager
def app_client(**over):
    app = make_app(**over)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client.get)
        client.app_state = app.state.server
        yield client


class LiveServer:
    def __init__(self, app, host: str, port: int):
        self.app, self.base = app, f"http://{host}:{port}"
        self.state = app.state.server

    @property
    def engine(self):
        return self.state.backend.engine


@contextlib.contextmanager
def live_server(app=None, **over):
    """uvicorn on 127.0.0.1:<free port> in a thread (loopback only)."""
    import uvicorn

    app = app or make_app(**over)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(app, "127.0.0.1", port)
    live.loop = server.servers[0].get_loop()  # the server's event loop, for run_coroutine_threadsafe
    wait_ready(lambda p: httpx.get(live.base + p, timeout=5))
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=15)


# ---------------------------------------------------------------------------------------------- requests
def png_data_url(width: int = 64, height: int = 48, color="red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(content="What is 2+3?", max_tokens: int = 3, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def image_content(text: str = "What color is the shape?", url: str | None = None, **image_extra) -> list:
    return [{"type": "image_url", "image_url": {"url": url or png_data_url(), **image_extra}},
            {"type": "text", "text": text}]


def assert_error(r, status: int, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = "<any>") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["type"] == type_, err
    assert isinstance(err["code"], str) and err["code"], err
    if code is not None:
        assert err["code"] == code, err
    if param != "<any>":
        assert err["param"] == param, err
    assert err["message"] and "Traceback" not in err["message"] and 'File "' not in err["message"], err
    return err


def keeps_serving(client, image: bool = False) -> None:
    """§13: after every case /health is 200 and a known-good request (and an image one where relevant) succeeds."""
    assert client.get("/health").status_code == 200
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    if image:
        r = client.post("/v1/chat/completions", json=chat_body(image_content(), max_tokens=2))
        assert r.status_code == 200, r.text


def sse_events(lines) -> list:
    """`data:` payloads of an SSE body, JSON-decoded, with the final "[DONE]" kept as a string."""
    import json

    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


# ---------------------------------------------------------------------------------------------- engine scripting
def scripted(monkeypatch, text_or_ids, *, delay: float = 0.0, repeat: bool = False):
    """Make every sequence sample `text_or_ids` token by token, then the end-of-turn token (or loop, `repeat`).
    `delay` seconds per sampled token slow the engine down for load and timing tests."""
    import internvl.engine.engine as engine_module

    _, tok = demo()
    ids = tok.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def sample(logits, generated, params, *args, **kwargs):
        if delay:
            time.sleep(delay)
        i = len(generated)
        if repeat:
            return ids[i % len(ids)]
        return ids[i] if i < len(ids) else eos

    monkeypatch.setattr(engine_module, "sample_token", sample)
    return ids


def engine_idle(engine, timeout: float = 5.0) -> bool:
    """Running and waiting queues empty and no KV block referenced, within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.scheduler
        if not s.running and not s.waiting and engine.pool.allocator.num_used == 0 and not engine._requests:
            return True
        time.sleep(0.02)
    return False
