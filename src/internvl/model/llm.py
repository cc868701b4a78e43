"""One pre-norm GQA decoder for every InternVL LLM family (Qwen2/2.5, InternLM2/2.5/3, Llama/Yi, Phi-3).

Spec: INTERNVL.md §11. Family differences in the checkpoint (InternLM2's grouped `wqkv`, Phi-3's fused `qkv_proj`
and `gate_up_proj`, InternLM2's names) are resolved by the loader (`internvl.checkpoint.names`); this module knows
one layout, Llama's names under `language_model.`:

    model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj, model.layers.{i}.mlp.{gate,up,down}_proj,
    model.layers.{i}.{input,post_attention}_layernorm, model.norm, lm_head   (never tied, §10.3)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl.config import LLMConfig
from internvl.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """Normalize in float32, cast back, then multiply by the weight (§11.1)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """The plain growing cache of the reference `generate`: per layer (B, KV, T, d) tensors, concatenated.

    The engine has its own paged cache; anything with `update(layer, k, v) -> (k_all, v_all)` and `length` works.
    """

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (used when finished sequences leave a batch, and by beam search)."""
        # layers placed on other devices keep their cache there (internvl.parallel.placement)
        self.k = [None if t is None else t[rows.to(t.device)] for t in self.k]
        self.v = [None if t is None else t[rows.to(t.device)] for t in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        # x (B, L, D); cos/sin (B, L, d); mask: additive (B, 1, L, T) float or None for "causal, no padding"
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, L, d)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, T, d), T = cached + L
        g = self.heads // self.kv_heads
        if g > 1:  # query head h uses kv head h // g (§11.1)
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        if mask is None and (n == 1 or k.shape[2] == n):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
        elif mask is None:  # a chunk after a cached prefix: causal with an offset
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(n, k.shape[2], x.device))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def causal_mask(n: int, total: int, device) -> torch.Tensor:
    """Boolean (n, total): query i (absolute position total - n + i) sees keys up to its own position."""
    q_pos = torch.arange(total - n, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= q_pos


def padded_causal_mask(attention_mask: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask (B, T) with 1 = real token -> additive (B, 1, n, T) for the last n queries.

    Masked entries get the dtype's minimum rather than -inf, so rows of padding queries stay finite.
    """
    b, total = attention_mask.shape
    allowed = causal_mask(n, total, attention_mask.device)[None] & attention_mask.bool()[:, None, :]
    out = torch.zeros(b, 1, n, total, dtype=dtype, device=attention_mask.device)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False


class CausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, L, D) -> final hidden states (B, L, D) (apply `lm_head` for logits).

        attention_mask (B, T): 1 for real tokens over cache + new positions (None: no padding).
        position_ids (B, L): default cumsum(mask) - 1 with padding set to 1, as transformers does (§8.3).
        mask: a ready additive (B, 1, L, T) mask (packed training passes block-diagonal masks here).
        rope: precomputed float (cos, sin), each (B, L, d); the engine passes per-sequence RoPE here, because the
            scaled families pick their frequencies from a length that differs between batch rows (§11.6).
        """
        b, n, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.masked_fill(attention_mask == 0, 1)[:, -n:]
            else:
                position_ids = torch.arange(past, past + n, device=inputs_embeds.device).expand(b, n)
        if mask is None and attention_mask is not None and not bool(attention_mask.all()):
            mask = padded_causal_mask(attention_mask, n, inputs_embeds.dtype)
        if rope is None:
            kv_len = int(attention_mask.shape[1]) if attention_mask is not None else past + n
            rope = self.model.rotary(position_ids, kv_len=kv_len)
        cos, sin = rope
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        h = inputs_embeds
        for layer in self.model.layers:
            if self.model.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        return self.model.norm(h)
