"""Pixel shuffle (token merge) and the `mlp1` projector. Spec: INTERNVL.md §4, §5."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5, version: str = "v2") -> torch.Tensor:
    """(T, g, g, C) -> (T, g*r, g*r, C/r^2).

    Output token [i, j] concatenates the k x k block of input patches row by row: for r = 0.5 the channels are
    TL, TR, BL, BR (each C wide). v2 keeps row-major token order; v1 (InternVL-Chat-V1-2) transposes the token
    grid, i.e. token [i, j] of v2 sits at [j, i].
    """
    t, rows, cols, c = x.shape
    k = round(1 / ratio)
    if rows != cols:
        raise ValueError(f"patch grid {rows}x{cols} is not square")
    if rows % k:
        raise ValueError(f"patch grid side {rows} is not divisible by {k} (downsample ratio {ratio})")
    g = rows // k
    y = x.reshape(t, g, k, g, k, c)  # (T, i, a, j, b, C): row = k*i + a, col = k*j + b
    y = y.permute(0, 1, 3, 2, 4, 5)  # (T, i, j, a, b, C): channels ordered by (a, b) = TL, TR, BL, BR
    y = y.reshape(t, g, g, k * k * c)
    if version == "v1":
        y = y.transpose(1, 2)
    elif version != "v2":
        raise ValueError(f"ps_version {version!r} is not supported; use 'v1' or 'v2'")
    return y.contiguous()


def make_mlp1(vit_hidden: int, llm_hidden: int, ratio: float) -> nn.Sequential:
    """Indices matter for checkpoint names: mlp1.0 LayerNorm (eps 1e-5, not the ViT's 1e-6), mlp1.1, mlp1.3."""
    width = vit_hidden * round(1 / ratio) ** 2
    return nn.Sequential(
        nn.LayerNorm(width, eps=1e-5),
        nn.Linear(width, llm_hidden),
        nn.GELU(),
        nn.Linear(llm_hidden, llm_hidden),
    )
