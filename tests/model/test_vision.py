"""InternViT (300M and 6B forms) against transformers' InternVLVisionModel on the same weights (INTERNVL.md §3).

Tolerance: max |ours - theirs| / max |theirs| <= 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvl.model.vision import InternVisionModel, VisionAttention
from tiny import randomize_, tiny_vision

from .oracle import assert_rel_close, hf_vision_model, rel_diff

VITS = ["300m", "6b"]


def make_pair(vit: str, seed: int = 0):
    ours = randomize_(InternVisionModel(tiny_vision(vit)), seed=seed).eval()
    return ours, hf_vision_model(ours)


@pytest.mark.parametrize("vit", VITS)
def test_last_hidden_state_matches_transformers(vit):
    ours, hf = make_pair(vit)
    px = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        got = ours(px)  # select_layer -1: raw residual stream of the last block, class token included
        want = hf(pixel_values=px).last_hidden_state
    assert got.shape == (3, 17, 32)
    assert_rel_close(got, want, what=f"{vit} last hidden state")


@pytest.mark.parametrize("vit", VITS)
def test_select_layer_matches_transformers_hidden_states(vit):
    """hidden_states has L + 1 entries (embedding output first); select_layer k reads hidden_states[k] (§3.6)."""
    ours, hf = make_pair(vit, seed=1)
    px = torch.randn(2, 3, 56, 56)
    n = ours.config.num_layers
    with torch.no_grad():
        hs = hf(pixel_values=px, output_hidden_states=True).hidden_states
        assert len(hs) == n + 1
        for sel in [-1, -2, -n, 1, n]:
            assert_rel_close(ours(px, select_layer=sel), hs[sel], what=f"{vit} select_layer {sel}")
        # -1 and -2 are really different tensors, so the comparison above can tell them apart
        assert rel_diff(ours(px, select_layer=-2), hs[-1]) > 1e-2


@pytest.mark.parametrize("vit", VITS)
def test_eager_attention_equals_sdpa(vit):
    ours, _ = make_pair(vit, seed=2)
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        fast = ours(px)
        attns = [m for m in ours.modules() if isinstance(m, VisionAttention)]
        assert len(attns) == ours.config.num_layers
        for m in attns:
            m.use_sdpa = False
        eager = ours(px)
    assert_rel_close(eager, fast, what=f"{vit} eager vs sdpa")


@pytest.mark.parametrize("vit", VITS)
@pytest.mark.parametrize("size", [(70, 70), (56, 84)])
def test_position_interpolation_matches_transformers(vit, size):
    """A non-native input size: both resize the 4x4 position grid bicubically (align_corners=False) to (h, w)."""
    ours, hf = make_pair(vit, seed=3)
    px = torch.randn(2, 3, *size)
    h, w = size[0] // 14, size[1] // 14
    with torch.no_grad():
        got = ours(px)
        want = hf(pixel_values=px).last_hidden_state
    assert got.shape == (2, 1 + h * w, 32)
    assert_rel_close(got, want, what=f"{vit} {size} interpolated positions")


def test_position_interpolation_independent_computation():
    """Embeddings for 70x70 input == conv patches + the class row + F.interpolate(bicubic) of the patch rows."""
    ours, _ = make_pair("300m", seed=4)
    emb = ours.embeddings
    px = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        patches = F.conv2d(px, emb.patch_embedding.weight, emb.patch_embedding.bias, stride=14)  # (2, C, 5, 5)
        patches = patches.flatten(2).transpose(1, 2)  # (2, 25, C) row-major
        pos = emb.position_embedding[0, 1:].reshape(4, 4, 32).permute(2, 0, 1)[None]  # (1, C, 4, 4)
        pos = F.interpolate(pos, size=(5, 5), mode="bicubic", align_corners=False)
        pos = pos[0].permute(1, 2, 0).reshape(25, 32)
        cls = emb.class_embedding[0] + emb.position_embedding[0, :1]
        want = torch.cat([cls.expand(2, 1, 32), patches + pos], dim=1)
        got = emb(px)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # bilinear would be a different (wrong) resize
        pos_bl = F.interpolate(emb.position_embedding[0, 1:].reshape(4, 4, 32).permute(2, 0, 1)[None], size=(5, 5),
                               mode="bilinear", align_corners=False)[0].permute(1, 2, 0).reshape(25, 32)
        assert (pos_bl - pos).abs().max() > 1e-3


def test_qk_norm_is_joint_over_all_heads():
    """6B QK-norm: one RMSNorm over the whole C vector of a token, not per head (§3.4, §20 item 4)."""
    ours, _ = make_pair("6b", seed=5)
    attn = ours.encoder.layers[0].attn
    heads, d, c = attn.num_heads, attn.head_dim, 32
    x = torch.randn(2, 17, c)

    def rms(t, w, eps=1e-6):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    def reference(per_head: bool):
        q, k, v = (x @ attn.qkv.weight.T).split(c, dim=-1)  # no qkv bias in the 6B form
        if per_head:  # the wrong variant: normalize each d-wide head slice on its own
            q = rms(q.view(2, 17, heads, d), attn.q_norm.weight.view(heads, d)).reshape(2, 17, c)
            k = rms(k.view(2, 17, heads, d), attn.k_norm.weight.view(heads, d)).reshape(2, 17, c)
        else:
            q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
        q, k, v = (t.view(2, 17, heads, d).transpose(1, 2) for t in (q, k, v))
        p = torch.softmax((q * d**-0.5) @ k.transpose(-2, -1), dim=-1)
        return (p @ v).transpose(1, 2).reshape(2, 17, c) @ attn.proj.weight.T + attn.proj.bias

    with torch.no_grad():
        got = attn(x)
        assert_rel_close(got, reference(per_head=False), what="joint qk-norm")
        assert rel_diff(got, reference(per_head=True)) > 1e-2
