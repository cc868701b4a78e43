"""Responses and streams (SERVING.md §3.2, §4, §13 #15, #16, #35, #36, #42): the SSE shape, n > 1, stop strings
across tokens, UTF-8 hold-back, logprobs, usage, the prompt InternVL sees, and an engine fault after the first byte.
The engine is real; `scripted` fixes which tokens it samples so the expected text is known."""

import asyncio

import pytest

from internvl.serve import schema
from serve.app_fixtures import (
    MODEL,
    app_client,
    chat_body,
    demo,
    engine_idle,
    image_content,
    keeps_serving,
    png_data_url,
    scripted,
    sse_events,
    tile_geometry,
)


@pytest.fixture(scope="module")
def client():
    with app_client() as c:
        yield c


def stream(client, body) -> list:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-request-id"]
        return sse_events(r.iter_lines())


def content_of(events, index=0) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if e["choices"] and e["choices"][0]["index"] == index)


# ---------------------------------------------------------------------------------------------- #35
def test_35_stream_shape_with_usage(client, monkeypatch):
    ids = scripted(monkeypatch, "The cat sits on the mat.")
    events = stream(client, chat_body("Describe.", max_tokens=50, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        schema.ChatCompletionChunk.model_validate(c)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len(chunks[0]["id"]) == len("chatcmpl-") + 32
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = chunks[-2]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(ids) + 1  # + the end-of-turn token
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + len(ids) + 1
    assert content_of(events) == "The cat sits on the mat."
    # without include_usage: no usage key at all, no usage chunk
    events = stream(client, chat_body("Describe.", max_tokens=50))
    assert all("usage" not in e for e in events[:-1]) and events[-2]["choices"][0]["finish_reason"] == "stop"
    keeps_serving(client)


def test_non_streamed_response_shape_and_length_finish(client, monkeypatch):
    ids = scripted(monkeypatch, "one two three four five six")
    r = client.post("/v1/chat/completions", json=chat_body("Count.", max_tokens=3))
    body = schema.ChatCompletion.model_validate(r.json()).model_dump()
    assert body["choices"][0]["finish_reason"] == "length"
    _, tok = demo()
    assert body["choices"][0]["message"]["content"] == tok.decode(ids[:3])
    assert body["usage"]["completion_tokens"] == 3
    assert r.headers["x-request-id"]
    rid = client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "my.req-1"})
    assert rid.headers["x-request-id"] == "my.req-1"
    bad = client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "no spaces/allowed"})
    assert bad.headers["x-request-id"] != "no spaces/allowed" and len(bad.headers["x-request-id"]) == 32


# ---------------------------------------------------------------------------------------------- #15
def test_15_n2_streams_two_choices_with_index_on_every_chunk(client, monkeypatch):
    ids = scripted(monkeypatch, "Red square.")
    events = stream(client, chat_body("Color?", max_tokens=20, n=2, stream_options={"include_usage": True}))
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] in (0, 1) for c in chunks)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "stop" and mine[-1]["delta"] == {}
        assert content_of(events, i) == "Red square."
    r = client.post("/v1/chat/completions", json=chat_body("Color?", max_tokens=20, n=3))
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert r.json()["usage"]["completion_tokens"] == 3 * (len(ids) + 1)  # every choice's tokens, end-of-turn included
    keeps_serving(client)


# ---------------------------------------------------------------------------------------------- #16
def test_16_a_stop_string_spanning_two_tokens_is_honoured_and_not_emitted(client, monkeypatch):
    _, tok = demo()
    text = "The cat sits on the mat. The dog sits by the door."
    ids = scripted(monkeypatch, text)
    pieces = [tok.decode([i]) for i in ids]
    # find a stop string made of the end of one token and the start of the next
    k = next(k for k in range(3, len(pieces) - 1) if len(pieces[k]) > 1 and len(pieces[k + 1]) > 1)
    stop = pieces[k][-1:] + pieces[k + 1][:2]
    expected = text[: text.index(stop)]
    r = client.post("/v1/chat/completions", json=chat_body("Go.", max_tokens=60, stop=[stop, "zzz"]))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
    events = stream(client, chat_body("Go.", max_tokens=60, stop=stop))
    assert content_of(events) == expected and stop not in content_of(events)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    keeps_serving(client)


# ---------------------------------------------------------------------------------------------- #42
def test_42_chinese_streamed_token_by_token_has_no_replacement_characters(client, monkeypatch):
    text = "这是一只猫。图片里有什么？你好，世界！"
    _, tok = demo()
    ids = scripted(monkeypatch, text)
    assert len(ids) > len(text)  # byte-level tokens split the characters
    events = stream(client, chat_body("描述", max_tokens=200))
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert all("\ufffd" not in d for d in deltas)
    r = client.post("/v1/chat/completions", json=chat_body("描述", max_tokens=200))
    assert "".join(deltas) == r.json()["choices"][0]["message"]["content"] == text


# ---------------------------------------------------------------------------------------------- logprobs
def test_logprobs_non_streamed_and_streamed(client):
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=4, logprobs=True, top_logprobs=3,
                                                          temperature=0))
    choice = schema.ChatCompletion.model_validate(r.json()).choices[0]
    entries = choice.logprobs.content
    assert len(entries) == r.json()["usage"]["completion_tokens"]
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy: the chosen token is the most likely
        assert e.bytes == list(e.token.encode())
    events = stream(client, chat_body(max_tokens=4, logprobs=True, temperature=0))
    streamed = [x for ev in events[:-1] if ev["choices"] and ev["choices"][0]["logprobs"]
                for x in ev["choices"][0]["logprobs"]["content"]]
    assert [x["token"] for x in streamed] == [e.token for e in entries]


