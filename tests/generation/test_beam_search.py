"""Beam search against transformers' `generate(num_beams=N, do_sample=False)` on the same tiny random weights."""

import dataclasses
import functools

import pytest
import torch

from helpers_tokenizers import make_bpe_tokenizer_dir
from internvl import InternVLChatModel, load_tokenizer
from internvl.generation.generate import generate
from internvl.generation.sampling import GenerationConfig
from internvl.model.internvl import InternVLModel
from internvl.tokenizer import decode_keep_grounding
from model.oracle import hf_internvl
from tiny import randomize_, tiny_config

IMG = 120  # tiny_config's <IMG_CONTEXT> id


def prompt(seed: int, length: int = 10, tiles: int = 0, n_img: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (1, length), generator=g)
    block = torch.full((1, tiles * n_img), IMG)
    return torch.cat([ids[:, :3], block, ids[:, 3:]], dim=1)


def pixels(tiles: int, seed: int) -> torch.Tensor:
    return torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def hf_beams(hf, ids, px=None, mask=None, eos=None, **kw) -> list[list[int]]:
    """transformers' beam search; eos=None disables end-of-sequence entirely (the model config's eos too)."""
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    if px is not None:  # transformers' InternVL fails on an explicit pixel_values=None
        kw["pixel_values"] = px
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos[0] if isinstance(eos, list) else eos, **kw)
    return out[:, ids.shape[1]:].tolist()


def ours_beams(model, ids, px=None, mask=None, eos=None, **kw) -> list[list[int]]:
    cfg = GenerationConfig(do_sample=False, eos_token_id=eos or (), **kw)
    return generate(model, ids, mask, pixel_values=px, config=cfg).tolist()


@functools.lru_cache(maxsize=None)
def model_pair(arch: str):
    ours = randomize_(InternVLModel(tiny_config(arch)), seed=11, std=0.3).eval()
    return ours, hf_internvl(ours)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("tiles", [0, 2])
def test_equals_transformers_without_and_with_early_eos(arch, num_beams, tiles):
    ours, hf = model_pair(arch)
    ids = prompt(seed=num_beams + tiles, tiles=tiles)
    px = pixels(tiles, seed=tiles) if tiles else None
    free = ours_beams(ours, ids, px, num_beams=num_beams, max_new_tokens=10)
    assert free == hf_beams(hf, ids, px, num_beams=num_beams, max_new_tokens=10)
    assert len(free[0]) == 10

    # one of the free answer's tokens becomes eos: the first one with which the answer ends early (the search
    # only picks the test case; the comparison with transformers decides)
    for eos in free[0] + list(range(100)):
        got = ours_beams(ours, ids, px, eos=eos, num_beams=num_beams, max_new_tokens=10)
        if len(got[0]) < 10:
            break
    assert got == hf_beams(hf, ids, px, eos=eos, num_beams=num_beams, max_new_tokens=10)
    assert got[0][-1] == eos and len(got[0]) < 10


@pytest.mark.parametrize("opts", [
    dict(length_penalty=0.0),
    dict(length_penalty=2.0),
    dict(early_stopping=True),
    dict(early_stopping="never", length_penalty=1.5),
    dict(repetition_penalty=3.0),
    dict(min_new_tokens=4),
])
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_options_equal_transformers_with_two_eos_ids(opts):
    ours, hf = model_pair("Qwen2ForCausalLM")
    ids, px = prompt(seed=3, tiles=1), pixels(1, seed=3)
    free = ours_beams(ours, ids, px, num_beams=3, max_new_tokens=12)
    eos = [free[0][1], free[0][5]]
    got = ours_beams(ours, ids, px, eos=eos, num_beams=3, max_new_tokens=12, **opts)
    if "repetition_penalty" not in opts:
        assert got == hf_beams(hf, ids, px, eos=eos, num_beams=3, max_new_tokens=12, **opts)
        return
    # transformers penalises the prompt ids too when it is given ids; the reference calls it with embeddings only
    # (the answer's tokens alone are penalised), which is what this compares, over 12 tokens (no eos)
    got = ours_beams(ours, ids, px, num_beams=3, max_new_tokens=12, **opts)
    with torch.no_grad():
        embeds = ours.embed(ids, pixel_values=px)
        hf.generation_config.eos_token_id = None
        want = hf.generate(inputs_embeds=embeds, do_sample=False, num_beams=3, max_new_tokens=12, **opts)
    assert got == want.tolist()
    assert got != free  # the penalty changed the answer


