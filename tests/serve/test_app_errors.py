"""SERVING.md §13 A-C (envelope, parsing, messages, parameters, image options) through the HTTP app on the demo model:
each bad input gets its 4xx envelope with the right type, code and param, and the server keeps serving after it."""

import json

import pytest

from serve.app_fixtures import (
    MODEL,
    app_client,
    assert_error,
    chat_body,
    image_content,
    keeps_serving,
    png_data_url,
    tile_geometry,
)

TILE_TOKENS = tile_geometry()[1]


@pytest.fixture(scope="module")
def client():
    with app_client() as c:
        yield c


@pytest.fixture(scope="module")
def tiled_client():
    """The demo weights with a 6-tile limit in their config: the checkpoint default the image options fall back to."""
    with app_client(max_dynamic_patch=6) as c:
        yield c


def post(client, body, **kw):
    if isinstance(body, (dict, list)):
        return client.post("/v1/chat/completions", json=body, **kw)
    return client.post("/v1/chat/completions", content=body, **kw)


# ---------------------------------------------------------------------------------------------- A. envelope, parsing
@pytest.mark.parametrize("raw", [b'{"model": "internvl-demo", "messages": [', b"[1, 2]", b"42", b'"hello"', b"",
                                 b"\xff\xfe", b'{"model": NaN}', b'{"model": "x", "a": "\\ud800"}', b"[" * 100_000])
def test_1_bad_json_bodies_are_400_not_422_or_500(client, raw):
    err = assert_error(post(client, raw, headers={"content-type": "application/json"}), 400, code="invalid_json")
    assert "JSON" in err["message"]
    keeps_serving(client)


def test_2_json_sent_as_text_plain_is_accepted(client):
    # Decision: the body is parsed as JSON whatever the Content-Type says
    r = post(client, json.dumps(chat_body()).encode(), headers={"content-type": "text/plain"})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    keeps_serving(client)


def test_3_body_over_the_cap_is_413():
    with app_client(max_body_bytes=100_000) as c:
        big = chat_body(image_content(url="data:image/png;base64," + "A" * 200_000))
        assert_error(post(c, big), 413, code="payload_too_large")

        def chunks():  # no Content-Length: counted while reading
            yield b'{"model": "internvl-demo", "x": "'
            for _ in range(20):
                yield b"A" * 10_000
            yield b'"}'

        assert_error(c.post("/v1/chat/completions", content=chunks()), 413, code="payload_too_large")
        keeps_serving(c)


def test_3_chunked_body_reading_stops_at_the_cap():
    import asyncio

    from starlette.requests import Request

    from internvl.serve.asgi import read_body
    from internvl.serve.errors import APIError

    sent = []

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": b"x" * 64_000, "more_body": len(sent) < 100}

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)
    with pytest.raises(APIError) as e:
        asyncio.run(read_body(request, 100_000))
    assert e.value.status == 413
    assert len(sent) == 2  # 6.4 MB offered, 128 kB read


def test_4_unknown_model_is_404_and_names_it(client):
    err = assert_error(post(client, {**chat_body(), "model": "gpt-9"}), 404, "not_found_error", "model_not_found",
                       "model")
    assert "gpt-9" in err["message"]
    keeps_serving(client)


def test_6_unknown_fields_and_empty_logit_bias_are_ignored(client):
    r = post(client, {**chat_body(), "foo": 1, "logit_bias": {}, "user": "u1", "metadata": {"a": "b"}, "store": False})
    assert r.status_code == 200, r.text
    keeps_serving(client)


def test_7_wrong_method_and_unknown_path(client):
    err = assert_error(client.get("/v1/chat/completions"), 405, code="method_not_allowed")
    assert "GET" in err["message"]
    assert_error(client.get("/v1/nothing-here"), 404, code="not_found")
    assert_error(client.post("/v2/chat"), 404, code="not_found")
    keeps_serving(client)


# ---------------------------------------------------------------------------------------------- B. messages
@pytest.mark.parametrize("messages", [[], None, "hi", {"role": "user"}])
def test_8_messages_empty_missing_or_not_a_list(client, messages):
    body = {"model": MODEL} if messages is None else {"model": MODEL, "messages": messages}
    assert_error(post(client, body), 400, param="messages")
    keeps_serving(client)