# ---------------------------------------------------------------------------------------------- completions
def test_completions_route_stream_echo_and_legacy_logprobs(client, monkeypatch):
    scripted(monkeypatch, " sits on the mat.")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "The cat", "max_tokens": 30, "echo": True,
                                             "logprobs": 2})
    body = schema.Completion.model_validate(r.json())
    assert body.choices[0].text == "The cat sits on the mat." and body.choices[0].finish_reason == "stop"
    assert len(body.choices[0].logprobs.tokens) == body.usage.completion_tokens
    assert body.choices[0].logprobs.text_offset[0] == len("The cat")
    two = client.post("/v1/completions", json={"model": MODEL, "prompt": ["A", "B"], "max_tokens": 30, "n": 2})
    assert [c["index"] for c in two.json()["choices"]] == [0, 1, 2, 3]
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "The cat", "max_tokens": 30,
                                                         "stream": True}) as s:
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " sits on the mat."
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- #36
def test_36_engine_fault_after_the_first_byte_is_an_error_event_then_done(client, monkeypatch):
    engine = client.app_state.backend.engine
    original = engine._run
    calls = {"n": 0}

    def failing(works):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected fault with a secret /path/inside.py")
        return original(works)

    scripted(monkeypatch, "word " * 40)
    monkeypatch.setattr(engine, "_run", failing)
    events = stream(client, chat_body("Go.", max_tokens=100))
    monkeypatch.setattr(engine, "_run", original)
    assert events[-1] == "[DONE]"
    err = events[-2]
    assert set(err) == {"error"} and err["error"]["type"] == "server_error" and err["error"]["code"] == "internal_error"
    assert "secret" not in err["error"]["message"] and "Traceback" not in err["error"]["message"]
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2])  # text came first
    assert engine_idle(engine)
    keeps_serving(client)


def test_41_fault_in_one_step_fails_that_request_only_and_keeps_serving(client, monkeypatch):
    import torch

    engine = client.app_state.backend.engine
    original = engine._run

    def oom(works):
        monkeypatch.setattr(engine, "_run", original)  # one step only
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine, "_run", oom)
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert engine_idle(engine)
    keeps_serving(client, image=True)


# ---------------------------------------------------------------------------------------------- the prompt (§3.2)
def test_prompt_mapping_system_multi_image_numbering_and_history(client):
    from internvl.serve.config import ServerConfig
    from internvl.serve.prompts import prepare_chat
    from internvl.serve.protocol import parse_chat_request

    backend = client.app_state.backend
    cfg = ServerConfig(limit_images_per_prompt=4)
    img = {"type": "image_url", "image_url": {"url": png_data_url(32, 32)}}  # small: one tile of 64 tokens
    body = {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [img, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, img, img, {"type": "text", "text": "them."}]},
    ]}
    prepared = asyncio.run(prepare_chat(parse_chat_request(body, cfg), backend, cfg, cfg.media_policy()))
    size, tile_tokens = tile_geometry()
    block = "<img>" + "<IMG_CONTEXT>" * tile_tokens + "</img>"
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                f"<|im_start|>user\n{block}\nWhat is it?<|im_end|>\n"
                "<|im_start|>assistant\nA square.<|im_end|>\n"
                f"<|im_start|>user\nImage-2: {block}\nImage-3: {block}\nCompare\nthem.<|im_end|>\n"
                "<|im_start|>assistant\n")
    _, tok = demo()
    assert prepared.prompt_ids == tok(expected)["input_ids"]
    assert prepared.num_patches_list == [1, 1, 1] and tuple(prepared.pixel_values.shape) == (3, 3, size, size)
    # without a system message the template default (S3 for internvl2_5) is used
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    prepared = asyncio.run(prepare_chat(parse_chat_request(body, cfg), backend, cfg, cfg.media_policy()))
    from internvl.templates.conversation import SYSTEM_MESSAGE_S3

    assert tok.decode(prepared.prompt_ids).startswith(f"<|im_start|>system\n{SYSTEM_MESSAGE_S3}<|im_end|>")


def test_video_as_frame_list_and_image_detail_combined(client):
    frames = [png_data_url(40, 30, c) for c in ("red", "green", "blue")]
    body = chat_body([{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}], max_tokens=2)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text_only = client.post("/v1/chat/completions", json=chat_body("What happens?", max_tokens=1))
    frame_lines = len(demo()[1].encode("".join(f"Frame{k}: \n" for k in (1, 2, 3))))
    extra = r.json()["usage"]["prompt_tokens"] - text_only.json()["usage"]["prompt_tokens"]
    assert extra == 3 * (tile_geometry()[1] + 2) + frame_lines  # one tile per frame
    too_many = chat_body([{"type": "video", "video": frames * 20}])
    assert client.post("/v1/chat/completions", json=too_many).status_code == 400
    keeps_serving(client, image=True)


def test_image_then_text_request_with_a_real_image_file(client):
    from pathlib import Path

    import base64

    scene = Path(__file__).resolve().parents[2] / "examples" / "media" / "scene1.png"
    url = "data:image/png;base64," + base64.b64encode(scene.read_bytes()).decode()
    r = client.post("/v1/chat/completions", json=chat_body(image_content("What color is the triangle?", url=url),
                                                          max_tokens=16, temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip()
