"""The official `openai` Python client against a real uvicorn on 127.0.0.1: sync and async, streaming and not, text
and images, the SDK's exception classes for our error statuses, and no retries of client mistakes."""

import asyncio
import base64
import re
from pathlib import Path

import httpx
import openai
import pytest

from serve.app_fixtures import MODEL, live_server, png_data_url, tile_geometry

KEY = "sk-test-Key"
SCENE = Path(__file__).resolve().parents[2] / "examples" / "media" / "scene1.png"


@pytest.fixture(scope="module")
def server():
    with live_server(api_keys=(KEY,)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=2) as c:
        yield c


def scene_url() -> str:
    return "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()


def requests_with_status(server, status: int) -> float:
    text = httpx.get(server.base + "/metrics").text
    m = re.search(rf'^internvl_requests_total{{status="{status}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_sync_chat_with_an_image_non_streamed(client):
    r = client.chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": scene_url()}},
                                               {"type": "text", "text": "What color is the triangle?"}]}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > tile_geometry()[1]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_35_sync_stream_with_usage_is_consumed_by_the_sdk(client):
    stream = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "What is 2+3?"}])
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    same = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "What is 2+3?"}])
    assert text == same.choices[0].message.content  # greedy: streamed and non-streamed agree


def test_async_client_streaming_and_not(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY) as c:
            msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe the image."},
                                                 {"type": "image_url", "image_url": {"url": png_data_url()}}]}]
            one = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
            many = [c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
                    for _ in range(3)]
            results = await asyncio.gather(one, *many)  # concurrent requests batch in the engine
            stream = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                     stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
            completion = await c.completions.create(model=MODEL, prompt="The cat", max_tokens=4, temperature=0)
            return results, text, completion

    results, text, completion = asyncio.run(run())
    assert len({r.choices[0].message.content for r in results}) == 1  # greedy, whatever the batching
    assert text == results[0].choices[0].message.content
    assert completion.object == "text_completion" and completion.usage.completion_tokens >= 1


def test_sdk_exception_classes_and_no_retries_of_client_mistakes(server, client):
    before = requests_with_status(server, 400)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and e.value.code == "invalid_request" and e.value.param == "max_tokens"
    assert requests_with_status(server, 400) == before + 1  # the SDK (max_retries=2) did not resend it
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=10**9, messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "context_length_exceeded" and "maximum context length" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.code == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    with openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as e:  # errors are raised before a stream starts
        client.chat.completions.create(model=MODEL, stream=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}])
    assert e.value.code == "invalid_image" and e.value.param == "messages[0].content[0].image_url.url"
    assert httpx.get(server.base + "/health").status_code == 200
    assert client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])


def test_n_seed_and_stop_through_the_sdk(client):
    r = client.chat.completions.create(model=MODEL, n=2, seed=123, temperature=1.0, max_tokens=10,
                                       messages=[{"role": "user", "content": "Tell me about shapes."}])
    again = client.chat.completions.create(model=MODEL, n=2, seed=123, temperature=1.0, max_tokens=10,
                                           messages=[{"role": "user", "content": "Tell me about shapes."}])
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeded
    stopped = client.chat.completions.create(model=MODEL, max_tokens=30, temperature=0, stop=["."],
                                             messages=[{"role": "user", "content": "What is 2+3?"}])
    assert "." not in stopped.choices[0].message.content
