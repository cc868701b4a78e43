"""The decoder for every family against transformers' Llama / Qwen2 / Phi3 ForCausalLM on the same weights
(INTERNVL.md §11), plus KV-cache equivalence (prefill + decode == full forward).

InternLM2 and InternLM3 are fed to transformers' Llama with our unfused weights (what the transformers converter does);
Phi-3 gets its fused qkv_proj / gate_up_proj. Tolerance: max |ours - theirs| / max |theirs| <= 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch

from internvl.model.llm import CausalLM, KVCache
from tiny import LLM_ARCHS, randomize_, tiny_llm

from .oracle import assert_rel_close, hf_causal_lm, hf_position_ids, rel_diff

VOCAB = 128


def make(arch: str, seed: int = 0, **over) -> CausalLM:
    return randomize_(CausalLM(tiny_llm(arch, **over)), seed=seed).eval()


def tokens(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: CausalLM, ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
    h = model(model.get_input_embeddings()(ids), position_ids=position_ids, attention_mask=attention_mask, cache=cache)
    return model.lm_head(h)


@torch.no_grad()
def hf_logits(hf, ids, **kw) -> torch.Tensor:
    return hf(input_ids=ids, **kw).logits


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_logits_match_transformers(arch):
    """Batch of 2 sequences; InternLM2's dynamic NTK is plain RoPE below max_position_embeddings (512 here)."""
    ours = make(arch)
    ids = tokens(2, 24)
    assert_rel_close(logits(ours, ids), hf_logits(hf_causal_lm(ours), ids), what=arch)


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_parity_test_detects_a_perturbed_weight(arch):
    """Guard: the comparison above is sensitive to a single changed weight (so it can fail)."""
    ours = make(arch)
    hf = hf_causal_lm(ours)
    with torch.no_grad():
        ours.model.layers[1].self_attn.k_proj.weight[0, 0] += 0.5
    ids = tokens(2, 24)
    assert rel_diff(logits(ours, ids), hf_logits(hf, ids)) > 1e-4


@pytest.mark.parametrize("n", [40, 256, 300])
def test_phi3_short_and_long_prompts_match_transformers_longrope(n):
    """original_max_position_embeddings = 256: n <= 256 uses short factors, 300 the long ones; m ~ 1.118 always."""
    ours = make("Phi3ForCausalLM", seed=1)
    ids = tokens(2, n, seed=1)
    assert_rel_close(logits(ours, ids), hf_logits(hf_causal_lm(ours), ids), what=f"phi3 n={n}")


def test_phi3_decode_across_original_max_matches_transformers_cache():
    """Decoding across position 256: new tokens switch to long factors, cached keys keep the short rotation (§11.4).

    transformers' Phi3 does the same per call, so its cached decode is the reference here.
    """
    ours = make("Phi3ForCausalLM", seed=2)
    hf = hf_causal_lm(ours)
    ids = tokens(1, 258, seed=2)
    cache = KVCache(ours.config.num_layers)
    ours_prefill = logits(ours, ids[:, :254], cache=cache)
    with torch.no_grad():
        out = hf(input_ids=ids[:, :254], use_cache=True)
    assert_rel_close(ours_prefill, out.logits, what="phi3 prefill 254")
    pkv = out.past_key_values
    for t in range(254, 258):  # positions 254, 255 (short), 256, 257 (long)
        got = logits(ours, ids[:, t:t + 1], cache=cache)
        with torch.no_grad():
            out = hf(input_ids=ids[:, t:t + 1], past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        assert_rel_close(got, out.logits, what=f"phi3 decode position {t}")
    # the cached path really differs from recomputing all 258 tokens with long factors (reference behaviour)
    assert rel_diff(got[:, -1], logits(ours, ids)[:, -1]) > 1e-4


def test_internlm2_prompt_at_max_length_is_plain_rope():
    ours = make("InternLM2ForCausalLM", seed=3, max_position_embeddings=64)
    ids = tokens(2, 64, seed=3)
    assert_rel_close(logits(ours, ids), hf_logits(hf_causal_lm(ours), ids), what="internlm2 L=M")


def test_internlm2_long_prompt_and_stateful_ntk_base():
    """Past M = 64 the first call equals transformers' dynamic NTK (same formula for L = kv length). Afterwards the
    grown base persists (§11.2): a short prompt equals plain RoPE with base'(100), not base."""
    ours = make("InternLM2ForCausalLM", seed=4, max_position_embeddings=64)
    hf_dynamic = hf_causal_lm(ours, rope={"rope_type": "dynamic", "factor": 2.0})
    long_ids = tokens(1, 100, seed=4)
    assert_rel_close(logits(ours, long_ids), hf_logits(hf_dynamic, long_ids), what="internlm2 L=100")

    d, base = ours.config.head_dim, ours.config.rope_theta
    grown = base * (2.0 * 100 / 64 - 1.0) ** (d / (d - 2))  # spec formula, written out
    short = tokens(2, 20, seed=5)
    want = hf_logits(hf_causal_lm(ours, rope=None, rope_theta=grown), short)
    assert_rel_close(logits(ours, short), want, what="internlm2 short after long")
    assert rel_diff(logits(ours, short), hf_logits(hf_causal_lm(ours, rope=None), short)) > 1e-4


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "InternLM3ForCausalLM"])
def test_transformers_style_dynamic_long_prompt_matches_transformers(arch):
    ours = make(arch, seed=6, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    hf = hf_causal_lm(ours)
    for n in (100, 30):  # long (scaled), then short again (transformers resets to plain)
        ids = tokens(2, n, seed=n)
        assert_rel_close(logits(ours, ids), hf_logits(hf, ids), what=f"{arch} dynamic L={n}")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "InternLM2ForCausalLM"])
