"""CPU inference transforms that keep fp32 numerics: `optimize_for_inference(model)` swaps modules in place.

The eager modules of `internvl.model.llm` stay the specification; every swap here computes the same function
(tests/model/test_fast.py: logits within rel 1e-5 of the eager model for every LLM family, identical greedy output).

What is swapped, and why it is faster on CPU (measured in docs/BENCHMARKS.md):
* `Attention` -> `FusedAttention`: q/k/v become one Linear (one GEMV per decode step instead of three), and grouped
  query attention never copies K/V: a one-token query (B, H, 1, d) is viewed as (B, KV, G, d), so the G query heads
  of a KV group attend over that group's cached keys directly (the eager `repeat_interleave` copies the whole cache G
  times every step); longer queries use SDPA's `enable_gqa`.
* `MLP` -> `FusedMLP`: gate/up become one Linear.
* every float `nn.Linear` of the LLM (after fusion, including `lm_head`) -> `SkinnyLinear`: for 4-48 rows (batched
  decode) it computes (W @ x.T).T, which MKL runs 1.3-2x faster than x @ W.T on the benchmark machine; other row
  counts call `F.linear` as before. Same parameters (shared, not copied).
* `RotaryEmbedding` -> `CachedRotary` for RoPE kinds whose frequencies do not depend on the sequence length
  (default, linear, llama3): cos/sin come from a table built once with the same arithmetic. Length-dependent kinds
  (dynamic NTK, Phi-3 su/yarn) keep the eager module.
The logits of the last position only are computed by the callers (`generate` applies `lm_head` to `hidden[:, -1]`).

`StaticKVCache` is a drop-in for `KVCache` (same `update`/`length`/`select`) that preallocates every layer's
(B, KV, max_len, d) buffer and writes by position, so a decode step copies one token's K/V instead of the whole
cache (`torch.cat` in the growing cache).

Quantized layers (`internvl.model.quantize`) fuse too: per-row scales make the concatenation exact, so quantizing
before or after `optimize_for_inference` gives the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl.model.llm import MLP, Attention, causal_mask
from internvl.model.rope import RotaryEmbedding, apply_rotary

TABLE_KINDS = ("default", "linear", "llama3")  # RoPE kinds whose cos/sin depend on the position only
SKINNY_ROWS = (4, 48)  # rows for which SkinnyLinear uses W @ x.T (kernel sweep, docs/BENCHMARKS.md)
FIRST_TABLE = 4096  # positions in the first cos/sin table; it doubles when a longer position appears


@torch.no_grad()
def fuse_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output is the concatenation of `layers`' outputs (rows stacked in order)."""
    kinds = {type(m) for m in layers}
    if len(kinds) != 1:
        raise ValueError(f"cannot fuse layers of different kinds: {sorted(k.__name__ for k in kinds)}")
    kind = kinds.pop()
    if not issubclass(kind, nn.Linear):
        if not hasattr(kind, "cat"):
            raise ValueError(f"do not know how to fuse {kind.__name__} layers")
        return kind.cat(layers)
    first = layers[0]
    has_bias = [m.bias is not None for m in layers]
    if any(m.in_features != first.in_features for m in layers) or len(set(has_bias)) != 1:
        raise ValueError("fused layers need the same input size and the same bias presence")
    out = nn.Linear(first.in_features, sum(m.out_features for m in layers), bias=has_bias[0],
                    device=first.weight.device, dtype=first.weight.dtype)
    out.weight = nn.Parameter(torch.cat([m.weight for m in layers]), requires_grad=first.weight.requires_grad)
    if has_bias[0]:
        out.bias = nn.Parameter(torch.cat([m.bias for m in layers]), requires_grad=first.bias.requires_grad)
    return out


class SkinnyLinear(nn.Linear):
    """`nn.Linear` computing (W @ x.T).T for SKINNY_ROWS rows; the same function, a faster BLAS call there."""

    fused_for_inference = True

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "SkinnyLinear":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = lin.in_features, lin.out_features
        m.weight, m.bias = lin.weight, lin.bias  # shared parameters
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if not SKINNY_ROWS[0] <= rows <= SKINNY_ROWS[1] or x.device.type != "cpu":  # measured on CPU BLAS only
            return F.linear(x, self.weight, self.bias)
        xt = x.reshape(rows, self.in_features).t()  # (K, M)
        y = torch.mm(self.weight, xt) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, xt)
        return y.t().contiguous().view(*x.shape[:-1], self.out_features)  # (N, M) -> (..., N)


