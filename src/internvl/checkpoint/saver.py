"""Write checkpoints in the original OpenGVLab layout. Spec: INTERNVL.md §10.1-§10.3, §11.2, §11.4.

`save_pretrained` writes `config.json` (original layout), `generation_config.json` and the weights under their
original names and fused layouts (InternLM2 `wqkv`, Phi-3 `qkv_proj`/`gate_up_proj`), sharded the way transformers
shards (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`). Everything is written into a temporary
directory next to the destination and renamed into place at the end, so an interrupted save leaves no half
checkpoint behind. `write_weights` is the streaming shard writer shared with `convert` and the benchmarks: it holds
at most one shard in memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from internvl.checkpoint.names import internal_to_original
from internvl.tokenizer import TOKENIZER_FILES


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """500_000_000, "500MB" (10^6) or "1GiB" (2^30) -> bytes; transformers' convention for `max_shard_size`."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; use bytes or a number with B, KB, MB, GB, KiB, MiB or GiB")
    n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------- atomic directory
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it becomes `out_dir`, on error it is removed.

    An existing non-empty `out_dir` is refused unless `overwrite`, in which case it is replaced as a whole.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} already exists and is not empty; pass a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the result the permissions mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


# --------------------------------------------------------------------------------------------- shard writer
def write_weights(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
) -> dict[str, str]:
    """Stream (name, tensor) pairs into shards of at most `max_shard_size` bytes (a bigger tensor gets its own).

    One shard -> `model.safetensors` (or `pytorch_model.bin`); more -> `model-0000i-of-0000N.safetensors` plus an
    index. Returns the weight map (name -> file name).
    """
    out = Path(out_dir)
    limit = parse_size(max_shard_size)
    ext = "safetensors" if safe_serialization else "bin"
    seen: set[str] = set()
    shards: list[tuple[Path, list[str]]] = []  # (temporary file, names)
    total = 0
    buf: dict[str, torch.Tensor] = {}
    buf_bytes = 0

    def flush():
        nonlocal buf, buf_bytes
        if not buf:
            return
        f = out / f".shard-{len(shards):05d}.{ext}.tmp"
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(buf, str(f), metadata={"format": "pt"})  # transformers requires format=pt
        else:
            torch.save(buf, f)
        os.chmod(f, 0o666 & ~_umask())  # safetensors writes via a private temp file (0600)
        shards.append((f, list(buf)))
        buf, buf_bytes = {}, 0

    for name, t in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} was produced twice while writing {out}")
        seen.add(name)
        t = t.detach().contiguous()
        if t.device.type != "cpu":
            t = t.cpu()
        n = t.numel() * t.element_size()
        if buf and buf_bytes + n > limit:
            flush()
        buf[name] = t
        buf_bytes += n
        total += n
    flush()
    if not shards:
        raise ValueError(f"no tensors to write into {out}")

    weight_map: dict[str, str] = {}
    if len(shards) == 1:
        final = "model.safetensors" if safe_serialization else "pytorch_model.bin"
        shards[0][0].rename(out / final)
        weight_map = {n: final for n in shards[0][1]}
        return weight_map
    stem = "model" if safe_serialization else "pytorch_model"
    for i, (f, names) in enumerate(shards):
        final = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        f.rename(out / final)
        weight_map.update((n, final) for n in names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_name = "model.safetensors.index.json" if safe_serialization else "pytorch_model.bin.index.json"
    write_json(out / index_name, index)
    return weight_map


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- model -> original
def original_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under original names, one decoder layer at a time (fused copies exist for one layer)."""
    cfg = model.config
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in model.state_dict().items():
        m = re.match(r"language_model\.model\.layers\.\d+\.", name)
        groups.setdefault(m.group(0) if m else name, {})[name] = t
    for group in groups.values():
        for name, t in internal_to_original(group, cfg).items():
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name, t


def generation_config_dict(cfg) -> dict:
    """Token ids the LLM config carries. Chat stops on the template's end token regardless (INTERNVL.md §11.3)."""
    ids = {"bos_token_id": cfg.llm.bos_token_id, "eos_token_id": cfg.llm.eos_token_id,
           "pad_token_id": cfg.llm.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def original_config_dict(cfg, dtype: torch.dtype) -> dict:
    d = cfg.to_original_dict()
    d["torch_dtype"] = dtype_name(dtype)  # what is actually on disk
    d["llm_config"]["torch_dtype"] = dtype_name(dtype)
    return d


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | Path,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    safe_serialization: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model` (an `InternVLModel`) as an original-layout checkpoint; dtype None keeps the model's dtype."""
    from internvl.checkpoint.loader import parse_dtype

    target = None if dtype is None or dtype == "auto" else parse_dtype(dtype)
    stored = target or next(p.dtype for p in model.parameters() if p.is_floating_point())
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError("cannot save a model with tensors on the meta device; load or initialise its weights first")
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_weights(original_tensors(model, target), tmp, max_shard_size, safe_serialization)
        write_json(tmp / "config.json", original_config_dict(model.config, stored))
        write_json(tmp / "generation_config.json", generation_config_dict(model.config))
    return out


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files present in `src_dir` (TOKENIZER_FILES) into `out_dir`; returns the names copied."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied
