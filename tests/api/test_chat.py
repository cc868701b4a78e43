"""chat()/batch_chat(): prompt ids, decoding, history, streaming and batching (INTERNVL.md §8)."""

import threading

import pytest
import torch

from internvl.generation import generate as generate_mod

S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def img_block(tiles, n=4):
    return "<img>" + "<IMG_CONTEXT>" * (tiles * n) + "</img>"


def capture_prompt(monkeypatch, reply_ids):
    seen = {}

    def fake_generate(model, input_ids, attention_mask=None, pixel_values=None, visual_features=None, config=None,
                      streamer=None):
        seen["ids"] = input_ids
        seen["config"] = config
        return torch.tensor([reply_ids] * input_ids.shape[0])

    monkeypatch.setattr("internvl.api.chat.generate", fake_generate)
    return seen


def test_chat_builds_the_reference_prompt_and_cuts_the_answer(model, tok, monkeypatch):
    answer = tok.encode("a red circle", add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    seen = capture_prompt(monkeypatch, answer + [im_end] + tok.encode(" junk", add_special_tokens=False))
    gen = dict(max_new_tokens=5, do_sample=False)
    px = torch.zeros(2, 3, 56, 56)
    response, history = model.chat(tok, px, "What is it?", gen, return_history=True)
    expected = (f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\n{img_block(2)}\nWhat is it?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert seen["ids"][0].tolist() == tok(expected)["input_ids"]
    assert response == "a red circle"
    assert history == [("<image>\nWhat is it?", "a red circle")]
    assert gen["eos_token_id"] == im_end  # the reference writes eos into the caller's dict
    assert seen["config"].eos_token_id == (im_end,)


def test_second_turn_keeps_the_image_in_the_first_question(model, tok, monkeypatch):
    seen = capture_prompt(monkeypatch, tok.encode("ok", add_special_tokens=False))
    history = [("<image>\nWhat is it?", "a circle")]
    model.chat(tok, torch.zeros(1, 3, 56, 56), "And its color?", dict(max_new_tokens=2), history=history)
    expected = (f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\n{img_block(1)}\nWhat is it?<|im_end|>\n"
                "<|im_start|>assistant\na circle<|im_end|>\n<|im_start|>user\nAnd its color?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert seen["ids"][0].tolist() == tok(expected)["input_ids"]


def test_grounding_tags_survive_decoding(model, tok, monkeypatch):
    reply = tok.encode("<ref>the cat</ref><box>[[1, 2, 3, 4]]</box>", add_special_tokens=False)
    capture_prompt(monkeypatch, reply + [tok.convert_tokens_to_ids("<|im_end|>")])
    out = model.chat(tok, None, "where?", dict(max_new_tokens=30))
    assert out == "<ref>the cat</ref><box>[[1, 2, 3, 4]]</box>"


def test_patch_count_mismatch_and_missing_placeholder_raise(model, tok):
    px = torch.zeros(3, 3, 56, 56)
    with pytest.raises(ValueError, match="sums to 2 tiles but pixel_values has 3"):
        model.chat(tok, px, "q", dict(max_new_tokens=1), num_patches_list=[1, 1])
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        model.chat(tok, px, "<image> only one", dict(max_new_tokens=1), num_patches_list=[1, 2])


def test_chat_end_to_end_equals_plain_generate(model, tok):
    px = torch.randn(1, 3, 56, 56)
    out = model.chat(tok, px, "hello", dict(max_new_tokens=8, do_sample=False))
    ids = tok(f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\n{img_block(1)}\nhello<|im_end|>\n"
              "<|im_start|>assistant\n", return_tensors="pt")["input_ids"]
    model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    ref = model.generate(px, ids, max_new_tokens=8, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    from internvl.tokenizer import decode_keep_grounding
    assert out == decode_keep_grounding(tok, ref[0]).strip()


def test_streaming_with_transformers_text_iterator_streamer(model, tok):
    from transformers import TextIteratorStreamer

    px = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))  # the same case in any test order
    full = model.chat(tok, px, "hello", dict(max_new_tokens=10, do_sample=False))
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=30)
    gen = dict(max_new_tokens=10, do_sample=False, streamer=streamer)
    t = threading.Thread(target=model.chat, kwargs=dict(tokenizer=tok, pixel_values=px, question="hello",
                                                        history=None, return_history=False, generation_config=gen))
    t.start()
    text = ""
    for piece in streamer:
        if piece == model.conv_template.sep:
            break
        text += piece
    t.join()
    assert text.strip() == full


def test_batch_chat_equals_single_chats(model, tok):
    px = torch.randn(3, 3, 56, 56)
    gen = dict(max_new_tokens=6, do_sample=False)
    qs = ["describe", "what color is the big one?"]
    batch = model.batch_chat(tok, px, qs, gen, num_patches_list=[1, 2])
    singles = [model.chat(tok, px[:1], qs[0], dict(gen)), model.chat(tok, px[1:], qs[1], dict(gen))]
    assert batch == singles
    assert tok.padding_side == "right"  # restored


def test_text_only_chat_and_system_message_override(model, tok, monkeypatch):
    seen = capture_prompt(monkeypatch, tok.encode("hi", add_special_tokens=False))
    model.system_message = "Be brief."
    try:
        model.chat(tok, None, "hello", dict(max_new_tokens=2))
    finally:
        model.system_message = None
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert seen["ids"][0].tolist() == tok(expected)["input_ids"]