class FusedAttention(nn.Module):
    """`Attention` with one qkv projection and copy-free grouped-query attention (same signature and math)."""

    fused_for_inference = True

    def __init__(self, attn: Attention):
        super().__init__()
        self.layer = attn.layer
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        self.split = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        self.qkv_proj = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])  # rows [q | k | v]
        self.o_proj = attn.o_proj

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, L, d)
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, T, d)
        g = self.heads // self.kv_heads
        if n == 1:
            # query head h = kv * g + j (eager: kv head h // g) -> (B, KV, G, d); a (B, 1, 1, T) mask broadcasts
            qg = q.reshape(b, self.kv_heads, g, self.head_dim)
            am = None if mask is None else mask.to(q.dtype)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=am)  # (B, KV, G, d)
            out = out.reshape(b, 1, self.heads * self.head_dim)
        else:
            if mask is None and k.shape[2] == n:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=g > 1)
            else:
                am = causal_mask(n, k.shape[2], x.device) if mask is None else mask.to(q.dtype)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, enable_gqa=g > 1)
            out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.o_proj(out)


class FusedMLP(nn.Module):
    """SwiGLU with gate and up in one Linear (rows [gate | up])."""

    fused_for_inference = True

    def __init__(self, mlp: MLP):
        super().__init__()
        self.inter = mlp.gate_proj.out_features
        self.gate_up_proj = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class CachedRotary(nn.Module):
    """cos/sin looked up in a table computed like `RotaryEmbedding.forward` (position-only RoPE kinds)."""

    fused_for_inference = True

    def __init__(self, rope: RotaryEmbedding, length: int = FIRST_TABLE):
        super().__init__()
        if rope.kind not in TABLE_KINDS:
            raise ValueError(f"RoPE kind {rope.kind!r} depends on the sequence length; keep RotaryEmbedding")
        self.rope = rope  # the eager module: source of inv_freq and the reference
        self.cos = self.sin = None
        self._build(length)

    @torch.no_grad()
    def _build(self, length: int) -> None:
        pos = torch.arange(length, device=self.rope.inv_freq.device)[None]  # (1, P)
        cos, sin = self.rope(pos)  # (1, P, d), exactly the eager arithmetic per position
        self.cos, self.sin = cos[0], sin[0]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        top = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if top > self.cos.shape[0]:
            self._build(max(top, 2 * self.cos.shape[0]))
        return self.cos[position_ids], self.sin[position_ids]  # (B, L, d)


@torch.no_grad()
def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Swap the LLM's attention, MLP, linear and RoPE modules of an `InternVLModel` (or `CausalLM`) for fast ones.

    In place, idempotent, eval-only (the fused modules are not meant for training). Returns `model`.
    """
    lm = model.language_model if hasattr(model, "language_model") else model
    decoder = lm.model
    for layer in decoder.layers:
        if isinstance(layer.self_attn, Attention):
            layer.self_attn = FusedAttention(layer.self_attn)
        if isinstance(layer.mlp, MLP):
            layer.mlp = FusedMLP(layer.mlp)
    if isinstance(decoder.rotary, RotaryEmbedding) and decoder.rotary.kind in TABLE_KINDS:
        decoder.rotary = CachedRotary(decoder.rotary)
    for name, m in list(lm.named_modules()):
        if type(m) is nn.Linear:  # float layers only; quantized ones keep their own kernels
            parent, _, leaf = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, leaf, SkinnyLinear.from_linear(m))
    return model.eval()


class StaticKVCache:
    """Preallocated KV cache: per layer (B, KV, max_len, d), written at [length, length + L). Same API as KVCache."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self._len = [0] * num_layers  # per layer: a forward pass updates layers in order

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int) -> "StaticKVCache":
        lm = model.language_model if hasattr(model, "language_model") else model
        c = lm.config
        dtype = lm.model.embed_tokens.weight.dtype
        return cls(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len, dtype, lm.model.embed_tokens.weight.device)

    @property
    def length(self) -> int:
        return self._len[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, n = self._len[layer], k.shape[2]
        if start + n > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full ({start} used, {n} more requested)")
        self.k[layer][:, :, start:start + n] = k
        self.v[layer][:, :, start:start + n] = v
        self._len[layer] = start + n
        return self.k[layer][:, :, :start + n], self.v[layer][:, :, :start + n]  # views, no copy

    def select(self, rows: torch.Tensor) -> None:
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
