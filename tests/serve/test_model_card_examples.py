"""The OpenAI-client examples of the seeds' model cards, with the official `openai` client against a real uvicorn on
127.0.0.1 serving the shipped demo model.

The InternVL2, InternVL2.5 and InternVL3 cards' "Service" sections start `lmdeploy serve api_server MODEL
--server-port 23333` and call it with `OpenAI(api_key='YOUR_API_KEY', base_url=.../v1)`: the model id comes from
`client.models.list().data[0].id` (earlier InternVL2 cards start the server with `--model-name InternVL2-8B` and pass
that name), and one `chat.completions.create` sends a user message of a text part 'describe this image' and an
`image_url` part, with temperature=0.8 and top_p=0.8. That code runs here as the cards write it; only the internet
image URL is replaced by a local image, as a file:// URL below the server's allowed local media path or as a data:
URL. The same client then runs the cards' other scenarios through the API: two images in one question (the cards'
"separate images" numbering), a multi-turn follow-up, streaming, several requests at once, and AsyncOpenAI
streaming and not.

Every prompt's token count is checked against the prompt that the spec renders for that conversation (INTERNVL.md
§7.4, SERVING.md §3.2), tokenized with the demo tokenizer: the server built the cards' prompt, not just some prompt.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from internvl.serve.media_policy import MediaPolicy
from serve.app_fixtures import MODEL, demo, live_server, tile_geometry

MEDIA = Path(__file__).resolve().parents[2] / "examples" / "media"
CARD_QUESTION = "describe this image"
S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
# The demo model's tile limit is 1: every image is one tile (no thumbnail for a single tile) of TILE_TOKENS image
# tokens ((image_size / 14)^2 patches, pixel-shuffled by 0.5 in each direction).
TILE_TOKENS = tile_geometry()[1]
IMG = "<img>" + "<IMG_CONTEXT>" * TILE_TOKENS + "</img>"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """The server's allowed local media path: a PNG as shipped, a JPEG (the cards' tiger.jpeg is a JPEG) and a
    448 x 224 PNG of both scenes side by side."""
    root = tmp_path_factory.mktemp("card-media")
    shutil.copy(MEDIA / "scene1.png", root / "scene1.png")
    Image.open(MEDIA / "scene2.png").convert("RGB").save(root / "scene2.jpeg", quality=90)
    wide = Image.new("RGB", (448, 224))
    wide.paste(Image.open(MEDIA / "scene1.png").convert("RGB"), (0, 0))
    wide.paste(Image.open(MEDIA / "scene2.png").convert("RGB"), (224, 0))
    wide.save(root / "wide.png")
    return root


@pytest.fixture(scope="module")
def server(media_dir):
    with live_server(media=MediaPolicy(allowed_local_media_path=media_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with OpenAI(api_key="YOUR_API_KEY", base_url=server.base + "/v1") as c:  # no key configured: any key passes
        yield c


def file_url(media_dir: Path, name: str) -> str:
    return (media_dir / name).as_uri()


def data_url(media_dir: Path, name: str) -> str:
    mime = "image/jpeg" if name.endswith(".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode((media_dir / name).read_bytes()).decode()


def card_messages(image_url: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": CARD_QUESTION},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


# ---------------------------------------------------------------------------------------------- expected prompts
def spec_prompt(turns: list[tuple[str, str | None]]) -> str:
    """internvl2_5 rendering (INTERNVL.md §7.1-7.4): (user text, assistant answer or None for the open turn)."""
    out = f"<|im_start|>system\n{S3}<|im_end|>\n"
    for question, answer in turns:
        out += f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        if answer is not None:
            out += f"{answer}<|im_end|>\n"
    return out


def tokens(text: str) -> int:
    return len(demo()[1].encode(text))


def assert_answer(response) -> str:
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    return choice.message.content


def streamed_text(chunks) -> tuple[str, object]:
    """(text, usage) of a streamed chat completion consumed by the SDK; checks the finish and usage chunks."""
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = chunks[-1].usage if chunks and not chunks[-1].choices else None
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), usage


# ---------------------------------------------------------------------------------------------- the cards' example
@pytest.mark.parametrize("image", ["file:scene1.png", "file:scene2.jpeg", "data:scene1.png", "data:scene2.jpeg"])
def test_card_example_as_written(client, media_dir, image):
    kind, name = image.split(":")
    image_url = file_url(media_dir, name) if kind == "file" else data_url(media_dir, name)
    model_name = client.models.list().data[0].id
    assert model_name == MODEL
    response = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": [{"type": "text", "text": "describe this image"},
                                               {"type": "image_url", "image_url": {"url": image_url}}]}],
        temperature=0.8,
        top_p=0.8)
    assert response.id in str(response)  # the cards print the response
    assert_answer(response)
    assert response.usage.prompt_tokens == tokens(spec_prompt([(f"{IMG}\n{CARD_QUESTION}", None)]))


def test_card_example_with_a_served_model_name(media_dir):
    """Earlier InternVL2 cards: `api_server ... --model-name InternVL2-8B` and `model="InternVL2-8B"`."""
    with live_server(model_name="InternVL2-8B", media=MediaPolicy(allowed_local_media_path=media_dir)) as s:
        with OpenAI(api_key="YOUR_API_KEY", base_url=s.base + "/v1") as client:
            assert client.models.list().data[0].id == "InternVL2-8B"
            response = client.chat.completions.create(
                model="InternVL2-8B", messages=card_messages(file_url(media_dir, "scene1.png")),
                temperature=0.8, top_p=0.8)
            assert response.model == "InternVL2-8B" and response.choices[0].message.content.strip()
            with pytest.raises(openai.NotFoundError):  # the model name is the served one, not the checkpoint's
                client.chat.completions.create(model=MODEL, messages=card_messages(file_url(media_dir, "scene1.png")))


def test_card_example_streamed(client, media_dir):
    stream = client.chat.completions.create(model=client.models.list().data[0].id,
                                            messages=card_messages(file_url(media_dir, "scene2.jpeg")),
                                            temperature=0.8, top_p=0.8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text, usage = streamed_text(chunks)
    assert text.strip()
    assert usage.prompt_tokens == tokens(spec_prompt([(f"{IMG}\n{CARD_QUESTION}", None)]))
    assert usage.completion_tokens >= 1


def test_sync_async_streamed_and_not_give_the_same_seeded_answer(server, client, media_dir):
    """The card's request with a seed: the four ways of sending it are the same generation."""
    kwargs = dict(model=MODEL, messages=card_messages(file_url(media_dir, "scene1.png")), temperature=0.8,
                  top_p=0.8, seed=20240, max_tokens=24)
    sync_text = client.chat.completions.create(**kwargs).choices[0].message.content
    sync_streamed, _ = streamed_text(list(client.chat.completions.create(**kwargs, stream=True)))

    async def run():
        async with AsyncOpenAI(api_key="YOUR_API_KEY", base_url=server.base + "/v1") as c:
            text = (await c.chat.completions.create(**kwargs)).choices[0].message.content
            stream = await c.chat.completions.create(**kwargs, stream=True)
            return text, streamed_text([chunk async for chunk in stream])[0]

    async_text, async_streamed = asyncio.run(run())
    assert sync_text.strip()
    assert sync_streamed == async_text == async_streamed == sync_text


