"""LoRA as a model transform: add adapters to the LLM and/or InternViT, merge them back, and merge saved adapters.

Spec: INTERNVL.md §14 (recipe: `--use_llm_lora 16`, alpha = 2 * rank, dropout 0.05, ViT and MLP frozen; target
modules per family). The reference wraps the original module names (InternLM2 `attention.wqkv`, Phi-3 `qkv_proj`,
...); our loader splits fused projections, so the targets here are OUR internal names, which cover the same weights:

* LLM (every family): `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`
* InternViT: `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`

Adapters are injected with peft's `inject_adapter_in_model` on the submodule (`language_model` / `vision_model`),
so module paths stay ours: `...self_attn.q_proj` becomes a LoRA layer holding `base_layer` (the original Linear),
`lora_A.default` and `lora_B.default`. As in peft, adding LoRA to a component freezes that component's base weights.

Saved adapters (`merge_lora: false` in training) are two files next to an original-layout base checkpoint:
`adapter_config.json` (ranks, alphas, dropout, targets) and `adapter_model.safetensors` (the lora_A/lora_B tensors
under our internal names). `internvl merge-lora SRC DST` folds them in and writes a plain checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

LLM_LORA_TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
VISION_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "internvl-lora-v1"


def _lora_layer_cls():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def apply_lora(
    model: nn.Module,
    llm_rank: int = 0,
    vision_rank: int = 0,
    alpha: float | None = None,
    dropout: float = 0.05,
) -> nn.Module:
    """Add LoRA adapters in place (rank 0 = none for that component) and return `model`.

    alpha None = 2 * rank of each component. The base weights of an adapted component are frozen; other components
    keep their `requires_grad`. Calling it twice on the same component is an error.
    """
    from peft import LoraConfig, inject_adapter_in_model

    for name, rank, targets, sub in (
        ("llm", llm_rank, LLM_LORA_TARGETS, model.language_model),
        ("vision", vision_rank, VISION_LORA_TARGETS, model.vision_model),
    ):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"{name} LoRA rank must be an integer >= 0, got {rank!r}")
        if rank == 0:
            continue
        if has_lora(sub):
            raise ValueError(f"the {name} part of the model already has LoRA adapters")
        config = LoraConfig(
            r=rank,
            lora_alpha=2.0 * rank if alpha is None else float(alpha),
            lora_dropout=float(dropout),
            target_modules=list(targets),
            bias="none",
        )
        inject_adapter_in_model(config, sub)  # also marks only the adapters of `sub` as trainable
        for m in sub.modules():
            if isinstance(m, _lora_layer_cls()):
                m.train(sub.training)  # new modules start in train mode; keep an eval model's dropout off
    return model


def has_lora(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no adapter can exist before peft is imported (and importing it takes seconds)
        return False
    layer_cls = _lora_layer_cls()
    return any(isinstance(m, layer_cls) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (names contain `lora_`), detached on CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def _replace_lora_layers(model: nn.Module, merge: bool) -> int:
    if "peft" not in sys.modules:
        return 0
    layer_cls = _lora_layer_cls()
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_cls)]
    for name, module in found:
        if merge:
            module.merge()  # W <- W + (alpha / r) * B @ A, in the base layer's dtype
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, module.get_base_layer())
    return len(found)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear and put the plain Linear back (names are then checkpoint names).

    The merged base weights keep `requires_grad` False (they were frozen while the adapter trained).
    """
    _replace_lora_layers(model, merge=True)
    return model


def strip_lora(model: nn.Module) -> nn.Module:
    """Remove adapters without merging (the base model as it was before `apply_lora`)."""
    _replace_lora_layers(model, merge=False)
    return model


# ------------------------------------------------------------------------------------------------ adapter files
def save_adapter(model_or_tensors: nn.Module | dict, out_dir: str | Path, llm_rank: int, vision_rank: int,
                 alpha: float | None, dropout: float) -> None:
    """Write adapter_config.json + adapter_model.safetensors into an existing directory.

    Accepts the adapted model or the dict `lora_state_dict(model)` returned (to save after stripping the model).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = model_or_tensors if isinstance(model_or_tensors, dict) else lora_state_dict(model_or_tensors)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "format": ADAPTER_FORMAT,
        "llm_rank": llm_rank,
        "vision_rank": vision_rank,
        "lora_alpha": alpha,  # null = 2 * rank per component
        "lora_dropout": dropout,
        "llm_target_modules": list(LLM_LORA_TARGETS) if llm_rank else [],
        "vision_target_modules": list(VISION_LORA_TARGETS) if vision_rank else [],
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_adapter(model: nn.Module, src_dir: str | Path) -> nn.Module:
    """Apply the adapters described in `src_dir` to `model` and load their weights (names must match exactly)."""
    from safetensors.torch import load_file

    src = Path(src_dir)
    cfg_file, weights_file = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{src} holds no LoRA adapter (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; a final model saved "
            "with merge_lora: false has them)"
        )
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{cfg_file} has format {config.get('format')!r}; expected {ADAPTER_FORMAT!r}")
    apply_lora(model, int(config["llm_rank"]), int(config["vision_rank"]), config.get("lora_alpha"),
               float(config.get("lora_dropout", 0.0)))
    saved = load_file(str(weights_file))
    expected = set(lora_state_dict(model))
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"{weights_file} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    target = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in saved.items():
            target[name].copy_(t)
    return model


def merge_lora_checkpoint(src_dir: str | Path, dst_dir: str | Path, dtype: str | None = None,
                          overwrite: bool = False) -> Path:
    """Base checkpoint + adapter files in `src_dir` -> merged original-layout checkpoint in `dst_dir` (atomic).

    The merge runs in float32; dtype None writes the base checkpoint's dtype. Tokenizer files are copied.
    """
    from internvl.api.model import InternVLChatModel
    from internvl.checkpoint.loader import checkpoint_dtype, read_config_dict
    from internvl.checkpoint.saver import atomic_directory, copy_tokenizer_files, save_pretrained

    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{src} has no {ADAPTER_CONFIG}; nothing to merge")
    out_dtype = dtype or checkpoint_dtype(read_config_dict(src))
    model = InternVLChatModel.from_pretrained(src, torch_dtype=torch.float32)
    load_adapter(model, src)
    merge_lora(model)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        save_pretrained(model, tmp, dtype=out_dtype, overwrite=True)
        copy_tokenizer_files(src, tmp)
    return dst


def main_merge(argv: list[str] | None = None) -> int:
    """`internvl merge-lora SRC DST [--dtype bf16] [--overwrite]`."""
    parser = argparse.ArgumentParser(
        prog="internvl merge-lora",
        description="Merge LoRA adapters (adapter_config.json + adapter_model.safetensors) into their base "
                    "checkpoint and write a plain original-layout checkpoint.",
    )
    parser.add_argument("src", help="directory with the base checkpoint and the adapter files")
    parser.add_argument("dst", help="output directory (must not exist or be empty unless --overwrite)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "float32", "bfloat16", "fp16", "float16"],
                        help="dtype of the written weights (default: the base checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    args = parser.parse_args(argv)
    try:
        out = merge_lora_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, OSError) as e:
        print(f"internvl merge-lora: error: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


__all__ = [
    "LLM_LORA_TARGETS", "VISION_LORA_TARGETS", "apply_lora", "merge_lora", "strip_lora", "has_lora",
    "lora_state_dict", "save_adapter", "load_adapter", "merge_lora_checkpoint", "main_merge",
]
