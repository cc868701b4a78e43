"""The reference `generate` against transformers' generate on the same weights (greedy: token for token)."""

import pytest
import torch

from internvl.checkpoint.names import internal_to_original, original_to_native
from internvl.generation.generate import generate
from internvl.generation.sampling import GenerationConfig, apply_repetition_penalty, warp
from internvl.model.internvl import InternVLModel
from tiny import randomize_, tiny_config

IMG = 120


def native_twin(ours: InternVLModel):
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    cfg = ours.config
    state = {}
    for n, t in internal_to_original(ours.state_dict(), cfg).items():
        state.update(dict(original_to_native(n, t, cfg)))
    hf = InternVLForConditionalGeneration(HFConfig(**cfg.to_native_dict(image_token_id=IMG))).float().eval()
    hf.load_state_dict(state, strict=True)
    return hf


def prompt_with_image(tiles: int, n_img_tokens: int, seed: int = 0, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (1, length), generator=g)
    block = torch.full((1, tiles * n_img_tokens), IMG)
    return torch.cat([ids[:, :4], block, ids[:, 4:]], dim=1)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM2ForCausalLM"])
@pytest.mark.parametrize("tiles", [1, 7])
def test_greedy_32_tokens_equal_transformers(arch, tiles):
    torch.manual_seed(0)
    ours = randomize_(InternVLModel(tiny_config(arch)), seed=1, std=0.3).eval()
    hf = native_twin(ours)
    ids = prompt_with_image(tiles, ours.config.num_image_token)
    px = torch.randn(tiles, 3, 56, 56)
    # eos never produced: with a random model the whole 32-token budget is used on both sides
    got = generate(ours, ids, pixel_values=px, config=GenerationConfig(max_new_tokens=32))
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert got.shape == (1, 32)
    assert got.tolist() == ref.tolist()


def test_batched_left_padded_greedy_equals_single_runs():
    ours = randomize_(InternVLModel(tiny_config()), seed=2, std=0.3).eval()
    a = prompt_with_image(1, 4, seed=1, length=12)
    b = prompt_with_image(1, 4, seed=2, length=6)
    pad = a.shape[1] - b.shape[1]
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    px = torch.randn(2, 3, 56, 56)
    cfg = GenerationConfig(max_new_tokens=16)
    both = generate(ours, batch, attention_mask=mask, pixel_values=px, config=cfg)
    one = generate(ours, a, pixel_values=px[:1], config=cfg)
    two = generate(ours, b, pixel_values=px[1:], config=cfg)
    assert both[0].tolist() == one[0].tolist()
    assert both[1].tolist() == two[0].tolist()


def test_eos_stops_and_pads_finished_rows():
    ours = randomize_(InternVLModel(tiny_config()), seed=3, std=0.3).eval()
    ids = prompt_with_image(1, 4)
    px = torch.randn(1, 3, 56, 56)
    free = generate(ours, ids, pixel_values=px, config=GenerationConfig(max_new_tokens=10))
    stop = int(free[0, 3])  # make the 4th generated token the eos
    first = free[0].tolist().index(stop)
    cut = generate(ours, ids, pixel_values=px, config=GenerationConfig(max_new_tokens=10, eos_token_id=stop))
    assert cut[0].tolist() == free[0, : first + 1].tolist()  # eos included, nothing after it


def test_repetition_penalty_matches_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(2, 50)
    seen = torch.randint(0, 50, (2, 7))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, scores.clone())
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.3), ref)


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    scores = torch.randn(3, 40)
    ids = torch.zeros(3, 0, dtype=torch.long)
    ref = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(10)(ids, TemperatureLogitsWarper(0.7)(ids, scores.clone())))
    ours = warp(scores, GenerationConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.8))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_seeded_sampling_is_reproducible():
    ours = randomize_(InternVLModel(tiny_config()), seed=4, std=0.3).eval()
    ids = prompt_with_image(1, 4)
    px = torch.randn(1, 3, 56, 56)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=7)
    a = generate(ours, ids, pixel_values=px, config=cfg)
    b = generate(ours, ids, pixel_values=px, config=cfg)
    c = generate(ours, ids, pixel_values=px, config=GenerationConfig.from_any(cfg, seed=8))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_unknown_generation_option_is_rejected():
    with pytest.raises(ValueError, match="unknown generation option"):
        GenerationConfig.from_any({"max_new_tokens": 3, "top_kk": 3})
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig.from_any({"top_p": 1.5})
