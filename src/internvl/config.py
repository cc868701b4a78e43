"""One frozen config for an InternVL chat model, read from either `config.json` layout.

Layouts (INTERNVL.md §10.2, §10.4):
* original ("InternVLChatModel", `model_type: internvl_chat`): `vision_config`, `llm_config`, `template`, ...
* transformers-native ("InternVLForConditionalGeneration", `model_type: internvl`): `vision_config`, `text_config`.

The config stores architecture *names*, so it round-trips through JSON. `to_original_dict()` writes the original
layout (what `save_pretrained` writes); `to_native_dict()` writes the transformers-native one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Families of the released checkpoints (INTERNVL.md §1, §11). Keys are `llm_config.architectures[0]`.
SUPPORTED_LLM_ARCHS = (
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "InternLM2ForCausalLM",
    "InternLM3ForCausalLM",
    "Phi3ForCausalLM",
)
# transformers-native text_config.model_type -> our architecture name
_NATIVE_TEXT_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}
_ARCH_TO_NATIVE_TYPE = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    # The transformers converter maps InternLM2 onto Llama (INTERNVL.md §10.4).
    "InternLM2ForCausalLM": "llama",
    "InternLM3ForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (INTERNVL.md §3.1). Defaults are InternViT-300M-448px."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    norm_type: str = "layer_norm"  # "layer_norm" (300M) or "rms_norm" (6B)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False  # joint q/k RMSNorm over all heads (6B)
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision norm_type {self.norm_type!r} is not supported; use 'layer_norm' or 'rms_norm'")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported; InternViT uses 'gelu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_original(cls, d: dict) -> "VisionConfig":
        return cls(
            hidden_size=d.get("hidden_size", 3200),
            num_layers=d.get("num_hidden_layers", 48),
            num_heads=d.get("num_attention_heads", 25),
            intermediate_size=d.get("intermediate_size", 12800),
            image_size=_side(d.get("image_size", 224)),
            patch_size=_side(d.get("patch_size", 14)),
            norm_type=d.get("norm_type", "rms_norm"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6),
            qkv_bias=d.get("qkv_bias", False),
            qk_normalization=d.get("qk_normalization", True),
            hidden_act=d.get("hidden_act", "gelu"),
        )

    @classmethod
    def from_native(cls, d: dict) -> "VisionConfig":
        return cls(
            hidden_size=d.get("hidden_size", 1024),
            num_layers=d.get("num_hidden_layers", 24),
            num_heads=d.get("num_attention_heads", 16),
            intermediate_size=d.get("intermediate_size", 4096),
            image_size=_side(d.get("image_size", 448)),
            patch_size=_side(d.get("patch_size", 14)),
            norm_type=d.get("norm_type", "layer_norm"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6),
            qkv_bias=d.get("attention_bias", False),
            qk_normalization=d.get("use_qk_norm", False),
            hidden_act=d.get("hidden_act", "gelu"),
        )

    def to_original(self) -> dict:
        return {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": 3,
            "norm_type": self.norm_type,
            "layer_norm_eps": self.layer_norm_eps,
            "qkv_bias": self.qkv_bias,
            "qk_normalization": self.qk_normalization,
            "hidden_act": self.hidden_act,
            "use_flash_attn": False,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        }

    def to_native(self) -> dict:
        return {
            "model_type": "internvl_vision",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "image_size": [self.image_size, self.image_size],
            "patch_size": [self.patch_size, self.patch_size],
            "norm_type": self.norm_type,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_bias": self.qkv_bias,
            "use_qk_norm": self.qk_normalization,
            "hidden_act": self.hidden_act,
            "use_mean_pooling": True,
        }


@dataclass(frozen=True)
class LLMConfig:
    """The decoder, one shape for every family (INTERNVL.md §11). `arch` is `llm_config.architectures[0]`."""

    arch: str = "Qwen2ForCausalLM"
    vocab_size: int = 151674
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    # Read-only after construction. Keys as in the checkpoint: type/rope_type, factor, short_factor, long_factor, ...
    rope_scaling: dict | None = None
    original_max_position_embeddings: int | None = None  # Phi-3 su/yarn scaling
    qkv_bias: bool = False  # Qwen2: True; InternLM3: config `qkv_bias`
    o_bias: bool = False  # InternLM3: config `bias`
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_LLM_ARCHS:
            raise ValueError(
                f"LLM architecture {self.arch!r} is not supported; supported: {', '.join(SUPPORTED_LLM_ARCHS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"LLM hidden_act {self.hidden_act!r} is not supported; the released models use 'silu'")

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return str(rs.get("rope_type", rs.get("type", "default")) or "default")

    @classmethod
    def from_hf(cls, d: dict, arch: str | None = None) -> "LLMConfig":
        """From an HF-style LLM config dict (`llm_config` of the original layout, `text_config` of the native one)."""
        arch = arch or (d.get("architectures") or [None])[0]
        if arch is None:
            raise ValueError("llm config has no `architectures` entry; cannot tell the LLM family")
        if arch not in SUPPORTED_LLM_ARCHS:
            raise ValueError(
                f"LLM architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_LLM_ARCHS)}"
            )
        heads = d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        qkv_bias = {"Qwen2ForCausalLM": True, "InternLM3ForCausalLM": bool(d.get("qkv_bias", False))}.get(
            arch, bool(d.get("attention_bias", False))
        )
        if arch == "InternLM2ForCausalLM" and d.get("bias", False):
            raise ValueError("InternLM2 checkpoints with `bias: true` are not supported (released ones have none)")
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and isinstance(d.get("rope_parameters"), dict):
            # transformers >= 5 folds rope_theta and scaling into `rope_parameters`
            rp = d["rope_parameters"]
            if rp.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        rope_theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rope_scaling=copy.deepcopy(rope_scaling) if rope_scaling else None,
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
            qkv_bias=qkv_bias,
            o_bias=bool(d.get("bias", False)) if arch == "InternLM3ForCausalLM" else False,
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self) -> dict:
        """The original checkpoint's `llm_config` for this family."""
        d: dict[str, Any] = {
            "architectures": [self.arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_scaling": copy.deepcopy(self.rope_scaling),
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        if self.head_dim != self.hidden_size // self.num_heads:
            d["head_dim"] = self.head_dim
        if self.arch == "Qwen2ForCausalLM":
            d.update(model_type="qwen2", use_sliding_window=False)
        elif self.arch == "LlamaForCausalLM":
            d.update(model_type="llama", attention_bias=False)
        elif self.arch == "InternLM2ForCausalLM":
            d.update(model_type="internlm2", bias=False, attn_implementation="eager")
        elif self.arch == "InternLM3ForCausalLM":
            d.update(model_type="internlm3", qkv_bias=self.qkv_bias, bias=self.o_bias, head_dim=self.head_dim)
        elif self.arch == "Phi3ForCausalLM":
            d.update(model_type="phi3", original_max_position_embeddings=self.original_max_position_embeddings)
        return d

    def to_native(self) -> dict:
        """transformers-native `text_config` (InternLM2/3 become Llama, as the transformers converter does)."""
        d = self.to_hf()
        d["model_type"] = _ARCH_TO_NATIVE_TYPE[self.arch]
        d["architectures"] = [
            {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}[d["model_type"]]
        ]
        d["head_dim"] = self.head_dim
        if d["model_type"] == "llama":
            d["attention_bias"] = self.qkv_bias
            for k in ("bias", "qkv_bias", "attn_implementation"):
                d.pop(k, None)
            if self.o_bias:
                raise ValueError("an o_proj bias cannot be expressed in transformers' Llama config")
        return d


@dataclass(frozen=True)
class InternVLConfig:
    """The composite model (INTERNVL.md §10.2)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    template: str = "internvl2_5"
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    force_image_size: int | None = 448
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    system_message: str | None = None  # None: the template's default (INTERNVL.md §7.3)
    # Token id of <IMG_CONTEXT> when the config carries it (native layout); otherwise resolved from the tokenizer.
    image_token_id: int | None = None

    def __post_init__(self):
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version {self.ps_version!r} is not supported; use 'v1' or 'v2'")
        if not (0 < self.downsample_ratio <= 1) or abs(1 / self.downsample_ratio - round(1 / self.downsample_ratio)) > 1e-9:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} must be 1/k for an integer k")
        if not (-self.vision.num_layers <= self.select_layer < 0 or 0 < self.select_layer <= self.vision.num_layers):
            raise ValueError(
                f"select_layer {self.select_layer} is outside the {self.vision.num_layers}-layer vision encoder"
            )

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile: int((image_size // patch_size)^2 * ratio^2) (INTERNVL.md §4)."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    def replace(self, **changes) -> "InternVLConfig":
        return replace(self, **changes)

    # ----------------------------------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, d: dict) -> "InternVLConfig":
        arch = (d.get("architectures") or [None])[0]
        model_type = d.get("model_type")
        if model_type == "internvl_chat" or arch == "InternVLChatModel" or "llm_config" in d:
            return cls._from_original(d)
        if model_type == "internvl" or arch == "InternVLForConditionalGeneration" or "text_config" in d:
            return cls._from_native(d)
        raise ValueError(
            f"config.json describes {arch or model_type!r}, which is not an InternVL chat model; supported: "
            "'InternVLChatModel' (model_type internvl_chat, the OpenGVLab layout) and "
            "'InternVLForConditionalGeneration' (model_type internvl, the transformers-native layout)"
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "InternVLConfig":
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no config.json at {f}")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def _from_original(cls, d: dict) -> "InternVLConfig":
        if "llm_config" not in d or "vision_config" not in d:
            raise ValueError("InternVLChatModel config.json needs both `vision_config` and `llm_config`")
        llm_d = d["llm_config"]
        sm = d.get("system_message")
        return cls(
            vision=VisionConfig.from_original(d["vision_config"]),
            llm=LLMConfig.from_hf(llm_d),
            template=d.get("template") or "internvl2_5",
            downsample_ratio=d.get("downsample_ratio", 0.5),
            # the code default is v1 (INTERNVL.md §4); every released config says v2
            ps_version=d.get("ps_version") or "v1",
            select_layer=d.get("select_layer", -1),
            force_image_size=d.get("force_image_size"),
            dynamic_image_size=d.get("dynamic_image_size", False),
            use_thumbnail=d.get("use_thumbnail", False),
            min_dynamic_patch=d.get("min_dynamic_patch", 1),
            max_dynamic_patch=d.get("max_dynamic_patch", 6),
            # a null system_message means "template default", never the text "None" (INTERNVL.md §7.3)
            system_message=sm if isinstance(sm, str) else None,
        )

    @classmethod
    def _from_native(cls, d: dict) -> "InternVLConfig":
        text = d.get("text_config") or {}
        mt = text.get("model_type", "qwen2")
        if mt not in _NATIVE_TEXT_TYPES:
            raise ValueError(
                f"text_config.model_type {mt!r} is not supported; supported: {', '.join(_NATIVE_TEXT_TYPES)}"
            )
        vis = d.get("vision_config") or {}
        layer = d.get("vision_feature_layer", -1)
        if isinstance(layer, list):
            raise ValueError("vision_feature_layer lists are not supported; InternVL reads a single layer")
        extra = d.get("internvl") or {}  # what we add so native -> original round-trips
        # InternLM2/3 checkpoints converted to native are Llama-shaped; `llm_arch` remembers the original family.
        arch = extra.get("llm_arch") or _NATIVE_TEXT_TYPES[mt]
        return cls(
            vision=VisionConfig.from_native(vis),
            llm=LLMConfig.from_hf(text, arch=arch),
            template=extra.get("template", "internvl2_5"),
            downsample_ratio=d.get("downsample_ratio", 0.5),
            ps_version="v2",  # transformers implements the v2 token order only
            select_layer=layer,
            force_image_size=_side(vis.get("image_size", 448)),
            dynamic_image_size=extra.get("dynamic_image_size", True),
            use_thumbnail=extra.get("use_thumbnail", True),
            min_dynamic_patch=extra.get("min_dynamic_patch", 1),
            max_dynamic_patch=extra.get("max_dynamic_patch", 12),
            system_message=extra.get("system_message") if isinstance(extra.get("system_message"), str) else None,
            image_token_id=d.get("image_token_id"),
        )

    # ----------------------------------------------------------------------------------------- writing
    def to_original_dict(self) -> dict:
        d = {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "vision_config": self.vision.to_original(),
            "llm_config": self.llm.to_hf(),
            "template": self.template,
            "downsample_ratio": self.downsample_ratio,
            "ps_version": self.ps_version,
            "select_layer": self.select_layer,
            "force_image_size": self.force_image_size,
            "dynamic_image_size": self.dynamic_image_size,
            "use_thumbnail": self.use_thumbnail,
            "min_dynamic_patch": self.min_dynamic_patch,
            "max_dynamic_patch": self.max_dynamic_patch,
            "pad2square": False,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "tie_word_embeddings": False,
            "hidden_size": self.llm.hidden_size,
            "torch_dtype": "bfloat16",
        }
        if self.system_message is not None:
            d["system_message"] = self.system_message
        return d

    def to_native_dict(self, image_token_id: int) -> dict:
        if self.ps_version != "v2":
            raise ValueError("transformers' InternVL implements ps_version v2 only; this model uses v1")
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "vision_config": self.vision.to_native(),
            "text_config": self.llm.to_native(),
            "image_token_id": image_token_id,
            "image_seq_length": self.num_image_token,
            "downsample_ratio": self.downsample_ratio,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": self.select_layer,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            # Fields transformers ignores, kept so that native -> original conversion is lossless.
            "internvl": {
                "llm_arch": self.llm.arch,
                "template": self.template,
                "dynamic_image_size": self.dynamic_image_size,
                "use_thumbnail": self.use_thumbnail,
                "min_dynamic_patch": self.min_dynamic_patch,
                "max_dynamic_patch": self.max_dynamic_patch,
                "system_message": self.system_message,
            },
        }


def _side(v) -> int:
    """image_size / patch_size may be an int or a [h, w] pair; InternVL uses squares."""
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"non-square size {v} is not supported; InternVL tiles are square")
        return int(v[0])
    return int(v)