def test_left_padded_batch_equals_transformers():
    ours, hf = model_pair("LlamaForCausalLM")
    a, b = prompt(seed=21, length=12, tiles=1), prompt(seed=22, length=5, tiles=1)
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    px = pixels(2, seed=4)
    free = ours_beams(ours, ids, px, mask, num_beams=3, max_new_tokens=9)

    def cut(row, eos):  # the answer up to and including its first eos
        return row[: row.index(eos) + 1] if eos in row else row

    # an eos with which transformers ends the two rows at different lengths, so the shorter one is padded
    for eos in free[1] + free[0] + list(range(100)):
        got = ours_beams(ours, ids, px, mask, eos=eos, num_beams=3, max_new_tokens=9)
        if len(cut(got[0], eos)) != len(cut(got[1], eos)):
            break
    assert got == hf_beams(hf, ids, px, mask, eos=eos, num_beams=3, max_new_tokens=9)
    assert len(cut(got[0], eos)) != len(cut(got[1], eos))
    singles = [ours_beams(ours, a, px[:1], eos=eos, num_beams=3, max_new_tokens=9)[0],
               ours_beams(ours, b, px[1:], eos=eos, num_beams=3, max_new_tokens=9)[0]]
    assert [cut(r, eos) for r in got] == singles


def test_beam_search_is_not_greedy_here():
    # guards against a beam search that silently degenerates to greedy (which the comparisons above would then
    # only test against a transformers that did the same): on one of these prompts the two differ
    ours, _ = model_pair("Qwen2ForCausalLM")
    for s in range(4):
        ids, px = prompt(seed=s, tiles=1), pixels(1, seed=s)
        if ours_beams(ours, ids, px, num_beams=4, max_new_tokens=10) != ours_beams(ours, ids, px, max_new_tokens=10):
            return
    pytest.fail("beam search (4 beams) equalled greedy on every prompt")


def test_beam_sampling_and_streaming_are_refused():
    with pytest.raises(ValueError, match="beam sampling"):
        GenerationConfig(num_beams=3, do_sample=True)
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1"):
        GenerationConfig(num_beams=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_beams=3, num_return_sequences=2)
    ours = randomize_(InternVLModel(tiny_config()), seed=1).eval()
    with pytest.raises(ValueError, match="streaming is not available with beam search"):
        generate(ours, prompt(1), config=GenerationConfig(num_beams=2), streamer=object())


# ---------------------------------------------------------------------------------------------- chat
@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    tok = load_tokenizer(make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    cfg = tiny_config()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None)
    model = randomize_(InternVLChatModel(cfg), seed=5, std=0.3).eval()
    return model, tok


@pytest.mark.parametrize("engine", [True, False])
def test_chat_with_num_beams_3_equals_transformers(chat_pair, engine):
    model, tok = chat_pair
    px = pixels(2, seed=5)
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=3)
    answer = model.chat(tok, px, "<image>\nwhat is it?", gen, engine=engine)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert gen["eos_token_id"] == im_end
    s3 = model.conv_template.default_system_message
    text = (f"<|im_start|>system\n{s3}<|im_end|>\n<|im_start|>user\n<img>{'<IMG_CONTEXT>' * 8}</img>\nwhat is it?"
            "<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")["input_ids"]
    ref = hf_beams(hf_internvl(model, image_token_id=img), ids, px, eos=im_end, num_beams=3, max_new_tokens=8)[0]
    if im_end in ref:
        ref = ref[: ref.index(im_end)]
    assert answer == decode_keep_grounding(tok, ref).strip()
    assert answer  # a real answer, not an empty string


def test_batch_chat_with_beams_equals_single_chats(chat_pair):
    model, tok = chat_pair
    px = pixels(3, seed=6)
    gen = dict(max_new_tokens=6, do_sample=False, num_beams=3)
    qs = ["describe", "what color is the big one?"]
    batch = model.batch_chat(tok, px, qs, gen, num_patches_list=[1, 2])
    assert batch == [model.chat(tok, px[:1], qs[0], dict(gen)), model.chat(tok, px[1:], qs[1], dict(gen))]
