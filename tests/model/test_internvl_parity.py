"""Full InternVL (ViT -> pixel shuffle -> mlp1 -> splice -> LLM) against transformers'
InternVLForConditionalGeneration on the same weights (INTERNVL.md §2, §8.3, §14.2, §20 items 1-6).

Qwen2 and Llama backbones, and InternLM2 through the Llama conversion; both ViT forms; 56-pixel tiles (4 image tokens
each). Tolerance: max |ours - theirs| / max |theirs| <= 1e-5 in float32.
"""

from __future__ import annotations

import re

import pytest
import torch

from internvl.model.internvl import InternVLModel
from tiny import randomize_, tiny_config

from .oracle import assert_rel_close, hf_internvl, hf_position_ids, rel_diff

CTX, IMG_START, IMG_END = 120, 121, 122  # <IMG_CONTEXT>, <img>, </img> in the tiny vocab
N_IMG = 4  # tokens per 56-pixel tile
ARCHS = ["Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM2ForCausalLM"]
VITS = ["300m", "6b"]


def make(arch="Qwen2ForCausalLM", vit="300m", seed=0, **over) -> InternVLModel:
    return randomize_(InternVLModel(tiny_config(arch, vit, image_token_id=CTX, **over)), seed=seed).eval()


def prompt(*parts, seed=0) -> torch.Tensor:
    """parts: int = that many random text tokens, ("img", T) = <img> + T*4 <IMG_CONTEXT> + </img>. -> (1, L)."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for p in parts:
        if isinstance(p, tuple):
            ids += [IMG_START] + [CTX] * (N_IMG * p[1]) + [IMG_END]
        else:
            ids += torch.randint(0, 100, (p,), generator=g).tolist()
    return torch.tensor([ids])


def pixels(tiles: int, seed=0) -> torch.Tensor:
    return torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(model, **kw) -> torch.Tensor:
    return model(**kw).logits


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("tiles", [1, 2, 7])
@pytest.mark.parametrize("vit", VITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, vit, tiles):
    ours = make(arch, vit)
    ids, px = prompt(5, ("img", tiles), 9), pixels(tiles)
    assert_rel_close(run(ours, pixel_values=px, input_ids=ids), run(hf_internvl(ours), pixel_values=px, input_ids=ids),
                     what=f"{arch} {vit} {tiles} tiles")


@pytest.mark.parametrize("vit", VITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_multi_image_prompt(arch, vit):
    """Two image blocks at different places; features fill the <IMG_CONTEXT> rows in order (tile-major)."""
    ours = make(arch, vit, seed=1)
    ids = prompt(3, ("img", 2), 6, ("img", 3), 4, seed=1)
    px = pixels(5, seed=1)  # image 1: tiles 0-1, image 2: tiles 2-4
    got = run(ours, pixel_values=px, input_ids=ids)
    assert_rel_close(got, run(hf_internvl(ours), pixel_values=px, input_ids=ids), what=f"{arch} {vit} two images")
    # swapping the two images' tiles changes the answer (the order is really checked)
    swapped = torch.cat([px[2:], px[:2]])
    ids_sw = prompt(3, ("img", 3), 6, ("img", 2), 4, seed=1)
    assert rel_diff(run(ours, pixel_values=swapped, input_ids=ids_sw)[:, -1], got[:, -1]) > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_with_left_padding(arch):
    """Row 0: 2-tile image, row 1: 1-tile image, left-padded by 7. pixel_values are the rows' tiles in order."""
    ours = make(arch, "6b", seed=2)
    row0 = prompt(4, ("img", 2), 8, seed=2)[0]  # 22 tokens
    row1 = prompt(2, ("img", 1), 7, seed=3)[0]  # 15 tokens
    pad = len(row0) - len(row1)
    ids = torch.stack([row0, torch.cat([torch.zeros(pad, dtype=torch.long), row1])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    px = torch.cat([pixels(2, seed=2), pixels(1, seed=3)])
    got = run(ours, pixel_values=px, input_ids=ids, attention_mask=mask)
    want = run(hf_internvl(ours), pixel_values=px, input_ids=ids, attention_mask=mask,
               position_ids=hf_position_ids(mask))
    real = mask.bool()
    assert_rel_close(got[real], want[real], what=f"{arch} left-padded batch")
    assert_rel_close(got[1, pad:], run(ours, pixel_values=px[2:], input_ids=row1[None])[0], what="row 1 alone")
    assert_rel_close(got[0], run(ours, pixel_values=px[:2], input_ids=row0[None])[0], what="row 0 alone")


@pytest.mark.parametrize("vit", VITS)
def test_select_layer_minus_two(vit):
    ours = make("Qwen2ForCausalLM", vit, seed=3, select_layer=-2)
    ids, px = prompt(3, ("img", 2), 3, seed=3), pixels(2, seed=3)
    hf = hf_internvl(ours)
    assert hf.config.vision_feature_layer == -2
    got = run(ours, pixel_values=px, input_ids=ids)
    assert_rel_close(got, run(hf, pixel_values=px, input_ids=ids), what=f"{vit} select_layer -2")
    ours.config = ours.config.replace(select_layer=-1)
    assert rel_diff(run(ours, pixel_values=px, input_ids=ids), got) > 1e-4


def test_parity_detects_v1_token_order_and_a_perturbed_vit_weight():
    """Guards: the parity comparison fails for the v1 (transposed) token order and for one changed ViT weight."""
    ours = make("Qwen2ForCausalLM", "300m", seed=4)
    hf = hf_internvl(ours)
    ids, px = prompt(3, ("img", 2), 3, seed=4), pixels(2, seed=4)
    want = run(hf, pixel_values=px, input_ids=ids)
    assert_rel_close(run(ours, pixel_values=px, input_ids=ids), want)
    cfg = ours.config
    ours.config = cfg.replace(ps_version="v1")
    assert rel_diff(run(ours, pixel_values=px, input_ids=ids), want) > 1e-3
    ours.config = cfg
    with torch.no_grad():
        ours.vision_model.encoder.layers[0].attn.qkv.weight[0, 0] += 0.5
    assert rel_diff(run(ours, pixel_values=px, input_ids=ids), want) > 1e-5


# ------------------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_plus_decode_equals_full_forward(arch):
    ours = make(arch, "300m", seed=5)
    ids, px = prompt(4, ("img", 2), 6, seed=5), pixels(2, seed=5)
    full = run(ours, pixel_values=px, input_ids=ids)
    with torch.no_grad():
        out = ours(pixel_values=px, input_ids=ids[:, :-1], use_cache=True)
        step = ours(input_ids=ids[:, -1:], past_key_values=out.past_key_values).logits
    assert out.past_key_values.length == ids.shape[1]
    assert_rel_close(out.logits, full[:, :-1], what="prefill")
    assert_rel_close(step[:, 0], full[:, -1], what="decode step")


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_single_pass(arch):
    ours = make(arch, "6b", seed=6)
    ids, px = prompt(4, ("img", 2), 9, seed=6), pixels(2, seed=6)  # image rows 4..13
    full = run(ours, pixel_values=px, input_ids=ids)
    with torch.no_grad():
        # chunk boundary after the image: chunk 1 carries the pixels, chunk 2 is text only
        a = ours(pixel_values=px, input_ids=ids[:, :16], use_cache=True)
        b = ours(input_ids=ids[:, 16:], past_key_values=a.past_key_values)
        assert_rel_close(torch.cat([a.logits, b.logits], dim=1), full, what="chunks split after the image")
        # boundary inside the image: splice once, then feed embeddings in two chunks
        emb = ours.embed(ids, pixel_values=px)
        a = ours(inputs_embeds=emb[:, :8], use_cache=True)
        b = ours(inputs_embeds=emb[:, 8:], past_key_values=a.past_key_values)
        assert_rel_close(torch.cat([a.logits, b.logits], dim=1), full, what="chunks split inside the image")


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_with_left_padding_and_images(arch):
    ours = make(arch, "300m", seed=7)
    row0 = prompt(2, ("img", 1), 9, seed=7)[0]  # 17
    row1 = prompt(1, ("img", 2), 2, seed=8)[0]  # 13
    pad = len(row0) - len(row1)
    ids = torch.stack([row0, torch.cat([torch.full((pad,), 5), row1])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    px = torch.cat([pixels(1, seed=7), pixels(2, seed=8)])
    full = run(ours, pixel_values=px, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        out = ours(pixel_values=px, input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = ours(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=out.past_key_values).logits
    real = mask[:, :-1].bool()
    assert_rel_close(out.logits[real], full[:, :-1][real], what="padded prefill")
    assert_rel_close(step[:, 0], full[:, -1], what="padded decode step")


# ------------------------------------------------------------------------------------------------ splice
@pytest.mark.parametrize("n_ctx", [7, 9])
def test_mismatched_image_token_count_raises_with_both_counts(n_ctx):
    ours = make()
    ids = torch.tensor([[1, 2, IMG_START] + [CTX] * n_ctx + [IMG_END, 3]])
    with torch.no_grad(), pytest.raises(ValueError) as e:
        ours(pixel_values=pixels(2), input_ids=ids)  # 2 tiles -> 8 feature rows
    numbers = re.findall(r"\d+", str(e.value))
    assert str(n_ctx) in numbers and "8" in numbers, str(e.value)


def test_splice_keeps_text_rows_and_fills_context_rows_in_order():
    ours = make(seed=8)
    ids, px = prompt(3, ("img", 1), 2, ("img", 2), 3, seed=8), pixels(3, seed=8)
    with torch.no_grad():
        emb = ours.embed(ids, pixel_values=px)
        text = ours.language_model.get_input_embeddings()(ids)
        feats = ours.extract_feature(px)  # (3 tiles, 4, D)
    is_ctx = ids == CTX
    assert is_ctx.sum() == 12
    # every non-context row (text, <img>, </img>) is the plain token embedding
    torch.testing.assert_close(emb[~is_ctx], text[~is_ctx], rtol=0, atol=0)
    for tag in (IMG_START, IMG_END):
        assert (ids == tag).sum() == 2
        torch.testing.assert_close(emb[ids == tag], text[ids == tag], rtol=0, atol=0)
    # context rows, in prompt order, are tile 0 tokens 0..3, tile 1 tokens 0..3, tile 2 tokens 0..3
    torch.testing.assert_close(emb[is_ctx], feats.reshape(12, -1), rtol=0, atol=0)


def test_image_flags_zero_tiles_are_dropped():
    """Dummy tiles (image_flags = 0) run through the ViT but contribute no features (§14.1, §20 item 30)."""
    ours = make("InternLM2ForCausalLM", "6b", seed=9)
    ids = prompt(3, ("img", 2), 4, seed=9)
    px = pixels(3, seed=9)
    flags = torch.tensor([1, 0, 1])
    got = run(ours, pixel_values=px, input_ids=ids, image_flags=flags)
    kept = px[[0, 2]]
    assert_rel_close(got, run(hf_internvl(ours), pixel_values=kept, input_ids=ids), what="flags vs transformers")
    assert_rel_close(got, run(ours, pixel_values=kept, input_ids=ids), what="flags vs kept tiles")
    with pytest.raises(ValueError):  # without the flags, 3 tiles do not fit 8 slots
        run(ours, pixel_values=px, input_ids=ids)


# ------------------------------------------------------------------------------------------------ loss
def loss_case(seed=10):
    ours = make("LlamaForCausalLM", "300m", seed=seed)
    ids = torch.cat([prompt(3, ("img", 1), 5, seed=seed), prompt(4, ("img", 1), 4, seed=seed + 1)])  # (2, 14)
    px = pixels(2, seed=seed)
    labels = ids.clone()
    labels[:, :10] = -100  # prompt and image rows are not trained
    labels[1, 12] = -100
    hf = hf_internvl(ours)
    with torch.no_grad():
        hf_out = hf(pixel_values=px, input_ids=ids, labels=labels)
    return ours, ids, px, labels, hf_out


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor):
    """Per-position CE of predicting labels[t+1] from logits[t], and the trained-position mask (independent)."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    trained = target != -100
    ce = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return ce * trained, trained


def test_loss_matches_independent_shifted_cross_entropy():
    ours, ids, px, labels, hf_out = loss_case()
    with torch.no_grad():
        loss = ours(pixel_values=px, input_ids=ids, labels=labels).loss
    ce, trained = shifted_ce(hf_out.logits, labels)
    assert trained.sum() == 7
    torch.testing.assert_close(loss.double(), ce.sum() / trained.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, hf_out.loss, rtol=1e-5, atol=1e-6)  # transformers' own causal-LM loss


def test_loss_weight_is_weighted_mean():
    """loss = sum(w * CE) / sum(w) over trained shifted positions (§14.2); weights shift with the labels."""
    ours, ids, px, labels, hf_out = loss_case(seed=12)
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) + 0.1
    with torch.no_grad():
        loss = ours(pixel_values=px, input_ids=ids, labels=labels, loss_weight=w).loss
    ce, trained = shifted_ce(hf_out.logits, labels)
    ws = w[:, 1:].double() * trained
    want = (ws * ce).sum() / ws.sum()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert abs(float(want - ce.sum() / trained.sum())) > 1e-3  # really differs from the unweighted mean
    # 'square' weights: 1/sqrt(x) per sample (x = its trained-token count), same formula
    x = trained.sum(1, keepdim=True).double()
    wsq = (1 / x.sqrt()).expand_as(ids).float()
    with torch.no_grad():
        loss_sq = ours(pixel_values=px, input_ids=ids, labels=labels, loss_weight=wsq).loss
    ws = (1 / x.sqrt()) * trained
    torch.testing.assert_close(loss_sq.double(), (ws * ce).sum() / ws.sum(), rtol=1e-5, atol=1e-6)