@pytest.mark.parametrize("message, param", [
    ({"role": "wizard", "content": "hi"}, "messages[0].role"),
    ({"content": "hi"}, "messages[0].role"),
    ({"role": "user", "content": None}, "messages[0].content"),
    ({"role": "user", "content": ""}, "messages[0].content"),
    ({"role": "user", "content": []}, "messages[0].content"),
    ({"role": "user", "content": [{"type": "text", "text": ""}]}, "messages[0].content"),
    ({"role": "user"}, "messages[0].content"),
    ("just a string", "messages[0]"),
])
def test_9_bad_roles_and_content(client, message, param):
    assert_error(post(client, {"model": MODEL, "messages": [message]}), 400, param=param)
    keeps_serving(client)


@pytest.mark.parametrize("part, param", [
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "messages[0].content[1].type"),
    ({"type": "file", "file": {}}, "messages[0].content[1].type"),
    ({"text": "no type"}, "messages[0].content[1].type"),
    ({"type": "text"}, "messages[0].content[1].text"),
    ({"type": "text", "text": 5}, "messages[0].content[1].text"),
    ({"type": "image_url", "image_url": {}}, "messages[0].content[1].image_url.url"),
    ({"type": "image_url", "image_url": {"url": 5}}, "messages[0].content[1].image_url.url"),
    ({"type": "image_url"}, "messages[0].content[1].image_url"),
    ("a bare string part", "messages[0].content[1]"),
])
def test_10_bad_content_parts(client, part, param):
    body = chat_body([{"type": "text", "text": "hi"}, part])
    assert_error(post(client, body), 400, param=param)
    keeps_serving(client)


@pytest.mark.parametrize("role", ["tool", "function"])
def test_tool_roles_are_unsupported(client, role):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "x"},
                                          {"role": "user", "content": "hi"}]}
    assert_error(post(client, body), 400, code="unsupported_parameter", param="messages[1].role")
    keeps_serving(client)


def test_message_order_rules(client):
    late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "user", "content": "b"}]
    assert_error(post(client, {"model": MODEL, "messages": late_system}), 400, param="messages[1].role")
    prefill = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    err = assert_error(post(client, {"model": MODEL, "messages": prefill}), 400, param="messages[1].role")
    assert "prefill" in err["message"]
    for empty in (None, "", [], [{"type": "text", "text": ""}]):  # an empty turn cannot be rendered
        bad = [{"role": "user", "content": "a"}, {"role": "assistant", "content": empty},
               {"role": "user", "content": "b"}]
        assert_error(post(client, {"model": MODEL, "messages": bad}), 400, param="messages[1].content")
    ok = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "a"},
          {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert post(client, {"model": MODEL, "messages": ok, "max_tokens": 2}).status_code == 200
    empty_system = [{"role": "system", "content": ""}, {"role": "user", "content": "a"}]
    assert post(client, {"model": MODEL, "messages": empty_system, "max_tokens": 2}).status_code == 200
    keeps_serving(client)


# ---------------------------------------------------------------------------------------------- B. parameters
@pytest.mark.parametrize("raw", ["0", "-1", '"ten"', "2.5", "true"])
def test_11_bad_max_tokens(client, raw):
    body = '{"model": "internvl-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}' % raw
    assert_error(post(client, body.encode()), 400, code="invalid_request", param="max_tokens")
    body = body.replace('"max_tokens"', '"max_completion_tokens"')
    assert_error(post(client, body.encode()), 400, code="invalid_request", param="max_completion_tokens")
    keeps_serving(client)


def test_11_max_tokens_1e9_exceeds_the_context(client):
    body = b'{"model": "internvl-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e9}'
    err = assert_error(post(client, body), 400, code="context_length_exceeded", param="max_tokens")
    assert "maximum context length is 4096 tokens" in err["message"]
    assert "1000000000 in the completion" in err["message"]
    keeps_serving(client)


@pytest.mark.parametrize("stream", [False, True])
def test_12_text_plus_image_plus_max_tokens_over_the_context(client, stream):
    content = image_content("Describe.", url=png_data_url(448, 224), max_dynamic_patch=6)
    ok = client.post("/v1/chat/completions", json=chat_body(content, max_tokens=1))
    prompt = ok.json()["usage"]["prompt_tokens"]
    assert prompt > TILE_TOKENS * 3  # a 2:1 image gives 2 tiles + thumbnail
    r = post(client, chat_body(content, max_tokens=4096 - prompt + 1, stream=stream))
    err = assert_error(r, 400, code="context_length_exceeded", param="max_tokens")
    assert r.headers["content-type"].startswith("application/json")  # no stream was started
    assert err["message"] == (
        f"This model's maximum context length is 4096 tokens. However, you requested 4097 tokens ({prompt} in the "
        f"messages, {4096 - prompt + 1} in the completion). Please reduce the length of the messages or completion.")
    keeps_serving(client, image=True)


def test_13_a_text_that_alone_exceeds_the_context_is_refused_without_tokenizing(client):
    import time

    text = "hello world " * 400_000  # 4.8 MB: tokenizing it would take many seconds on a shared CPU
    t = time.monotonic()
    err = assert_error(post(client, chat_body(text)), 400, code="context_length_exceeded", param="messages")
    assert time.monotonic() - t < 5
    assert "maximum context length is 4096 tokens" in err["message"]
    mid = "hello world " * 700  # over the context but under the cheap bound: tokenized, exact counts
    err = assert_error(post(client, chat_body(mid, max_tokens=None)), 400, code="context_length_exceeded",
                       param="messages")
    assert "at least" not in err["message"]
    keeps_serving(client)


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", 5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
    ("top_k", 1.5), ("min_p", 2), ("presence_penalty", 9), ("frequency_penalty", -3), ("repetition_penalty", 0),
    ("seed", "x"), ("seed", 1.5), ("logprobs", "yes"), ("top_logprobs", 21), ("stream", "yes"), ("min_tokens", -1),
])
def test_14_out_of_range_sampling_parameters(client, field, value):
    assert_error(post(client, {**chat_body(), field: value}), 400, code="invalid_request", param=field)
    keeps_serving(client)


