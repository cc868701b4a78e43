"""`optimize_for_inference` against the eager model it was made from (fp32, rel 1e-5), for every LLM family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from internvl.generation.generate import generate
from internvl.generation.sampling import GenerationConfig
from internvl.model.fast import (
    SKINNY_ROWS,
    CachedRotary,
    FusedAttention,
    FusedMLP,
    SkinnyLinear,
    StaticKVCache,
    fuse_linears,
    optimize_for_inference,
)
from internvl.model.internvl import InternVLModel
from internvl.model.llm import KVCache
from internvl.model.quantize import quantize_model
from tiny import LLM_ARCHS, TINY_IMAGE, randomize_, tiny_config

IMG = 120
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def pair(arch: str, seed: int = 0) -> tuple[InternVLModel, InternVLModel]:
    eager = randomize_(InternVLModel(tiny_config(arch)), seed=seed).eval()
    return eager, optimize_for_inference(copy.deepcopy(eager))


def image_prompt(model: InternVLModel, b: int = 2, length: int = 9, pad: int = 3, seed: int = 0):
    """Left-padded batch; row 0 carries one image tile. -> ids (B, L), mask (B, L), pixel_values (1, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.num_image_token
    ids = torch.randint(3, 100, (b, length + n_img), generator=g)
    ids[0, 2:2 + n_img] = IMG
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    ids[1:, :pad] = 0
    return ids, mask, torch.randn(1, 3, TINY_IMAGE, TINY_IMAGE, generator=g)


@pytest.mark.parametrize("arch", LLM_ARCHS)
@torch.no_grad()
def test_logits_match_eager(arch):
    eager, fast = pair(arch)
    assert all(isinstance(l.self_attn, FusedAttention) and isinstance(l.mlp, FusedMLP)
               for l in fast.language_model.model.layers)
    ids, mask, px = image_prompt(eager)
    # unpadded causal prefill (is_causal path) and a padded batch (additive mask path)
    a = eager(pixel_values=px, input_ids=ids[:1]).logits
    b = fast(pixel_values=px, input_ids=ids[:1]).logits
    assert rel(b, a) <= TOL
    feats = eager.extract_feature(px)
    emb_e = eager.embed(ids[:1].repeat(2, 1), visual_features=feats.repeat(2, 1, 1))
    emb_e[1] = eager.language_model.get_input_embeddings()(ids[1])
    lm_e, lm_f = eager.language_model, fast.language_model
    a = lm_e.lm_head(lm_e(emb_e, attention_mask=mask))
    b = lm_f.lm_head(lm_f(emb_e, attention_mask=mask))
    real = mask.bool()
    assert rel(b[real], a[real]) <= TOL


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_greedy_generation_identical(arch):
    eager, fast = pair(arch, seed=1)
    ids, mask, px = image_prompt(eager, seed=1)
    cfg = GenerationConfig(max_new_tokens=8)
    a = generate(eager, ids[:1], mask[:1], pixel_values=px, config=cfg)
    b = generate(fast, ids[:1], mask[:1], pixel_values=px, config=cfg)
    assert a.shape == (1, 8) and torch.equal(a, b)
    text_ids, text_mask = ids[1:].repeat(2, 1), mask[1:].repeat(2, 1)
    text_ids[0, 0], text_mask[0, 0] = 5, 1  # rows with different padding
    a = generate(eager, text_ids, text_mask, config=cfg)
    b = generate(fast, text_ids, text_mask, config=cfg)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Phi3ForCausalLM"])
@torch.no_grad()
def test_static_cache_decode_matches_growing_cache(arch):
    eager, fast = pair(arch, seed=2)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    lm_e, lm_f = eager.language_model, fast.language_model
    emb = lm_e.get_input_embeddings()
    c_e, c_f = KVCache(lm_e.config.num_layers), StaticKVCache.for_model(fast, batch=2, max_len=16)
    h_e, h_f = lm_e(emb(ids), cache=c_e), lm_f(emb(ids), cache=c_f)
    for step in range(4):
        assert rel(lm_f.lm_head(h_f[:, -1]), lm_e.lm_head(h_e[:, -1])) <= TOL
        tok = lm_e.lm_head(h_e[:, -1]).argmax(-1)[:, None]
        h_e, h_f = lm_e(emb(tok), cache=c_e), lm_f(emb(tok), cache=c_f)
    assert c_f.length == c_e.length == 11
    with pytest.raises(ValueError, match="full"):
        lm_f(emb(torch.zeros(2, 6, dtype=torch.long)), cache=c_f)


@torch.no_grad()
def test_rope_table_equals_eager_and_grows():
    eager, fast = pair("LlamaForCausalLM")
    rot = fast.language_model.model.rotary
    assert isinstance(rot, CachedRotary)
    rot._build(8)  # force growth on the next call
    pos = torch.tensor([[0, 5, 300, 1999]])
    for got, want in zip(rot(pos), eager.language_model.model.rotary(pos)):
        assert torch.equal(got, want)
    assert rot.cos.shape[0] == 2000
    # length-dependent kinds keep the eager module
    assert not isinstance(pair("Phi3ForCausalLM")[1].language_model.model.rotary, CachedRotary)
    assert not isinstance(pair("InternLM2ForCausalLM")[1].language_model.model.rotary, CachedRotary)


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_skinny_linear_equals_linear_for_every_row_count(bias):
    lin = nn.Linear(24, 40, bias=bias)
    sk = SkinnyLinear.from_linear(lin)
    assert sk.weight is lin.weight
    lo, hi = SKINNY_ROWS
    for shape in [(1, 24), (2, 1, 24), (lo, 24), (2, hi // 2, 24), (hi, 24), (hi + 1, 24), (3, 5, 24)]:
        x = torch.randn(*shape)
        got = sk(x)
        assert got.shape == (*shape[:-1], 40) and got.is_contiguous()
        assert rel(got, F.linear(x, lin.weight, lin.bias)) <= TOL


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "InternLM3ForCausalLM"])
def test_batched_decode_matches_eager(arch):
    """8 rows per decode step: the SkinnyLinear (W @ x.T) path, with left padding."""
    eager, fast = pair(arch, seed=4)
    assert isinstance(fast.language_model.lm_head, SkinnyLinear)
    ids = torch.randint(3, 100, (8, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for i in range(4):
        mask[i, :i + 1] = 0
    cfg = GenerationConfig(max_new_tokens=6)
    assert torch.equal(generate(eager, ids, mask, config=cfg), generate(fast, ids, mask, config=cfg))
    lm_e, lm_f = eager.language_model, fast.language_model
    with torch.no_grad():
        h_e, h_f = lm_e(lm_e.get_input_embeddings()(ids[:, :1])), lm_f(lm_f.get_input_embeddings()(ids[:, :1]))
        assert rel(lm_f.lm_head(h_f[:, -1]), lm_e.lm_head(h_e[:, -1])) <= TOL


def test_fuse_linears_checks_and_concatenates():
    a, b = nn.Linear(4, 3), nn.Linear(4, 5)
    f = fuse_linears([a, b])
    x = torch.randn(2, 4)
    assert torch.allclose(f(x), torch.cat([a(x), b(x)], -1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        fuse_linears([a, nn.Linear(5, 3)])
    with pytest.raises(ValueError):
        fuse_linears([a, nn.Linear(4, 3, bias=False)])


@torch.no_grad()
def test_quantize_before_or_after_optimize_is_the_same_model():
    eager = randomize_(InternVLModel(tiny_config("Qwen2ForCausalLM")), seed=3).eval()
    q_then_o = optimize_for_inference(quantize_model(copy.deepcopy(eager), "int8"))
    o_then_q = quantize_model(optimize_for_inference(copy.deepcopy(eager)), "int8")
    ids = torch.randint(3, 100, (1, 6))
    for m in (q_then_o, o_then_q):
        assert type(m.language_model.model.layers[0].self_attn).__name__ == "FusedAttention"
    a, b = q_then_o(input_ids=ids).logits, o_then_q(input_ids=ids).logits
    assert torch.equal(a, b)
