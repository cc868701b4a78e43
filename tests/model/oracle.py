"""transformers reference models built from *our* modules' weights (the parity oracle).

The weight renaming and the transformers configs are written here from the spec (INTERNVL.md §3, §10.4, §11) and
from transformers' own classes, deliberately *not* with `internvl.checkpoint.names` or `InternVLConfig.to_native_dict`:
the oracle must not inherit a mistake from the code under test. Every builder loads with `strict=True`, so a tensor
that has no counterpart (or a counterpart that stays at its random init) fails loudly.

transformers is the test oracle only; the package never imports it.
"""

from __future__ import annotations

import torch
from transformers import (
    InternVLConfig as HFInternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    InternVLVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from internvl.config import InternVLConfig, LLMConfig, VisionConfig
from internvl.model.internvl import InternVLModel
from internvl.model.llm import CausalLM
from internvl.model.vision import InternVisionModel

ATTN = "eager"  # transformers' eager attention is its readable reference path


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the suite's fp32 tolerance measure)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    d = rel_diff(a, b)
    assert d <= tol, f"{what}: relative max diff {d:.3e} > {tol:.0e}"


# ------------------------------------------------------------------------------------------------ vision
def hf_vision_config(v: VisionConfig) -> dict:
    return dict(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        image_size=[v.image_size, v.image_size],
        patch_size=[v.patch_size, v.patch_size],
        norm_type=v.norm_type,
        layer_norm_eps=v.layer_norm_eps,
        attention_bias=v.qkv_bias,
        use_qk_norm=v.qk_normalization,
        hidden_act="gelu",
        use_mean_pooling=True,  # => no final LayerNorm, as InternViT (§3.3)
        use_mask_token=False,
    )


_VISION_RENAMES = (  # ours (= original checkpoint names, §10.3) -> transformers (§10.4)
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("encoder.layers.", "encoder.layer."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
)


def vision_state_to_hf(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if ".attn.qkv." in name:  # fused rows [q | k | v], each C wide (§3.4)
            for part, x in zip("qkv", t.split(hidden, dim=0)):
                n = name.replace("encoder.layers.", "encoder.layer.").replace(".attn.qkv.", f".attention.{part}_proj.")
                out[n] = x.clone()
            continue
        for old, new in _VISION_RENAMES:
            name = name.replace(old, new)
        out[name] = t.clone()
    return out


def hf_vision_model(ours: InternVisionModel) -> InternVLVisionModel:
    hf_cfg = InternVLVisionConfig(**hf_vision_config(ours.config))
    hf_cfg._attn_implementation = ATTN
    hf = InternVLVisionModel(hf_cfg).float().eval()
    hf.load_state_dict(vision_state_to_hf(ours.state_dict(), ours.config.hidden_size), strict=True)
    return hf


# ------------------------------------------------------------------------------------------------ LLM
def _common_llm_kwargs(c: LLMConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=False,  # never tied (§10.3, §20 item 21)
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def hf_text_config(c: LLMConfig, rope: dict | None = "auto", rope_theta: float | None = None) -> dict:
    """A transformers text config dict (with `model_type`) for our LLM config.

    rope: the transformers `rope_parameters` without `rope_theta` (None = plain RoPE). "auto" derives it:
    * InternLM2 dynamic NTK -> None. Up to max_position_embeddings the reference is plain RoPE (§11.2); beyond it the
      reference is stateful, which transformers' dynamic rope is not, so long prompts are tested at the rope level.
    * Qwen2 -> None (the reference pin ignores Qwen2's rope_scaling, §11.3).
    * Phi-3 'su' -> transformers' 'longrope' (its new name; Phi3Config renames 'su' itself too).
    * anything else -> passed through (Llama/InternLM3 'dynamic', 'linear', 'llama3').
    rope_theta: overrides the config's base (e.g. to express a grown InternLM2 NTK base as plain RoPE).
    """
    kw = _common_llm_kwargs(c)
    if rope == "auto":
        rs = dict(c.rope_scaling or {})
        kind = rs.pop("rope_type", rs.pop("type", "default"))
        rs.pop("type", None)
        if kind == "default" or c.arch in ("Qwen2ForCausalLM", "InternLM2ForCausalLM"):
            rope = None
        elif kind in ("su", "longrope"):
            rope = dict(rope_type="longrope", short_factor=list(rs["short_factor"]),
                        long_factor=list(rs["long_factor"]))
        else:
            rope = dict(rope_type=kind, **rs)
    params = dict(rope_type="default") if rope is None else dict(rope)
    params["rope_theta"] = c.rope_theta if rope_theta is None else rope_theta
    kw["rope_parameters"] = params
    if c.arch == "Qwen2ForCausalLM":
        assert c.head_dim == c.hidden_size // c.num_heads, "transformers' Qwen2 derives head_dim from hidden/heads"
        return dict(model_type="qwen2", use_sliding_window=False, **kw)
    if c.arch == "Phi3ForCausalLM":
        assert c.head_dim == c.hidden_size // c.num_heads, "transformers' Phi3 derives head_dim from hidden/heads"
        return dict(model_type="phi3", original_max_position_embeddings=c.original_max_position_embeddings, **kw)
    # Llama, and InternLM2/InternLM3 rewritten as Llama (as the transformers converter does, §10.4)
    assert not c.o_bias, "transformers' Llama has no o_proj-only bias"
    return dict(model_type="llama", head_dim=c.head_dim, attention_bias=c.qkv_bias, mlp_bias=False, **kw)


_HF_LLM = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
           "phi3": (Phi3Config, Phi3ForCausalLM)}


def llm_state_to_hf(state: dict[str, torch.Tensor], c: LLMConfig) -> dict[str, torch.Tensor]:
    """Our Llama-layout LLM state -> the transformers class's names (Phi-3: fused qkv_proj and gate_up_proj)."""
    state = {k: v.clone() for k, v in state.items()}
    if c.arch != "Phi3ForCausalLM":
        return state  # Qwen2/Llama names already; InternLM2/3 are fed to Llama unfused
    out = {}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        # transformers' Phi3 slices qkv_proj output contiguously as [Q (H d) | K (KV d) | V (KV d)] (§11.4)
        out[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [state.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"], dim=0)
        # gate_up_proj output chunks: first half gate, second half up (§11.4)
        out[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [state.pop(p + "mlp.gate_proj.weight"), state.pop(p + "mlp.up_proj.weight")], dim=0)
    out.update(state)
    return out


def hf_causal_lm(ours: CausalLM, rope: dict | None = "auto", rope_theta: float | None = None):
    """transformers Llama/Qwen2/Phi3 ForCausalLM (fp32, eval, eager attention) with `ours`' weights."""
    d = hf_text_config(ours.config, rope, rope_theta)
    cfg_cls, model_cls = _HF_LLM[d.pop("model_type")]
    hf_cfg = cfg_cls(**d)
    hf_cfg._attn_implementation = ATTN
    hf = model_cls(hf_cfg).float().eval()
    hf.load_state_dict(llm_state_to_hf(ours.state_dict(), ours.config), strict=True)
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    return hf


# ------------------------------------------------------------------------------------------------ InternVL
_PROJECTOR = {"mlp1.0.": "model.multi_modal_projector.layer_norm.",
              "mlp1.1.": "model.multi_modal_projector.linear_1.",
              "mlp1.3.": "model.multi_modal_projector.linear_2."}


def hf_internvl(ours: InternVLModel, image_token_id: int | None = None) -> InternVLForConditionalGeneration:
    cfg: InternVLConfig = ours.config
    assert cfg.ps_version == "v2", "transformers implements the v2 token order only"
    text = hf_text_config(cfg.llm)
    hf_cfg = HFInternVLConfig(
        vision_config=hf_vision_config(cfg.vision),
        text_config=text,
        image_token_id=image_token_id if image_token_id is not None else ours.img_context_token_id,
        image_seq_length=cfg.num_image_token,
        downsample_ratio=cfg.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.select_layer,
        vision_feature_select_strategy="default",  # drop the class token (§3.6)
        tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = ATTN
    hf_cfg.text_config._attn_implementation = ATTN
    hf_cfg.vision_config._attn_implementation = ATTN
    hf = InternVLForConditionalGeneration(hf_cfg).float().eval()
    state = {}
    sd = ours.state_dict()
    vis = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    for k, v in vision_state_to_hf(vis, cfg.vision.hidden_size).items():
        state["model.vision_tower." + k] = v
    for k, v in sd.items():
        for old, new in _PROJECTOR.items():
            if k.startswith(old):
                state[new + k[len(old):]] = v.clone()
    llm = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    for k, v in llm_state_to_hf(llm, cfg.llm).items():
        state[("lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.")
              else "model.language_model." + k[len("model."):]] = v
    hf.load_state_dict(state, strict=True)
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()
    return hf


def hf_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch as transformers' generate computes them: cumsum(mask) - 1, pads -> 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)
