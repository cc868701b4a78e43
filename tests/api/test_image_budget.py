"""`max_image_tokens`: chat/batch_chat and `internvl chat` pick tile counts that fit the budget and the context.

Tiny model: 56-pixel tiles of 4 tokens each, max_dynamic_patch 12, thumbnail on, context 512 tokens.
"""

import dataclasses

import pytest
import torch
from PIL import Image

from helpers_tokenizers import make_bpe_tokenizer_dir
from internvl import InternVLChatModel, load_tokenizer
from internvl.checkpoint.saver import save_pretrained
from internvl.cli import main
from internvl.preprocessing.image import load_image
from tiny import randomize_, tiny_config

WIDE = Image.new("RGB", (560, 56), (200, 30, 30))  # aspect 10: tiles as (m, 1) for any limit m <= 10
TALL = Image.new("RGB", (56, 336), (30, 200, 30))  # aspect 1/6


def capture(monkeypatch, tok):
    seen = []

    def fake_generate(model, input_ids, attention_mask=None, pixel_values=None, visual_features=None, config=None,
                      streamer=None):
        seen.append((input_ids, pixel_values, config))
        return torch.tensor([tok.encode("ok", add_special_tokens=False)] * input_ids.shape[0])

    monkeypatch.setattr("internvl.api.chat.generate", fake_generate)
    return seen


