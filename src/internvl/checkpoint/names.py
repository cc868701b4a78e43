"""Tensor-name and layout maps between the three layouts we meet. Spec: INTERNVL.md §10.3, §10.4, §11.2, §11.4.

* original: what OpenGVLab checkpoints store (family-specific LLM names, fused InternLM2 `wqkv`, Phi-3 fused
  `qkv_proj` / `gate_up_proj`, fused ViT `attn.qkv`).
* internal: our modules' names: the original names for `vision_model.*` / `mlp1.*`, one Llama-style LLM layout.
* native: transformers' `InternVLForConditionalGeneration` (split ViT q/k/v, InternLM2 rewritten as Llama; Phi-3
  keeps its fused projections, as transformers' Phi3 does).

Every function here maps one tensor (or one layer's group) at a time so the loader can stream shards.
"""

from __future__ import annotations

import re

import torch

from internvl.config import InternVLConfig

_INTERNLM2_RENAMES = (
    ("language_model.model.tok_embeddings.", "language_model.model.embed_tokens."),
    ("language_model.output.", "language_model.lm_head."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


# --------------------------------------------------------------------------------------------- InternLM2 wqkv
def split_internlm2_wqkv(w: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """((H + 2KV) d, D) grouped per kv head as [q x G, k, v] -> q (H d, D), k (KV d, D), v (KV d, D) (§11.2)."""
    g = heads // kv_heads
    grouped = w.reshape(kv_heads, g + 2, head_dim, w.shape[-1])  # (KV, G+2, d, D)
    q = grouped[:, :g].reshape(heads * head_dim, -1)  # query head index = kv * G + j
    k = grouped[:, g].reshape(kv_heads * head_dim, -1)
    v = grouped[:, g + 1].reshape(kv_heads * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_internlm2_wqkv(q, k, v, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    g = heads // kv_heads
    d = q.shape[-1]
    grouped = torch.cat(
        [q.reshape(kv_heads, g, head_dim, d), k.reshape(kv_heads, 1, head_dim, d), v.reshape(kv_heads, 1, head_dim, d)],
        dim=1,
    )  # (KV, G+2, d, D)
    return grouped.reshape(-1, d).contiguous()


# --------------------------------------------------------------------------------------------- original -> internal
def original_to_internal(name: str, t: torch.Tensor, cfg: InternVLConfig) -> list[tuple[str, torch.Tensor]]:
    """One original-layout tensor -> the internal tensors it becomes (usually one)."""
    arch = cfg.llm.arch
    if not name.startswith("language_model."):
        return [(name, t)]
    if arch == "InternLM2ForCausalLM":
        if name.endswith(".attention.wqkv.weight"):
            q, k, v = split_internlm2_wqkv(t, cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim)
            base = name[: -len("attention.wqkv.weight")] + "self_attn."
            return [(base + "q_proj.weight", q), (base + "k_proj.weight", k), (base + "v_proj.weight", v)]
        for old, new in _INTERNLM2_RENAMES:
            name = name.replace(old, new)
        return [(name, t)]
    if arch == "Phi3ForCausalLM":
        if name.endswith(".self_attn.qkv_proj.weight"):
            hq = cfg.llm.num_heads * cfg.llm.head_dim
            hk = cfg.llm.num_kv_heads * cfg.llm.head_dim
            q, k, v = t.split([hq, hk, hk], dim=0)  # contiguous [Q | K | V] (§11.4)
            base = name[: -len("qkv_proj.weight")]
            return [(base + "q_proj.weight", q.contiguous()), (base + "k_proj.weight", k.contiguous()),
                    (base + "v_proj.weight", v.contiguous())]
        if name.endswith(".mlp.gate_up_proj.weight"):
            gate, up = t.chunk(2, dim=0)  # first half gate, second half up
            base = name[: -len("gate_up_proj.weight")]
            return [(base + "gate_proj.weight", gate.contiguous()), (base + "up_proj.weight", up.contiguous())]
    return [(name, t)]


def internal_to_original(state: dict[str, torch.Tensor], cfg: InternVLConfig) -> dict[str, torch.Tensor]:
    """The whole internal state dict -> original names and fused layouts (inverse of `original_to_internal`)."""
    arch = cfg.llm.arch
    if arch not in ("InternLM2ForCausalLM", "Phi3ForCausalLM"):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    L = cfg.llm
    for name, t in state.items():
        m = re.match(r"(language_model\.model\.layers\.\d+\.)(self_attn|mlp)\.(\w+)\.weight$", name)
        if m and m.group(3) in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            base = m.group(1)
            if m.group(3) == "q_proj":
                q, k, v = (state[f"{base}self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj"))
                if arch == "InternLM2ForCausalLM":
                    out[f"{base}attention.wqkv.weight"] = fuse_internlm2_wqkv(q, k, v, L.num_heads, L.num_kv_heads, L.head_dim)
                else:
                    out[f"{base}self_attn.qkv_proj.weight"] = torch.cat([q, k, v], dim=0)
            elif m.group(3) == "gate_proj":
                gate, up = state[f"{base}mlp.gate_proj.weight"], state[f"{base}mlp.up_proj.weight"]
                if arch == "InternLM2ForCausalLM":
                    out[f"{base}feed_forward.w1.weight"] = gate
                    out[f"{base}feed_forward.w3.weight"] = up
                else:
                    out[f"{base}mlp.gate_up_proj.weight"] = torch.cat([gate, up], dim=0)
            continue
        if arch == "InternLM2ForCausalLM":
            for old, new in _INTERNLM2_RENAMES:
                name = name.replace(new, old)
        out[name] = t
    return out


# --------------------------------------------------------------------------------------------- original <-> native
_VISION_RENAMES = (  # original fragment -> native fragment (§10.4), applied after the prefix swap
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding", "embeddings.patch_embeddings.projection"),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
)
_PROJECTOR = {"mlp1.0.": "model.multi_modal_projector.layer_norm.", "mlp1.1.": "model.multi_modal_projector.linear_1.",
              "mlp1.3.": "model.multi_modal_projector.linear_2."}


def original_to_native(name: str, t: torch.Tensor, cfg: InternVLConfig) -> list[tuple[str, torch.Tensor]]:
    if name.startswith("vision_model."):
        n = "model.vision_tower." + name[len("vision_model."):].replace(".layers.", ".layer.")
        if ".attn.qkv." in n:
            q, k, v = t.chunk(3, dim=0)  # [q | k | v] rows (§3.4)
            return [(n.replace(".attn.qkv.", f".attention.{p}_proj."), x.contiguous()) for p, x in zip("qkv", (q, k, v))]
        for old, new in _VISION_RENAMES:
            n = n.replace(old, new)
        return [(n, t)]
    for old, new in _PROJECTOR.items():
        if name.startswith(old):
            return [(new + name[len(old):], t)]
    if name.startswith("language_model."):
        # InternLM2 becomes Llama (split wqkv, renamed); other families keep their own names
        pairs = original_to_internal(name, t, cfg) if cfg.llm.arch == "InternLM2ForCausalLM" else [(name, t)]
        out = []
        for n, x in pairs:
            if n.startswith("language_model.model."):
                out.append(("model.language_model." + n[len("language_model.model."):], x))
            elif n.startswith("language_model.lm_head."):
                out.append(("lm_head." + n[len("language_model.lm_head."):], x))
            else:
                raise ValueError(f"tensor {name!r} has no transformers-native name")
        return out
    raise ValueError(f"tensor {name!r} is not part of an InternVL checkpoint (expected vision_model., mlp1. or language_model.)")


def native_to_original(state: dict[str, torch.Tensor], cfg: InternVLConfig) -> dict[str, torch.Tensor]:
    """A whole native state dict -> original layout (inverse of `original_to_native`)."""
    out: dict[str, torch.Tensor] = {}
    llm: dict[str, torch.Tensor] = {}
    inv_proj = {v: k for k, v in _PROJECTOR.items()}
    for name, t in state.items():
        if name.startswith("model.vision_tower."):
            n = "vision_model." + name[len("model.vision_tower."):].replace(".layer.", ".layers.")
            m = re.match(r"(.*)\.attention\.([qkv])_proj\.(weight|bias)$", n)
            if m:
                if m.group(2) == "q":
                    parts = [state[name.replace(".attention.q_proj.", f".attention.{p}_proj.")] for p in "qkv"]
                    out[f"{m.group(1)}.attn.qkv.{m.group(3)}"] = torch.cat(parts, dim=0)
                continue
            for old, new in _VISION_RENAMES:
                n = n.replace(new, old)
            out[n] = t
        elif any(name.startswith(p) for p in inv_proj):
            p = next(p for p in inv_proj if name.startswith(p))
            out[inv_proj[p] + name[len(p):]] = t
        elif name.startswith("model.language_model."):
            llm["language_model.model." + name[len("model.language_model."):]] = t
        elif name.startswith("lm_head."):
            llm["language_model.lm_head." + name[len("lm_head."):]] = t
        else:
            raise ValueError(f"tensor {name!r} is not part of a transformers-native InternVL checkpoint")
    if cfg.llm.arch == "InternLM2ForCausalLM":
        llm = internal_to_original(llm, cfg)
    out.update(llm)
    return out