def test_14_dependent_parameters(client):
    assert_error(post(client, {**chat_body(), "top_logprobs": 2}), 400, param="top_logprobs")
    assert_error(post(client, {**chat_body(), "stream_options": {"include_usage": True}}), 400,
                 param="stream_options")
    keeps_serving(client)


def test_14_accepted_extremes_and_extensions(client):
    for extra in ({"temperature": 0}, {"temperature": 2, "top_p": 1, "seed": 7}, {"top_k": -1}, {"top_k": 0},
                  {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3, "presence_penalty": -2,
                   "frequency_penalty": 2, "seed": 1}, {"temperature": None, "top_p": None, "n": None}):
        r = post(client, {**chat_body(), **extra})
        assert r.status_code == 200, (extra, r.text)
    keeps_serving(client)


@pytest.mark.parametrize("n", [0, 1000, -1, "2"])
def test_15_n_out_of_range(client, n):
    assert_error(post(client, {**chat_body(), "n": n}), 400, param="n")
    keeps_serving(client)


@pytest.mark.parametrize("stop, param", [(["a", "b", "c", "d", "e"], "stop"), ([""], "stop[0]"), ([5], "stop[0]"),
                                         ("", "stop"), (["x" * 257], "stop[0]"), ({"a": 1}, "stop")])
def test_16_bad_stop(client, stop, param):
    assert_error(post(client, {**chat_body(), "stop": stop}), 400, param=param)
    keeps_serving(client)


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.type"),
    ({"logit_bias": {"50": 10}}, "logit_bias"),
])
def test_17_unsupported_parameters(client, extra, param):
    assert_error(post(client, {**chat_body(), **extra}), 400, code="unsupported_parameter", param=param)
    keeps_serving(client)


def test_17_text_response_format_and_empty_tools_are_fine(client):
    r = post(client, {**chat_body(), "response_format": {"type": "text"}, "tools": [], "tool_choice": "none"})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- C. images
def test_18_too_many_images(client):
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}} for _ in range(6)]
    err = assert_error(post(client, chat_body(content + [{"type": "text", "text": "x"}])), 400,
                       code="too_many_images", param="messages")
    assert err["message"] == "Too many images: 6 given, the limit is 4 per request."
    keeps_serving(client, image=True)


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,iVBO!!!!", "invalid_image"),  # characters outside the alphabet
    ("data:image/png;base64,", "invalid_image"),  # empty payload
    ("data:image/png;base64," + "PGh0bWw+PC9odG1sPg==", "invalid_image"),  # valid base64 of HTML
    ("ftp://example.com/x.png", "invalid_image_url"),
    ("/etc/passwd", "invalid_image_url"),  # bare paths are never accepted by the server
])
def test_19_to_21_media_errors_are_mapped_to_400_with_the_url_param(client, url, code):
    # the media layer decides (tests/serve/test_media*.py); here: its errors become the right envelope
    err = assert_error(post(client, chat_body(image_content(url=url))), 400, code=code,
                       param="messages[0].content[0].image_url.url")
    assert "Traceback" not in err["message"]
    keeps_serving(client, image=True)