def image_tokens(tok, ids) -> int:
    return int((ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")).sum())


def test_chat_with_a_budget_equals_chat_with_the_hand_picked_tiling(model, tok):
    # 20 tokens = 5 tiles: a 4x1 grid plus its thumbnail (a 5x1 grid would bring a 6th tile)
    gen = dict(max_new_tokens=6, do_sample=False)
    got = model.chat(tok, WIDE, "what is it?", dict(gen), max_image_tokens=20)
    want = model.chat(tok, load_image(WIDE, input_size=56, max_num=4), "what is it?", dict(gen))
    assert got == want
    assert got != model.chat(tok, WIDE, "what is it?", dict(gen))  # unbudgeted: 10x1 + thumbnail, another answer


def test_prompt_holds_the_expected_image_tokens(model, tok, monkeypatch):
    seen = capture(monkeypatch, tok)
    gen = dict(max_new_tokens=4, max_image_tokens=20)
    model.chat(tok, WIDE, "what?", gen)
    assert gen["max_image_tokens"] == 20 and "eos_token_id" in gen  # the caller's dict keeps its keys
    model.chat(tok, WIDE, "what?", dict(max_new_tokens=4))
    model.chat(tok, [WIDE, TALL], "Image-1: <image>\nImage-2: <image>\nsame?", dict(max_new_tokens=4),
               max_image_tokens=40)  # 2 images: 5 tiles each -> limit 4 -> WIDE 4x1 + thumb, TALL 1x4 + thumb
    model.chat(tok, WIDE, "what?", dict(max_new_tokens=4), max_image_tokens=11)  # 2 tiles worth: 1 tile
    assert [image_tokens(tok, ids) for ids, _, _ in seen] == [20, 44, 40, 4]
    assert [px.shape[0] for _, px, _ in seen] == [5, 11, 10, 1]


def test_the_context_length_bounds_the_images_too(model, tok, monkeypatch):
    seen = capture(monkeypatch, tok)
    model.chat(tok, WIDE, "what?", dict(max_new_tokens=4), max_image_tokens=4)
    text = seen[0][0].shape[1] - 4  # prompt tokens that are not image tokens
    context = model.config.llm.max_position_embeddings
    # leave room for 14 image tokens: 3 tiles (2x1 + thumbnail), whatever the budget says
    model.chat(tok, WIDE, "what?", dict(max_new_tokens=context - text - 14), max_image_tokens=400)
    model.chat(tok, WIDE, "what?", dict(max_new_tokens=context - text - 14))  # no budget: the context alone
    assert [image_tokens(tok, ids) for ids, _, _ in seen[1:]] == [12, 12]
    assert seen[1][0].shape[1] + seen[1][2].max_new_tokens <= context
    with pytest.raises(ValueError, match="context of 512 tokens leaves room for 2 image tokens"):
        model.chat(tok, WIDE, "what?", dict(max_new_tokens=context - text - 2))


def test_tile_tensors_are_checked_against_the_budget(model, tok, monkeypatch):
    seen = capture(monkeypatch, tok)
    px = load_image(WIDE, input_size=56, max_num=4)  # 5 tiles, 20 tokens
    model.chat(tok, px, "what?", dict(max_new_tokens=4), max_image_tokens=20)
    assert image_tokens(tok, seen[0][0]) == 20
    with pytest.raises(ValueError, match="pixel_values has 5 tiles = 20 image tokens, over the limit of 16"):
        model.chat(tok, px, "what?", dict(max_new_tokens=4), max_image_tokens=16)


def test_bad_budgets_raise(model, tok):
    with pytest.raises(ValueError, match="smaller than one tile per image: 2 image\\(s\\) x 4 tokens = 8"):
        model.chat(tok, [WIDE, TALL], "<image> <image> same?", dict(max_new_tokens=2), max_image_tokens=7)
    for bad in (0, -3, "20", 2.5, True):
        with pytest.raises(ValueError, match="max_image_tokens must be an integer >= 1"):
            model.chat(tok, WIDE, "what?", dict(max_new_tokens=2), max_image_tokens=bad)
    with pytest.raises(ValueError, match="num_patches_list is computed"):
        model.chat(tok, WIDE, "what?", dict(max_new_tokens=2), num_patches_list=[3])


def test_batch_chat_fits_each_question_and_equals_single_chats(model, tok, monkeypatch):
    gen = dict(max_new_tokens=5, do_sample=False)
    qs = ["what is it?", "which color?"]
    got = model.batch_chat(tok, [WIDE, TALL], qs, dict(gen), max_image_tokens=12)
    assert got == [model.chat(tok, img, q, dict(gen), max_image_tokens=12) for img, q in zip([WIDE, TALL], qs)]
    seen = capture(monkeypatch, tok)
    model.batch_chat(tok, [WIDE, TALL], qs, dict(gen), max_image_tokens=12)
    ids, px, _ = seen[0]
    assert [image_tokens(tok, row) for row in ids] == [12, 12]  # 2x1 / 1x2 grid + thumbnail each
    with pytest.raises(ValueError, match="got 1 images for 2 questions"):
        model.batch_chat(tok, [WIDE], qs, dict(gen))


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tok = load_tokenizer(make_bpe_tokenizer_dir(d / "tok"))
    cfg = tiny_config()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None)
    save_pretrained(randomize_(InternVLChatModel(cfg), seed=3), d / "model")
    make_bpe_tokenizer_dir(d / "model")
    WIDE.save(d / "wide.png")
    return d / "model", d / "wide.png"


def test_cli_max_image_tokens(ckpt, monkeypatch, capsys):
    model_dir, img = ckpt
    import internvl.api.model as m

    tiles = []
    real = m.InternVLChatModel.chat

    def spy(self, tokenizer, pixel_values, question, generation_config=None, *a, **kw):
        tiles.append(pixel_values.shape[0])
        return real(self, tokenizer, pixel_values, question, generation_config, *a, **kw)

    monkeypatch.setattr(m.InternVLChatModel, "chat", spy)
    assert main(["chat", str(model_dir), "--image", str(img), "--max-new-tokens", "3", "--max-image-tokens", "20",
                 "hi"]) == 0
    assert main(["chat", str(model_dir), "--image", str(img), "--max-new-tokens", "3", "hi"]) == 0
    assert tiles == [5, 11]
    capsys.readouterr()
    assert main(["chat", str(model_dir), "--image", str(img), "--max-image-tokens", "3", "hi"]) == 2
    assert "smaller than one tile per image" in capsys.readouterr().err
