"""Tiny random InternVL configs and models for tests (fp32, CPU). Shared by the whole test suite."""

from __future__ import annotations

import torch

from internvl.config import InternVLConfig, LLMConfig, VisionConfig

# 448 tiles would make every test slow; 56-pixel tiles keep the real 32x32 -> 16x16 shape logic at 4x4 -> 2x2.
TINY_IMAGE = 56


def tiny_vision(kind: str = "300m", image_size: int = TINY_IMAGE) -> VisionConfig:
    if kind == "300m":  # LayerNorm, qkv bias, no qk-norm
        return VisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=image_size,
                            norm_type="layer_norm", qkv_bias=True, qk_normalization=False)
    if kind == "6b":  # RMSNorm, no qkv bias, joint q/k RMSNorm
        return VisionConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, image_size=image_size,
                            norm_type="rms_norm", qkv_bias=False, qk_normalization=True)
    raise ValueError(kind)


LLM_ARCHS = ("Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM2ForCausalLM", "InternLM3ForCausalLM", "Phi3ForCausalLM")


def tiny_llm(arch: str = "Qwen2ForCausalLM", vocab: int = 128, **over) -> LLMConfig:
    kw = dict(arch=arch, vocab_size=vocab, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=12, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
              qkv_bias=arch == "Qwen2ForCausalLM", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "InternLM3ForCausalLM":
        kw.update(head_dim=16, qkv_bias=False)  # head_dim != hidden/heads, as InternLM3 allows
    if arch == "Phi3ForCausalLM":
        kw.update(num_kv_heads=4, max_position_embeddings=1024, original_max_position_embeddings=256,
                  rope_scaling={"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                "long_factor": [2.0 + 0.5 * i for i in range(6)]})
    if arch == "InternLM2ForCausalLM":
        kw.update(rope_scaling={"type": "dynamic", "factor": 2.0})
    kw.update(over)
    return LLMConfig(**kw)


def tiny_config(arch: str = "Qwen2ForCausalLM", vit: str = "300m", image_token_id: int = 120, **over) -> InternVLConfig:
    kw = dict(vision=tiny_vision(vit), llm=tiny_llm(arch), template="internvl2_5", force_image_size=TINY_IMAGE,
              image_token_id=image_token_id, max_dynamic_patch=12, dynamic_image_size=True, use_thumbnail=True)
    kw.update(over)
    return InternVLConfig(**kw)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random (norm weights and layer scales around 1), so no term can hide behind a default."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if p.ndim == 1 and ("norm" in name or name.endswith((".ls1", ".ls2")) or "mlp1.0" in name):
            p.copy_(1.0 + noise)
        else:
            p.copy_(noise)
    return module
