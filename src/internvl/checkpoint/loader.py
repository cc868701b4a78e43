"""Load an InternVL checkpoint (original or transformers-native layout) into `InternVLModel`, streaming.

Spec: INTERNVL.md §10 (files, names, native mapping), §11.2 (InternLM2 `wqkv`), §11.4 (Phi-3 fused projections).

The model is built on the `meta` device (no memory), then the checkpoint is read one tensor at a time: mapped to our
internal names (`internvl.checkpoint.names`), cast to the target dtype/device and assigned into its module. Peak
memory is therefore about one copy of the weights in the target dtype plus one shard's file pages. Non-persistent
buffers (the RoPE tables) are rebuilt on the real device afterwards, and anything still on `meta` is an error.

Weights: `model.safetensors`, sharded `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, or the
legacy `pytorch_model.bin` (sharded with `pytorch_model.bin.index.json`), read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from internvl.checkpoint.hub import resolve_model_path
from internvl.checkpoint.names import native_to_original, original_to_internal
from internvl.config import InternVLConfig
from internvl.model.internvl import InternVLModel
from internvl.model.rope import RotaryEmbedding

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
ACCEPTED_DTYPE_NAMES = (*_DTYPES, "auto")
MAX_LISTED = 10  # names listed in an error message


# --------------------------------------------------------------------------------------------- small helpers
def parse_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A torch dtype or one of ACCEPTED_DTYPE_NAMES -> torch.dtype, or the string 'auto'."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(ACCEPTED_DTYPE_NAMES)}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(ACCEPTED_DTYPE_NAMES)}")


def checkpoint_dtype(config_dict: dict) -> torch.dtype:
    """The dtype the config says is on disk (`torch_dtype`, or `dtype` as transformers 5 writes); bf16 if absent."""
    sub = config_dict.get("llm_config") or config_dict.get("text_config") or {}
    for d in (config_dict, sub):
        for key in ("torch_dtype", "dtype"):
            name = d.get(key)
            if isinstance(name, str) and name.removeprefix("torch.") in _DTYPES:
                return _DTYPES[name.removeprefix("torch.")]
    return torch.bfloat16  # every released InternVL checkpoint (INTERNVL.md §10.1)


def resolve_dtype(dtype: torch.dtype | str | None, config_dict: dict, device: torch.device) -> torch.dtype:
    """The in-memory dtype for `load_model`."""
    if dtype is None:
        # CPUs without native bf16 run bf16 matmuls 6-100x slower than fp32, so CPU loads default to float32;
        # accelerators keep the checkpoint's dtype (bf16 for every release).
        return torch.float32 if device.type == "cpu" else checkpoint_dtype(config_dict)
    parsed = parse_dtype(dtype)
    return checkpoint_dtype(config_dict) if parsed == "auto" else parsed


def detect_layout(config_dict: dict) -> str:
    """'original' (OpenGVLab `InternVLChatModel`) or 'native' (transformers `InternVLForConditionalGeneration`)."""
    arch = (config_dict.get("architectures") or [None])[0]
    model_type = config_dict.get("model_type")
    if model_type == "internvl_chat" or arch == "InternVLChatModel" or "llm_config" in config_dict:
        return "original"
    if model_type == "internvl" or arch == "InternVLForConditionalGeneration" or "text_config" in config_dict:
        return "native"
    raise ValueError(
        f"config.json describes {arch or model_type!r}, which is not an InternVL chat model; expected "
        "'InternVLChatModel' (original layout) or 'InternVLForConditionalGeneration' (transformers-native layout)"
    )


def read_config_dict(ckpt_dir: Path) -> dict:
    f = ckpt_dir / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"no config.json in {ckpt_dir}")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None


# --------------------------------------------------------------------------------------------- reading files
_INDEXES = (  # (index, single file), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order; every shard an index names must exist."""
    d = Path(ckpt_dir)
    for index_name, single in _INDEXES:
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a valid shard index (needs a 'weight_map'): {e}") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (d / name).is_file():
                    raise FileNotFoundError(f"shard {name} listed in {index} is missing from {d}")
            return [d / name for name in files]
        if (d / single).is_file():
            return [d / single]
    raise FileNotFoundError(
        f"no weights in {d}: expected model.safetensors, model.safetensors.index.json with its shards, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def iter_file_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) pairs of one weight file.

    Tensors may be views of the file's memory map (safetensors, mmap torch.load): copy before keeping them.
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError is not a public type
            raise ValueError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt"
            ) from None
        with f:
            for name in f.keys():
                try:
                    t = f.get_tensor(name)
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from None
                yield name, t
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler-policy errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{path} is not a readable PyTorch weight file ({first}); it may be truncated or corrupt"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path} does not hold a flat name -> tensor dictionary")
    for name in list(state):
        yield name, state.pop(name)