def test_dynamic_decode_across_max_matches_transformers_cache(arch):
    """Decoding across M = 64: each step past M uses base'(kv length) for the new token, cached keys keep theirs.
    With growing lengths and no padding, transformers' dynamic rope does exactly this, for InternLM2 too (§11.2)."""
    ours = make(arch, seed=7, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    hf = hf_causal_lm(ours, rope={"rope_type": "dynamic", "factor": 2.0})
    ids = tokens(1, 68, seed=7)
    cache = KVCache(ours.config.num_layers)
    logits(ours, ids[:, :62], cache=cache)
    with torch.no_grad():
        pkv = hf(input_ids=ids[:, :62], use_cache=True).past_key_values
    for t in range(62, 68):
        got = logits(ours, ids[:, t:t + 1], cache=cache)
        with torch.no_grad():
            out = hf(input_ids=ids[:, t:t + 1], past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        assert_rel_close(got, out.logits, what=f"{arch} dynamic decode position {t}")


def test_llama3_rope_matches_transformers():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
    ours = make("LlamaForCausalLM", seed=8, rope_scaling=rs)
    ids = tokens(2, 40, seed=8)
    assert_rel_close(logits(ours, ids), hf_logits(hf_causal_lm(ours), ids), what="llama3")
    assert rel_diff(logits(ours, ids), hf_logits(hf_causal_lm(ours, rope=None), ids)) > 1e-4


def left_pad(ids: torch.Tensor, pads: list[int], pad_id: int = 0):
    """Left-pad row i by pads[i] tokens (the rows' last len - pads[i] tokens are kept)."""
    mask = torch.ones_like(ids)
    ids = ids.clone()
    for i, p in enumerate(pads):
        ids[i, :p] = pad_id
        mask[i, :p] = 0
    return ids, mask


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_left_padding_matches_transformers_and_unpadded_rows(arch):
    ours = make(arch, seed=9)
    ids, mask = left_pad(tokens(2, 20, seed=9), [0, 6])
    got = logits(ours, ids, attention_mask=mask)  # position ids derived from the mask
    want = hf_logits(hf_causal_lm(ours), ids, attention_mask=mask, position_ids=hf_position_ids(mask))
    real = mask.bool()
    assert_rel_close(got[real], want[real], what=f"{arch} left padding")
    # the padded row's real positions equal the same tokens run alone
    assert_rel_close(got[1, 6:], logits(ours, ids[1:, 6:])[0], what=f"{arch} padded row vs alone")


def test_phi3_left_padding_counts_real_positions_for_the_factor_switch():
    """280 columns but at most 250 real tokens per row: max(position_ids) + 1 = 250 <= 256, so short factors.

    (Plain RoPE is blind to a constant position shift; Phi-3's factor switch is not, so this pins the padded
    position ids: counting pads as positions would switch to the long factors.)
    """
    ours = make("Phi3ForCausalLM", seed=13)
    ids, mask = left_pad(tokens(2, 280, seed=13), [30, 60])
    got = logits(ours, ids, attention_mask=mask)
    want = hf_logits(hf_causal_lm(ours), ids, attention_mask=mask, position_ids=hf_position_ids(mask))
    real = mask.bool()
    assert_rel_close(got[real], want[real], what="phi3 left padding at the factor switch")


# ------------------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_prefill_plus_decode_equals_full_forward(arch):
    ours = make(arch, seed=10)
    ids = tokens(2, 17, seed=10)
    full = logits(ours, ids)
    cache = KVCache(ours.config.num_layers)
    prefill = logits(ours, ids[:, :-1], cache=cache)
    assert cache.length == 16
    step = logits(ours, ids[:, -1:], cache=cache)
    assert cache.length == 17
    assert_rel_close(prefill, full[:, :-1], what=f"{arch} prefill")
    assert_rel_close(step[:, 0], full[:, -1], what=f"{arch} decode step")


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_chunked_prefill_equals_single_pass(arch):
    ours = make(arch, seed=11)
    ids = tokens(2, 23, seed=11)
    full = logits(ours, ids)
    cache = KVCache(ours.config.num_layers)
    a = logits(ours, ids[:, :9], cache=cache)
    b = logits(ours, ids[:, 9:], cache=cache)  # 14 new queries over 23 keys: causal with an offset
    assert_rel_close(torch.cat([a, b], dim=1), full, what=f"{arch} chunked prefill")


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_kv_cache_with_left_padding(arch):
    ours = make(arch, seed=12)
    ids, mask = left_pad(tokens(2, 18, seed=12), [4, 0])
    full = logits(ours, ids, attention_mask=mask)
    cache = KVCache(ours.config.num_layers)
    logits(ours, ids[:, :-2], attention_mask=mask[:, :-2], cache=cache)
    step1 = logits(ours, ids[:, -2:-1], attention_mask=mask[:, :-1], cache=cache)
    step2 = logits(ours, ids[:, -1:], attention_mask=mask, cache=cache)
    assert_rel_close(torch.cat([step1, step2], dim=1), full[:, -2:], what=f"{arch} padded decode")
