"""Prompt forms -> turns -> prompt text, against hand-written prompts of the spec (INTERNVL.md §7, §8.1, §8.2;
SERVING.md §3.2)."""

import pytest
from PIL import Image

from internvl.pipeline.messages import IMAGE_TOKEN, ImageRef, is_single, parse_messages, render_prompt, to_messages

S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYS = f"<|im_start|>system\n{S3}<|im_end|>\n"


def block(tiles, n=4):
    return "<img>" + "<IMG_CONTEXT>" * (tiles * n) + "</img>"


def user(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n"


def prompt_of(prompt, tiles):
    system, turns = parse_messages(to_messages(prompt))
    return render_prompt("internvl2_5", system, turns, tiles, 4)


def test_lmdeploy_constant():
    assert IMAGE_TOKEN == "<IMAGE_TOKEN>"


def test_one_image_is_prefixed_as_chat_does():
    img = Image.new("RGB", (8, 8))
    expected = SYS + user(f"{block(3)}\ndescribe") + "<|im_start|>assistant\n"
    assert prompt_of(("describe", img), [3]) == expected
    assert prompt_of((img, "describe"), [3]) == expected  # LMDeploy also accepts (image, text)
    assert prompt_of(("describe", "photo.jpg"), [3]) == expected  # a path string is recognised as the image


def test_numbered_images_with_image_token_and_by_default_are_the_model_card_separate_form():
    imgs = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    expected = SYS + user(f"Image-1: {block(2)}\nImage-2: {block(1)}\nWhat differs?") + "<|im_start|>assistant\n"
    assert prompt_of((f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\nWhat differs?", imgs), [2, 1]) == expected
    assert prompt_of(("What differs?", imgs), [2, 1]) == expected  # no placeholder: numbered lines prepended
    assert prompt_of(("Image-1: <image>\nImage-2: <image>\nWhat differs?", imgs), [2, 1]) == expected


def test_placeholders_put_images_where_they_stand():
    imgs = [Image.new("RGB", (8, 8))] * 2
    got = prompt_of((f"Compare {IMAGE_TOKEN} with {IMAGE_TOKEN}.", imgs), [1, 2])
    assert got == SYS + user(f"Compare {block(1)} with {block(2)}.") + "<|im_start|>assistant\n"


def test_message_list_with_system_history_and_numbering_across_the_conversation():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "text", "text": "Short."},
                                     {"type": "image_url", "image_url": "b.png"},
                                     {"type": "image_url", "image_url": {"url": "c.png"}}]},
    ]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n" + user(f"{block(1)}\nWhat is it?")
                + "<|im_start|>assistant\nA cat.<|im_end|>\n"
                + user(f"Image-2: {block(2)}\nImage-3: {block(1)}\nAnd these?\nShort.") + "<|im_start|>assistant\n")
    assert prompt_of(msgs, [1, 2, 1]) == expected
    system, turns = parse_messages(msgs)
    assert system == "Be brief."
    assert [r.source for t in turns for r in t.images] == ["a.png", "b.png", "c.png"]


def test_session_numbering_continues_from_earlier_turns():
    _, turns = parse_messages(to_messages(("q", ["x.png", "y.png"])), first_image_number=3)
    assert turns[0].text == "Image-3: <image>\nImage-4: <image>\nq"


def test_per_image_tile_limits():
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "a.png", "max_dynamic_patch": 2}},
        {"type": "image_url", "image_url": {"url": "b.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "c.png", "detail": "high"}},
        {"type": "text", "text": "q"}]}]
    _, turns = parse_messages(msgs)
    assert turns[0].images == (ImageRef("a.png", 2), ImageRef("b.png", 1), ImageRef("c.png", None))


def test_single_or_batch():
    assert is_single("hi") and is_single(("hi", "a.png")) and is_single([{"role": "user", "content": "hi"}])
    assert not is_single(["hi", "there"]) and not is_single([("hi", "a.png")])
    assert not is_single([[{"role": "user", "content": "hi"}]])


@pytest.mark.parametrize("prompt, message", [
    (("two", "placeholders <image> <image>", "x"), "must be (text, image or [images])"),
    (("q <IMAGE_TOKEN> <IMAGE_TOKEN>", ["a.png"]), "2 image placeholder(s)"),
    (("hello", "world"), "exactly one string text"),
    ((Image.new("RGB", (2, 2)), Image.new("RGB", (2, 2))), "needs a text string"),
    (("q", None), "needs a 'url'"),
    (42, "expected a string, a (text, image or [images]) tuple"),
    ([{"role": "assistant", "content": "hi"}], "the last message must be a user message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "only accepted as the first message"),
    ([{"role": "tool", "content": "a"}], "role must be one of"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]},
      {"role": "user", "content": "q"}], "only accepted in user messages"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "type 'text' or 'image_url'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
    ([{"role": "user", "content": 3}], "content must be a string or a list"),
    ([{"role": "user", "content": ""}], "needs text or an image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png", "max_dynamic_patch": 0}}]}],
     "max_dynamic_patch=0"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png", "detail": "medium"}}]}],
     "detail='medium'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png", "size": 3}}]}],
     "unknown field(s) ['size']"),
])
def test_bad_prompts_say_what_is_wrong(prompt, message):
    with pytest.raises(ValueError) as e:
        parse_messages(to_messages(prompt))
    assert message in str(e.value)


def test_a_system_message_with_a_placeholder_is_refused():
    _, turns = parse_messages(to_messages("hi"))
    with pytest.raises(ValueError, match="must not contain <image>"):
        render_prompt("internvl2_5", "see <image>", turns, [], 4)
