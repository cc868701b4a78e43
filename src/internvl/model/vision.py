"""InternViT, the vision encoder of InternVL 1.5-3 (300M and 6B forms).

Spec: INTERNVL.md §3. Module and parameter names equal the original checkpoint's (`vision_model.*`, §10.3), so
the loader maps nothing here. Reference: OpenGVLab/InternVL `modeling_intern_vit.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl.config import VisionConfig


class InternRMSNorm(nn.Module):
    """RMSNorm whose weight multiplies *after* the cast back to the input dtype (INTERNVL.md §3.5)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(cfg: VisionConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return InternRMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.grid = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid**2, c))

    def _patch_positions(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]  # (1, g*g, C)
        if (h, w) == (self.grid, self.grid):
            # The reference resizes even here; bicubic to the same size is an identity (INTERNVL.md §3.2 step 3).
            return pos.to(dtype)
        c = pos.shape[-1]
        grid = pos.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2).float()  # (1, C, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.reshape(1, c, h * w).permute(0, 2, 1).to(dtype)  # (1, h*w, C) row-major

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (B, 3, H, W) -> (B, 1 + h*w, C)
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # (B, C, h, w)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C), token = row*w + col
        cls = self.class_embedding.expand(b, 1, -1).to(dtype)
        cls = cls + self.position_embedding[:, :1].to(dtype)
        return torch.cat([cls, x + self._patch_positions(h, w, dtype)], dim=1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)  # rows [q | k | v], head-major inside
        self.proj = nn.Linear(c, c)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            # one RMSNorm over all heads of a token (C wide), not per head (INTERNVL.md §3.4)
            self.q_norm = InternRMSNorm(c, cfg.layer_norm_eps)
            self.k_norm = InternRMSNorm(c, cfg.layer_norm_eps)
        self.use_sdpa = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)  # each (B, N, C)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # eager reference: q scaled before the product, softmax in the activation dtype (§3.4)
            out = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))  # layer scale (per channel)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.ls1 * self.attn(self.norm1(h).to(h.dtype))
        return h + self.ls2 * self.mlp(self.norm2(h).to(h.dtype))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, upto: int) -> torch.Tensor:
        """Run the first `upto` blocks (no final norm: the output is the raw residual stream, §3.3)."""
        for layer in self.layers[:upto]:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return h


class InternVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """(T, 3, S, S) -> (T, 1 + (S/14)^2, C): hidden state `select_layer` (-1 = last block, §3.6)."""
        n = self.config.num_layers
        upto = n + 1 + select_layer if select_layer < 0 else select_layer  # hidden_states[k] = after k blocks
        return self.encoder(self.embeddings(pixel_values), upto)