# --------------------------------------------------------------------------------------------- name mapping
# transformers < 5 saved InternVL under these prefixes; both spellings are native checkpoints.
_LEGACY_NATIVE_PREFIXES = (
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
_NATIVE_VIT_QKV = re.compile(r"(model\.vision_tower\..*\.attention\.)([qkv])_proj\.(weight|bias)$")
# Computed from the config, never needed from disk (old Llama-era checkpoints stored RoPE frequencies).
_COMPUTED = re.compile(r"\.rotary_emb\.inv_freq$")


def modern_native_name(name: str) -> str:
    """A native tensor name as transformers >= 5 spells it (older releases saved `vision_tower.` etc.)."""
    for old, new in _LEGACY_NATIVE_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class NativeToInternal:
    """Per-tensor native -> internal names. The ViT's split q/k/v are held until all three arrived, then fused."""

    def __init__(self, cfg: InternVLConfig):
        self.cfg = cfg
        self.pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        name = modern_native_name(name)
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            m = _NATIVE_VIT_QKV.match(name)
            group = {name: t}
            if m:
                key = (m.group(1), m.group(3))
                group = self.pending.setdefault(key, {})
                group[name] = t
                if len(group) < 3:
                    return []
                del self.pending[key]
            # original names of vision_model.* and mlp1.* are our internal names
            return list(native_to_original(group, self.cfg).items())
        if name.startswith("model.language_model."):
            name = "language_model.model." + name[len("model.language_model."):]
        elif name.startswith("lm_head."):
            name = "language_model.lm_head." + name[len("lm_head."):]
        else:
            raise ValueError(f"tensor {name!r} is not part of a transformers-native InternVL checkpoint")
        if self.cfg.llm.arch == "InternLM2ForCausalLM":
            return [(name, t)]  # stored as Llama (INTERNVL.md §10.4): already our internal names
        return original_to_internal(name, t, self.cfg)  # Phi-3 keeps its fused projections in native form

    def incomplete(self) -> list[str]:
        return [n for group in self.pending.values() for n in group]


# --------------------------------------------------------------------------------------------- loading
def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    old = module._parameters.get(leaf)
    if old is not None:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = t


def _listing(names) -> str:
    names = list(names)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


class CheckpointMapper:
    """Checkpoint tensors -> (internal name, tensor), checked against a model's expected names and shapes.

    Feed every tensor of every file through `map`, call `end_file` after each file and `finish` at the end; errors
    name the tensor, the file, and the expected vs found shape. Works on meta tensors too (convert validates so).
    """

    def __init__(self, cfg: InternVLConfig, layout: str, targets: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.targets = targets  # internal name -> tensor with the expected shape (meta is fine)
        if layout == "original":
            self._to_internal = lambda n, t: original_to_internal(n, t, cfg)
        elif layout == "native":
            self._to_internal = NativeToInternal(cfg)
        else:
            raise ValueError(f"unknown checkpoint layout {layout!r}; expected 'original' or 'native'")
        self.layout = layout
        self.loaded: dict[str, str] = {}  # internal name -> file it came from
        self._extra: list[str] = []

    def map(self, src_name: str, t: torch.Tensor, path: Path) -> list[tuple[str, torch.Tensor]]:
        if _COMPUTED.search(src_name):
            return []
        try:
            pairs = self._to_internal(src_name, t)
        except (RuntimeError, ValueError) as e:  # e.g. a fused wqkv whose rows do not split into heads
            raise ValueError(f"tensor {src_name!r} in {path} cannot be mapped to the model: {e}") from None
        out = []
        for name, x in pairs:
            if name not in self.targets:
                self._extra.append(src_name)
                continue
            if name in self.loaded:
                raise ValueError(f"tensor {src_name!r} in {path} duplicates one already read from {self.loaded[name]}")
            want = tuple(self.targets[name].shape)
            if tuple(x.shape) != want:
                via = "" if name == src_name else f" (model tensor {name})"
                raise ValueError(f"tensor {src_name!r} in {path} has shape {tuple(x.shape)}, expected {want}{via}")
            self.loaded[name] = path.name
            out.append((name, x))
        return out

    def end_file(self, path: Path) -> None:
        extra, self._extra = self._extra, []
        if extra:
            raise ValueError(
                f"{path} has {len(extra)} tensor(s) this {self.cfg.llm.arch} model does not have: {_listing(extra)}"
            )

    def finish(self, ckpt_dir: str | Path) -> None:
        if self.layout == "native" and self._to_internal.incomplete():
            raise ValueError(
                f"vision q/k/v projections are incomplete in {ckpt_dir} (q, k and v are needed): "
                f"{_listing(self._to_internal.incomplete())}"
            )
        missing = [n for n in self.targets if n not in self.loaded]
        if "language_model.lm_head.weight" in missing:
            raise ValueError(
                f"the checkpoint in {ckpt_dir} has no output matrix (language_model.lm_head.weight; "
                "language_model.output.weight for InternLM2; lm_head.weight in the native layout). InternVL "
                "checkpoints always store it and it is never tied to the embeddings (INTERNVL.md §10.3)"
            )
        if missing:
            raise ValueError(f"the checkpoint in {ckpt_dir} lacks {len(missing)} tensor(s): {_listing(missing)}")


def load_weights_(model: InternVLModel, ckpt_dir: str | Path, layout: str, dtype: torch.dtype,
                  device: torch.device | str = "cpu", device_of=None) -> InternVLModel:
    """Stream a checkpoint's tensors into `model` (usually built on `meta`), checking names and shapes.

    device_of: optional name -> device (a multi-device placement); default every tensor to `device`.
    """
    device = torch.device(device)
    mapper = CheckpointMapper(model.config, layout, model.state_dict(keep_vars=True))
    for path in checkpoint_files(ckpt_dir):
        for src_name, raw in iter_file_tensors(path):
            for name, t in mapper.map(src_name, raw, path):
                out = t.to(device=device_of(name) if device_of else device,
                           dtype=dtype if t.is_floating_point() else t.dtype)
                if out.data_ptr() == t.data_ptr():
                    out = out.clone()  # never keep a view of the file's memory map
                _assign(model, name, out)
                del t, out
            del raw
        mapper.end_file(path)
    mapper.finish(ckpt_dir)
    return model


def _rebuild_non_persistent_(model: InternVLModel, device: torch.device) -> None:
    """Recreate modules whose tensors are computed, not stored (RoPE frequencies), on the real device."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RotaryEmbedding):
            with torch.device("cpu"):  # escape any ambient meta device; the tables are tiny
                fresh = RotaryEmbedding(model.config.llm)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, fresh.to(device))


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of parameters, buffers and plain tensor attributes still on the meta device."""
    found = [n for n, p in model.named_parameters() if p.is_meta]
    found += [n for n, b in model.named_buffers() if b.is_meta]
    for mname, module in model.named_modules():
        for attr, v in vars(module).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_meta:
                found.append(f"{mname}.{attr}" if mname else attr)
    return found


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    model_cls: type[InternVLModel] = InternVLModel,
    device_map: str | dict | None = None,
) -> InternVLModel:
    """Load a checkpoint directory or hub id into an `InternVLModel` (or `model_cls`) in eval mode.

    dtype: None -> float32 on CPU, the checkpoint's dtype (bf16) elsewhere; or a torch dtype / one of
    ACCEPTED_DTYPE_NAMES ('auto' = the checkpoint's dtype).
    device_map: spread the decoder layers over several devices instead of `device`: 'auto' (by the free memory
    of every visible GPU) or a dict of module-name prefix -> device (`internvl.parallel.placement`).
    """
    device = torch.device(device)
    placement = None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available")
    ckpt_dir = resolve_model_path(path)
    config_dict = read_config_dict(ckpt_dir)
    layout = detect_layout(config_dict)
    target = resolve_dtype(dtype, config_dict, device)
    cfg = InternVLConfig.from_dict(config_dict)
    if device_map is not None:
        from internvl.parallel.placement import resolve_device_map

        placement = resolve_device_map(device_map, cfg, lambda home: resolve_dtype(dtype, config_dict, home))
        device = torch.device(placement.home)
        target = resolve_dtype(dtype, config_dict, device)
    checkpoint_files(ckpt_dir)  # fail on missing shards before building anything
    with torch.device("meta"):
        model = model_cls(cfg)
    load_weights_(model, ckpt_dir, layout, target, device, placement.device_of if placement else None)
    _rebuild_non_persistent_(model, device)
    left = meta_tensors(model)
    if left:
        raise RuntimeError(f"after loading {ckpt_dir}, these tensors were never materialised: {_listing(left)}")
    model.img_context_token_id = cfg.image_token_id  # None: resolved from the tokenizer by the chat API
    if placement is not None:
        from internvl.parallel.placement import place_model

        place_model(model, placement)  # the weights are in place already: this adds the device-moving hooks
    return model.eval()
