"""Pixel shuffle token/channel order and the mlp1 projector (INTERNVL.md §4, §5, §20 items 2-3).

Expected tensors are built in the tests from the spec formula
    Y[i, j] = concat(X[2i, 2j], X[2i, 2j+1], X[2i+1, 2j], X[2i+1, 2j+1])        (v2: token t = g*i + j; v1: t = g*j + i)
on an index tensor X[r, c, k] = 10000 r + 100 c + k, so every output value names the input cell it came from.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.internvl.modeling_internvl import InternVLModel as HFInternVLModel

from internvl.model.internvl import InternVLModel
from internvl.model.projector import make_mlp1, pixel_shuffle
from internvl.model.vision import InternRMSNorm
from tiny import randomize_, tiny_config


def index_grid(tiles: int, side: int, channels: int) -> torch.Tensor:
    """X[t, r, c, k] = 1e6 t + 10000 r + 100 c + k (float64: exact)."""
    t, r, c, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (tiles, side, side, channels)),
                                indexing="ij")
    return 1e6 * t + 10000 * r + 100 * c + k


def expected_shuffle(x: torch.Tensor, version: str) -> torch.Tensor:
    """The §4 formula, cell by cell."""
    tiles, side, _, ch = x.shape
    g = side // 2
    y = torch.empty(tiles, g, g, 4 * ch, dtype=x.dtype)
    for t in range(tiles):
        for i in range(g):
            for j in range(g):
                y[t, i, j] = torch.cat([x[t, 2 * i, 2 * j], x[t, 2 * i, 2 * j + 1],
                                        x[t, 2 * i + 1, 2 * j], x[t, 2 * i + 1, 2 * j + 1]])
    if version == "v1":  # column-major token order: token (i, j) of v2 sits at (j, i)
        y = y.transpose(1, 2)
    return y


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("side", [4, 8])
def test_pixel_shuffle_index_tensor(version, side):
    x = index_grid(2, side, 3)
    got = pixel_shuffle(x, 0.5, version)
    assert got.shape == (2, side // 2, side // 2, 12)
    torch.testing.assert_close(got, expected_shuffle(x, version), rtol=0, atol=0)


def test_pixel_shuffle_hand_checked_cells():
    """A few cells spelled out, so the expected-tensor builder itself is checked against the spec's words."""
    x = index_grid(1, 4, 2)
    v2 = pixel_shuffle(x, 0.5, "v2").reshape(1, 4, 8)  # flattened tokens, row-major for v2
    # token 1 = block (i=0, j=1): TL = X[0,2], TR = X[0,3], BL = X[1,2], BR = X[1,3]
    assert v2[0, 1].tolist() == [200, 201, 300, 301, 10200, 10201, 10300, 10301]
    v1 = pixel_shuffle(x, 0.5, "v1").reshape(1, 4, 8)
    # v1 token 1 = block (i=1, j=0): TL = X[2,0], TR = X[2,1], BL = X[3,0], BR = X[3,1]
    assert v1[0, 1].tolist() == [20000, 20001, 20100, 20101, 30000, 30001, 30100, 30101]


def test_pixel_shuffle_v2_matches_transformers():
    """transformers implements v2 only; its (unbound) pixel_shuffle is an independent implementation."""
    x = index_grid(3, 8, 5)
    theirs = HFInternVLModel.pixel_shuffle(None, x, scale_factor=0.5)
    torch.testing.assert_close(pixel_shuffle(x, 0.5, "v2"), theirs, rtol=0, atol=0)
    assert not torch.equal(pixel_shuffle(x, 0.5, "v1"), theirs)


@pytest.mark.parametrize("shape, numbers", [((1, 4, 6, 3), ("4", "6")), ((1, 5, 5, 3), ("5",)),
                                            ((2, 7, 7, 3), ("7",))])
def test_pixel_shuffle_rejects_bad_grids(shape, numbers):
    with pytest.raises(ValueError) as e:
        pixel_shuffle(torch.zeros(shape), 0.5, "v2")
    for n in numbers:
        assert n in str(e.value)


def test_pixel_shuffle_rejects_unknown_version():
    with pytest.raises(ValueError, match="v3"):
        pixel_shuffle(torch.zeros(1, 4, 4, 3), 0.5, "v3")


def test_extract_feature_rejects_indivisible_patch_grid():
    """A 98-pixel tile gives a 7x7 patch grid, which a 2x2 merge cannot cover."""
    model = InternVLModel(tiny_config()).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="7"):
        model.extract_feature(torch.randn(1, 3, 98, 98))


def test_extract_feature_token_order_is_v2_row_major():
    """End to end: extract_feature == mlp1(formula applied to the ViT grid), for v2 and v1."""
    cfg = tiny_config()
    model = randomize_(InternVLModel(cfg)).eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        grid = model.vision_model(px)[:, 1:].reshape(2, 4, 4, -1)  # (T, rows, cols, C)
        for version in ("v2", "v1"):
            model.config = cfg.replace(ps_version=version)
            want = model.mlp1(expected_shuffle(grid.double(), version).float().reshape(2, 4, -1))
            torch.testing.assert_close(model.extract_feature(px), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ mlp1
def test_mlp1_structure_and_eps():
    mlp = make_mlp1(32, 48, 0.5)
    assert [type(m) for m in mlp] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear]
    assert mlp[0].eps == 1e-5 and mlp[0].normalized_shape == (128,)  # 4C, PyTorch default eps (§5)
    assert mlp[2].approximate == "none"  # exact erf GELU
    assert (mlp[1].in_features, mlp[1].out_features, mlp[3].in_features, mlp[3].out_features) == (128, 48, 48, 48)
    assert mlp[1].bias is not None and mlp[3].bias is not None


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_vit_norm_eps_is_1e6_while_mlp1_is_1e5(vit):
    model = InternVLModel(tiny_config(vit=vit))
    norms = [m for m in model.vision_model.modules() if isinstance(m, (nn.LayerNorm, InternRMSNorm))]
    assert norms and all(n.eps == 1e-6 for n in norms)
    assert model.mlp1[0].eps == 1e-5


def manual_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def test_mlp1_numerics_with_eps_sensitive_input():
    """Low-variance input (var ~ 1e-6) makes eps 1e-5 vs 1e-6 a large difference, so the eps is checked in value."""
    mlp = randomize_(make_mlp1(32, 48, 0.5)).double()
    x = torch.randn(2, 4, 128, dtype=torch.float64) * 1e-3 + 0.5

    def manual(eps):
        h = manual_layer_norm(x, mlp[0].weight, mlp[0].bias, eps)
        h = h @ mlp[1].weight.T + mlp[1].bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        return h @ mlp[3].weight.T + mlp[3].bias

    with torch.no_grad():
        got = mlp(x)
        torch.testing.assert_close(got, manual(1e-5), rtol=1e-10, atol=1e-10)
        assert (got - manual(1e-6)).abs().max() > 1e-2  # the check above would catch a 1e-6 eps


def test_vit_layer_norm_numerics_with_eps_sensitive_input():
    model = randomize_(InternVLModel(tiny_config(vit="300m"))).double()
    norm = model.vision_model.encoder.layers[0].norm1
    x = torch.randn(3, 32, dtype=torch.float64) * 1e-3
    with torch.no_grad():
        torch.testing.assert_close(norm(x), manual_layer_norm(x, norm.weight, norm.bias, 1e-6), rtol=1e-10, atol=1e-10)
        assert (norm(x) - F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-5)).abs().max() > 1e-2