def test_async_client_many_card_requests_at_once_streaming_and_not(server, media_dir):
    """The cards' batch use (several prompts at once) through AsyncOpenAI: 3 plain and 3 streamed requests together."""
    urls = [file_url(media_dir, "scene1.png"), data_url(media_dir, "scene2.jpeg"), file_url(media_dir, "scene2.jpeg")]
    expected = tokens(spec_prompt([(f"{IMG}\n{CARD_QUESTION}", None)]))

    async def run():
        async with AsyncOpenAI(api_key="YOUR_API_KEY", base_url=server.base + "/v1") as c:
            model_name = (await c.models.list()).data[0].id

            async def plain(url):
                return await c.chat.completions.create(model=model_name, messages=card_messages(url),
                                                       temperature=0.8, top_p=0.8)

            async def streamed(url):
                stream = await c.chat.completions.create(model=model_name, messages=card_messages(url),
                                                         temperature=0.8, top_p=0.8, stream=True,
                                                         stream_options={"include_usage": True})
                return [chunk async for chunk in stream]

            return await asyncio.gather(*(plain(u) for u in urls), *(streamed(u) for u in urls))

    results = asyncio.run(run())
    for response in results[:3]:
        assert_answer(response)
        assert response.usage.prompt_tokens == expected
    for chunks in results[3:]:
        text, usage = streamed_text(chunks)
        assert text.strip() and usage.prompt_tokens == expected


# ---------------------------------------------------------------------------------------------- other card scenarios
def test_two_images_in_one_question(client, media_dir):
    """The cards' multi-image question with separate images (Image-1 / Image-2), as two image_url parts."""
    question = "Describe the two images in detail."
    content = [{"type": "image_url", "image_url": {"url": file_url(media_dir, "scene1.png")}},
               {"type": "image_url", "image_url": {"url": data_url(media_dir, "scene2.jpeg")}},
               {"type": "text", "text": question}]
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              temperature=0.8, top_p=0.8)
    assert_answer(response)
    expected = spec_prompt([(f"Image-1: {IMG}\nImage-2: {IMG}\n{question}", None)])
    assert response.usage.prompt_tokens == tokens(expected)

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                            temperature=0.8, top_p=0.8, stream=True,
                                            stream_options={"include_usage": True})
    text, usage = streamed_text(list(stream))
    assert text.strip() and usage.prompt_tokens == tokens(expected)


def test_multi_turn_follow_up(client, media_dir):
    """The cards' multi-turn chat (a question on the image, then a follow-up), with the history sent back."""
    first = card_messages(file_url(media_dir, "scene1.png"))
    answer = assert_answer(client.chat.completions.create(model=MODEL, messages=first, temperature=0.8, top_p=0.8))
    follow_up = "What is the woman doing?"
    history = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
    response = client.chat.completions.create(model=MODEL, messages=history, temperature=0.8, top_p=0.8)
    assert_answer(response)
    expected = spec_prompt([(f"{IMG}\n{CARD_QUESTION}", answer), (follow_up, None)])
    assert response.usage.prompt_tokens == tokens(expected)


def test_image_first_and_lmdeploys_per_image_tile_limit(client, media_dir):
    """Image-then-text content renders the same prompt; LMDeploy's per-image `max_dynamic_patch` is honoured. The
    448 x 224 image is one tile under the demo checkpoint's limit (1), and a 2 x 1 grid plus the thumbnail (3 tiles)
    with max_dynamic_patch=6 or 2."""
    wide = file_url(media_dir, "wide.png")
    for extra, tiles in (({}, 1), ({"max_dynamic_patch": 6}, 3), ({"max_dynamic_patch": 2}, 3)):
        content = [{"type": "image_url", "image_url": {"url": wide, **extra}}, {"type": "text", "text": CARD_QUESTION}]
        response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                  temperature=0.8, top_p=0.8)
        assert_answer(response)
        image = "<img>" + "<IMG_CONTEXT>" * (TILE_TOKENS * tiles) + "</img>"
        assert response.usage.prompt_tokens == tokens(spec_prompt([(f"{image}\n{CARD_QUESTION}", None)]))