@pytest.mark.parametrize("role", ["system", "assistant"])
def test_24_images_outside_user_messages(client, role):
    messages = [{"role": role, "content": image_content()}, {"role": "user", "content": "hi"}]
    if role == "assistant":
        messages.insert(0, {"role": "user", "content": "hi"})
    err = assert_error(post(client, {"model": MODEL, "messages": messages}), 400)
    assert err["param"].endswith(".content[0]") and role in err["message"]
    keeps_serving(client, image=True)


def test_25_bare_string_image_url_and_detail(tiled_client):
    client = tiled_client
    wide = png_data_url(448, 224)  # 2 tiles + thumbnail under the checkpoint's 6-tile limit
    usage = {}
    for name, part in [("bare", {"type": "image_url", "image_url": wide}),
                       ("auto", {"type": "image_url", "image_url": {"url": wide, "detail": "auto"}}),
                       ("high", {"type": "image_url", "image_url": {"url": wide, "detail": "high"}}),
                       ("low", {"type": "image_url", "image_url": {"url": wide, "detail": "low"}})]:
        r = post(client, chat_body([part, {"type": "text", "text": "Describe."}], max_tokens=1))
        assert r.status_code == 200, r.text
        usage[name] = r.json()["usage"]["prompt_tokens"]
    assert usage["bare"] == usage["auto"] == usage["high"]
    assert usage["auto"] - usage["low"] == 2 * TILE_TOKENS  # 3 tiles -> 1 tile
    bad = {"type": "image_url", "image_url": {"url": wide, "detail": "ultra"}}
    assert_error(post(client, chat_body([bad])), 400, param="messages[0].content[0].image_url.detail")
    keeps_serving(client, image=True)


@pytest.mark.parametrize("value", [0, 100, "x", 2.5, True])
def test_26_bad_max_dynamic_patch(client, value):
    part = {"type": "image_url", "image_url": {"url": png_data_url(), "max_dynamic_patch": value}}
    assert_error(post(client, chat_body([part])), 400, param="messages[0].content[0].image_url.max_dynamic_patch")
    keeps_serving(client, image=True)


def test_26_max_dynamic_patch_and_max_image_tokens_bound_the_tiles(tiled_client):
    client = tiled_client
    wide = png_data_url(896, 224)  # 4x1 grid + thumbnail = 5 tiles under the checkpoint's 6-tile limit
    def tokens(**kw):
        extra = {k: v for k, v in kw.items() if k != "image"}
        r = post(client, {**chat_body(image_content("x", url=wide, **kw.get("image", {})), max_tokens=1), **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    default, two = tokens(), tokens(image={"max_dynamic_patch": 2})
    assert default - two == (5 - 3) * TILE_TOKENS  # max 2 tiles: a 2x1 grid + thumbnail
    three = 3 * TILE_TOKENS + 2  # 3 tiles of image tokens + <img> and </img>
    assert tokens(max_image_tokens=three) == two  # fit exactly
    assert tokens(max_image_tokens=three - 1) == tokens(image={"max_dynamic_patch": 1})  # then only 1 tile fits
    assert_error(post(client, {**chat_body(image_content(url=wide)), "max_image_tokens": 10}), 400,
                 param="max_image_tokens")
    keeps_serving(client, image=True)


# ---------------------------------------------------------------------------------------------- completions route
def test_completions_validation(client):
    base = {"model": MODEL, "prompt": "The cat", "max_tokens": 2}
    assert client.post("/v1/completions", json=base).status_code == 200
    unsupported = "unsupported_parameter"
    for extra, param, code in [({"prompt": ""}, "prompt", None), ({"prompt": None}, "prompt", None),
                               ({"prompt": [1, "a"]}, "prompt", None), ({"suffix": "x"}, "suffix", unsupported),
                               ({"best_of": 3}, "best_of", unsupported), ({"logprobs": 50}, "logprobs", None),
                               ({"prompt": [10**9]}, "prompt", None), ({"model": "other"}, "model", "model_not_found")]:
        r = client.post("/v1/completions", json={**base, **extra})
        assert_error(r, 404 if code == "model_not_found" else 400,
                     "not_found_error" if code == "model_not_found" else "invalid_request_error", code, param)
    keeps_serving(client)
