"""`TrainConfig`: every knob of `internvl train`, one frozen dataclass (the YAML schema and the CLI flags).

Spec: INTERNVL.md §14 (recipes: freezing, LoRA rank/alpha, learning rates, packing, loss reduction), §16 (MPO).
Documented for users in docs/TRAINING.md; keep the two in sync (tests/training/test_trainer.py checks that every
field is mentioned there).

`load_train_config(yaml_path, overrides)` reads a YAML mapping, applies command-line overrides on top and validates
the result. Unknown keys are errors that list the accepted ones; values are checked for type and range here, so a
typo fails before a model is built.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("fp32", "bf16")
LOSS_REDUCTIONS = ("token", "sample", "square")  # INTERNVL.md §14.2
OBJECTIVES = ("sft", "mpo")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Field comments are the user documentation (mirrored in docs/TRAINING.md)."""

    # ---------------------------------------------------------------- what to train, on what, where to write
    model: str | None = None  # checkpoint directory (either layout) or hub id; None = build from `model_config`
    model_config: dict | None = None  # original-layout config.json contents, for from-scratch training (`model` None)
    tokenizer: str | None = None  # tokenizer directory; None = the `model` directory
    meta_path: str = ""  # meta JSON of the training data (INTERNVL.md §12.1)
    output_dir: str = ""  # checkpoints, train_log.jsonl and the final model (`<output_dir>/final`) go here
    template: str | None = None  # conversation template override; None = the model config's `template`
    objective: str = "sft"  # "sft" (supervised fine-tuning) or "mpo" (preference optimization, INTERNVL.md §16)

    # ---------------------------------------------------------------- which weights train
    freeze_vision: bool = False  # InternViT frozen (InternVL3-1B 2nd fine-tune recipe)
    freeze_projector: bool = False  # mlp1 frozen
    freeze_llm: bool = False  # language model frozen
    use_llm_lora: int = 0  # LoRA rank on the LLM's q/k/v/o/gate/up/down projections; 0 = off; freezes the LLM base
    use_vision_lora: int = 0  # LoRA rank on the ViT's attn.qkv/attn.proj/mlp.fc1/mlp.fc2; 0 = off; freezes the ViT base
    lora_alpha: float | None = None  # LoRA alpha; None = 2 * rank (the recipes: rank 16, alpha 32)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    merge_lora: bool = True  # merge adapters into the final model; false = base + adapter files (`internvl merge-lora`)

    # ---------------------------------------------------------------- optimizer and schedule
    lr: float = 4e-5  # peak learning rate (InternVL2.5 stage-2 recipe)
    lr_vision: float | None = None  # InternViT learning rate; None = `lr`
    lr_projector: float | None = None  # mlp1 learning rate; None = `lr`
    lr_llm: float | None = None  # language model learning rate; None = `lr`
    weight_decay: float = 0.05  # AdamW decay for matrices; biases, norms, ls1/ls2 and 1-D params get none
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03  # linear warm-up over ceil(ratio * total steps) ...
    warmup_steps: int | None = None  # ... or exactly this many steps (wins over warmup_ratio)
    max_steps: int | None = None  # optimizer steps; wins over num_epochs (required with use_packed_ds)
    num_epochs: int = 1  # passes over the data when max_steps is None
    per_device_batch_size: int = 1  # samples per micro-batch per process (packed mode: 1 pack)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # gradient clipping (global L2 norm); None = off
    seed: int = 42  # model init (from scratch), data order, dropout
    dtype: str = "fp32"  # "fp32", or "bf16" autocast around forward passes (weights and optimizer stay fp32)
    gradient_checkpointing: bool = False  # recompute ViT and LLM blocks in the backward pass

    # ---------------------------------------------------------------- data
    max_seq_length: int = 8192  # tokens per sample after truncation (model_max_length)
    max_dynamic_patch: int | None = None  # tile limit per image; None = the model config's max_dynamic_patch
    use_packed_ds: bool = False  # pack several samples into one sequence (INTERNVL.md §14.1)
    max_packed_tokens: int = 8192  # token budget of one pack
    max_packed_tiles: int = 40  # tile budget of one pack (num_images_expected)
    loss_reduction: str = "token"  # packed-mode per-sample weights: "token", "sample" (1/x) or "square" (1/sqrt x)
    skip_bad_records: bool = False  # replace unreadable samples instead of failing (counted and reported)
    num_workers: int = 0  # DataLoader worker processes

    # ---------------------------------------------------------------- MPO (objective: mpo), INTERNVL.md §16
    mpo_beta: float = 0.1  # DPO/BCO temperature
    mpo_preference_weight: float = 0.8  # w_p, sigmoid (DPO) loss weight
    mpo_quality_weight: float = 0.2  # w_q, BCO-pair loss weight
    mpo_generation_weight: float = 1.0  # alpha, SFT loss weight on the chosen response

    # ---------------------------------------------------------------- checkpoints, logging, parallelism
    save_steps: int = 500  # write output_dir/checkpoint-{step} every this many optimizer steps; 0 = never
    save_total_limit: int | None = 2  # keep at most this many checkpoints (oldest removed); None = keep all
    save_dtype: str | None = None  # dtype of the final model: "fp32", "bf16"; None = the training weights' (fp32)
    log_steps: int = 10  # progress line on stderr every this many steps (train_log.jsonl gets every step)
    resume: bool = False  # continue from the latest complete checkpoint in output_dir
    device: str = "auto"  # "auto" (cuda:<local rank> when available, else cpu), "cpu" or "cuda"
    fsdp: bool = False  # shard weights/gradients/optimizer state with FSDP instead of DDP (multi-process runs)

    def __post_init__(self):
        _validate(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --------------------------------------------------------------------- derived values
    def group_lr(self, group: str) -> float:
        """Learning rate of "vision", "projector" or "llm"."""
        value = {"vision": self.lr_vision, "projector": self.lr_projector, "llm": self.lr_llm}[group]
        return self.lr if value is None else value

    def lora_alpha_for(self, rank: int) -> float:
        return 2.0 * rank if self.lora_alpha is None else float(self.lora_alpha)

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return min(math.ceil(self.warmup_ratio * total_steps), total_steps)


def accepted_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


# ------------------------------------------------------------------------------------------------ validation
def _validate(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ValueError(f"config key {f.name!r} must be {_type_name(hints[f.name])}, got {value!r}")
    if cfg.model is None and cfg.model_config is None:
        raise ValueError("set `model` (a checkpoint to fine-tune) or `model_config` (a config to train from scratch)")
    if cfg.model is not None and cfg.model_config is not None:
        raise ValueError("set only one of `model` and `model_config`")
    if not cfg.meta_path:
        raise ValueError("`meta_path` (the meta JSON describing the training data) is required")
    if not cfg.output_dir:
        raise ValueError("`output_dir` is required")
    _choice("dtype", cfg.dtype, DTYPES)
    _choice("loss_reduction", cfg.loss_reduction, LOSS_REDUCTIONS)
    _choice("objective", cfg.objective, OBJECTIVES)
    if cfg.save_dtype is not None:
        _choice("save_dtype", cfg.save_dtype, DTYPES)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {cfg.device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    for name in ("per_device_batch_size", "grad_accum_steps", "num_epochs", "max_seq_length", "max_packed_tokens",
                 "max_packed_tiles", "log_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("use_llm_lora", "use_vision_lora", "save_steps", "num_workers", "seed"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("max_steps", "save_total_limit", "max_dynamic_patch"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1 (or null), got {getattr(cfg, name)}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    for name in ("lr", "lr_vision", "lr_projector", "lr_llm", "weight_decay", "mpo_beta"):
        v = getattr(cfg, name)
        if v is not None and v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0 (or null to disable clipping), got {cfg.max_grad_norm}")
    if cfg.use_packed_ds:
        if cfg.max_steps is None:
            raise ValueError("use_packed_ds needs max_steps: the number of packs per epoch is not known in advance")
        if cfg.per_device_batch_size != 1:
            raise ValueError("use_packed_ds packs samples into one sequence per micro-batch; "
                             f"set per_device_batch_size to 1 (got {cfg.per_device_batch_size})")
        if cfg.objective != "sft":
            raise ValueError("use_packed_ds is supported for objective 'sft' only")
        if cfg.max_seq_length > cfg.max_packed_tokens:
            raise ValueError(f"use_packed_ds needs max_seq_length ({cfg.max_seq_length}) <= max_packed_tokens "
                             f"({cfg.max_packed_tokens}): a sample must fit in one pack")
    if cfg.freeze_vision and cfg.freeze_projector and cfg.freeze_llm and not (cfg.use_llm_lora or cfg.use_vision_lora):
        raise ValueError("every part of the model is frozen and no LoRA is enabled: nothing would train")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not supported; use one of {', '.join(map(repr, choices))}")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return hint.__name__


# ------------------------------------------------------------------------------------------------ loading
def _parse_override(key: str, raw: Any, hint: Any) -> Any:
    """Command-line values arrive as strings; read them as YAML scalars ("true", "1e-5", "null") when typed so."""
    if not isinstance(raw, str) or hint is str:
        return raw
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot read the value {raw!r} for {key!r}: {e}") from None
    return value


def check_keys(keys, where: str) -> None:
    unknown = sorted(set(keys) - set(accepted_keys()))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(map(repr, unknown))} in {where}; accepted keys: "
            f"{', '.join(accepted_keys())}"
        )


def load_train_config(yaml_path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML mapping of TrainConfig keys, apply `overrides` (command-line values win) and validate.

    String override values are parsed as YAML scalars, so `{"lr": "1e-5", "freeze_vision": "true"}` works.
    Relative paths in the file (`model`, `tokenizer`, `meta_path`, `output_dir`) stay relative to the working
    directory, as with the reference shell recipes.
    """
    import yaml

    data: dict = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
        check_keys(loaded, str(path))
        data.update(loaded)
    overrides = dict(overrides or {})
    check_keys(overrides, "the command-line overrides")
    hints = typing.get_type_hints(TrainConfig)
    for key, raw in overrides.items():
        data[key] = _parse_override(key, raw, hints[key])
    # YAML reads 1e-5 as a string (YAML 1.1 needs a dot: 1.0e-5); accept it for float fields.
    for key, value in list(data.items()):
        if isinstance(value, str) and _is_float_field(hints[key]):
            try:
                data[key] = float(value)
            except ValueError:
                pass
    return TrainConfig(**data)


def parse_overrides(words: list[str]) -> dict[str, str | bool]:
    """`--key value`, `--key=value`, and bare `--flag` (true) for boolean keys; dashes in keys become underscores."""
    bool_keys = {k for k, hint in typing.get_type_hints(TrainConfig).items() if hint is bool}
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or word == "--":
            raise ValueError(f"unexpected argument {word!r}; overrides look like --key value")
        key, eq, value = word[2:].partition("=")
        key = key.replace("-", "_")
        if key not in accepted_keys():
            raise ValueError(f"unknown config key {key!r}; accepted keys: {', '.join(accepted_keys())}")
        if eq:
            out[key] = value
        elif key in bool_keys and (i + 1 == len(words) or words[i + 1].startswith("--")):
            out[key] = True
        elif i + 1 < len(words):
            out[key] = words[i + 1]
            i += 1
        else:
            raise ValueError(f"--{key} needs a value")
        i += 1
    return out


def _is_float_field(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


__all__ = ["TrainConfig", "load_train_config", "parse_overrides", "accepted_keys", "check_keys", "DTYPES",
           "LOSS_REDUCTIONS"]

