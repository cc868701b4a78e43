"""Rotary position embeddings for every LLM family InternVL uses. Spec: INTERNVL.md §11.1, §11.2, §11.4, §11.6.

All variants produce float32 cos/sin of shape (B, L, d) in the rotate-half layout (the d/2 frequencies repeated
twice); the caller casts them to the activation dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from internvl.config import LLMConfig


def base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (d/2,)


def ntk_base(base: float, dim: int, factor: float, length: int, max_len: int) -> float:
    """Dynamic NTK base for a sequence of `length` > `max_len` positions (§11.2)."""
    return base * ((factor * length / max_len) - (factor - 1)) ** (dim / (dim - 2))


def llama3_inv_freq(inv: torch.Tensor, rs: dict) -> torch.Tensor:
    """Llama-3 frequency scaling: long wavelengths divided by `factor`, short kept, a smooth blend in between."""
    factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Family-aware RoPE. Stateful only where the reference is (InternLM2 dynamic NTK, §11.2)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.dim = cfg.head_dim
        self.base = cfg.rope_theta
        self.max_len = cfg.max_position_embeddings
        rs = dict(cfg.rope_scaling or {})
        kind = cfg.rope_type
        if cfg.arch == "Qwen2ForCausalLM":
            # the reference pin (transformers 4.37.2) ignores Qwen2's rope_scaling (§11.3); equal below 32768
            kind = "default"
        if kind == "longrope":
            kind = "su"  # the newer name of Phi-3's su scaling
        supported = ("default", "linear", "dynamic", "llama3", "su", "yarn")
        if kind not in supported:
            raise ValueError(f"rope scaling type {kind!r} is not supported; supported: {', '.join(supported)}")
        if kind in ("su", "yarn") and cfg.arch != "Phi3ForCausalLM":
            raise ValueError(f"rope scaling {kind!r} is only implemented for Phi-3")
        self.kind = kind
        self.family = cfg.arch
        self.factor = float(rs.get("factor", 1.0))
        self.attention_scale = 1.0
        inv = base_inv_freq(self.base, self.dim)
        if kind == "llama3":
            inv = llama3_inv_freq(inv, rs)
        if kind in ("su", "yarn"):
            orig = cfg.original_max_position_embeddings or rs.get("original_max_position_embeddings")
            if not orig:
                raise ValueError("Phi-3 su/yarn rope scaling needs original_max_position_embeddings")
            self.orig_len = int(orig)
            self.short_factor = torch.tensor(rs["short_factor"], dtype=torch.float32)
            self.long_factor = torch.tensor(rs["long_factor"], dtype=torch.float32)
            if len(self.short_factor) != self.dim // 2 or len(self.long_factor) != self.dim // 2:
                raise ValueError(f"Phi-3 rope factor lists must have head_dim/2 = {self.dim // 2} entries")
            s = self.max_len / self.orig_len
            if s <= 1:
                self.attention_scale = 1.0
            elif kind == "su":
                self.attention_scale = math.sqrt(1 + math.log(s) / math.log(self.orig_len))
            else:
                self.attention_scale = 0.1 * math.log(s) + 1.0
        self.register_buffer("inv_freq", inv, persistent=False)
        self.original_inv_freq = inv.clone()
        self.cached_len = self.max_len  # InternLM2: the length its cos/sin cache covers

    def _inv_freq_for(self, length: int) -> torch.Tensor:
        if self.kind == "dynamic":
            if self.family == "InternLM2ForCausalLM":
                # stateful: once grown, the new base persists for later shorter calls (§11.2)
                if length > self.cached_len:
                    base = ntk_base(self.base, self.dim, self.factor, length, self.max_len)
                    self.inv_freq = base_inv_freq(base, self.dim).to(self.inv_freq.device)
                    self.cached_len = length
                return self.inv_freq
            # transformers-style dynamic NTK (Llama, InternLM3): a pure function of this call's length. transformers
            # keeps the grown base across calls until a call falls below the maximum; we do not, so one sequence's
            # rope never depends on what ran before it (batched engine). Equal for one forward and for a decode
            # whose length only grows; no released InternVL uses dynamic scaling on a Llama backbone.
            if length > self.max_len:
                base = ntk_base(self.base, self.dim, self.factor, length, self.max_len)
                return base_inv_freq(base, self.dim).to(self.inv_freq.device)
            return self.original_inv_freq.to(self.inv_freq.device)
        if self.kind in ("su", "yarn"):
            ext = self.long_factor if length > self.orig_len else self.short_factor  # per call (§11.4 step 2)
            return (1.0 / (ext * self.base ** (torch.arange(0, self.dim, 2).float() / self.dim))).to(
                self.inv_freq.device
            )
        return self.inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L) -> cos, sin (B, L, d) float32.

        The length that selects scaled frequencies is max(position_ids) + 1 (transformers, Phi-3 §11.4), except for
        InternLM2, whose reference uses the key/value length `kv_len` = cached + new tokens (§11.2).
        """
        length = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if self.family == "InternLM2ForCausalLM" and kv_len is not None:
            length = kv_len
        inv = self._inv_freq_for(length).float()
        pos = position_ids.float()
        if self.kind == "linear":
            pos = pos / self.factor
        freqs = pos[..., None] * inv  # (B, L, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scale, emb.sin() * self.attention_scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, L, d); cos/sin (B, L, d) already in x's dtype."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
