"""Convert checkpoints between the original OpenGVLab layout and transformers' native InternVL layout.

Spec: INTERNVL.md §10.3 (original names), §10.4 (native mapping), §11.2 (InternLM2 `wqkv` becomes Llama q/k/v).
Tensors stream from the source shards into the destination shards; only the few tensors that must be fused
together (one ViT layer's q/k/v, one InternLM2 layer's q/k/v) are held at once. Every tensor is checked against the
shapes of a model built on the `meta` device, so a mismatched config fails before a broken checkpoint is written.
The destination is written into a temporary directory and renamed into place at the end.

CLI: `internvl convert SRC DST --to native|original [--dtype bf16]` -> `main(argv)`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch

from internvl.checkpoint.hub import resolve_model_path
from internvl.checkpoint.loader import (
    ACCEPTED_DTYPE_NAMES,
    CheckpointMapper,
    checkpoint_files,
    detect_layout,
    iter_file_tensors,
    modern_native_name,
    parse_dtype,
    read_config_dict,
)
from internvl.checkpoint.names import native_to_original, original_to_native
from internvl.checkpoint.saver import (
    atomic_directory,
    copy_tokenizer_files,
    dtype_name,
    generation_config_dict,
    original_config_dict,
    write_json,
    write_weights,
)
from internvl.config import InternVLConfig
from internvl.model.internvl import InternVLModel
from internvl.templates.tokens import IMG_CONTEXT_TOKEN

LAYOUTS = ("native", "original")


# --------------------------------------------------------------------------------------------- <IMG_CONTEXT> id
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def find_image_token_id(src_dir: str | Path) -> int | None:
    """The id of `<IMG_CONTEXT>` from the tokenizer files in `src_dir`, or None if it cannot be found."""
    d = Path(src_dir)
    tj = d / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        for tok in data.get("added_tokens") or []:
            if tok.get("content") == IMG_CONTEXT_TOKEN:
                return int(tok["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and IMG_CONTEXT_TOKEN in vocab:
            return int(vocab[IMG_CONTEXT_TOKEN])
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        decoder = _read_json(tc).get("added_tokens_decoder") or {}
        for idx, tok in decoder.items():
            if isinstance(tok, dict) and tok.get("content") == IMG_CONTEXT_TOKEN:
                return int(idx)
    at = d / "added_tokens.json"
    if at.is_file():
        added = _read_json(at)
        if IMG_CONTEXT_TOKEN in added:
            return int(added[IMG_CONTEXT_TOKEN])
    if (d / "tokenizer.model").is_file() or (d / "vocab.json").is_file():
        # SentencePiece tokenizers (InternLM2, Phi-3): load them the way chat does, never running shipped code
        from internvl.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(d)
        except (OSError, ValueError):
            return None
        idx = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if isinstance(idx, int) and idx != tok.unk_token_id:
            return idx
    return None


# --------------------------------------------------------------------------------------------- tensor streams
_NATIVE_GROUPS = (  # native names that must be fused together when going back to the original layout
    (re.compile(r"(model\.vision_tower\..*\.attention\.)[qkv]_proj\.(weight|bias)$"), 3),
)
_NATIVE_INTERNLM2_GROUPS = (
    (re.compile(r"(model\.language_model\.layers\.\d+\.self_attn\.)[qkv]_proj\.(weight)$"), 3),
    (re.compile(r"(model\.language_model\.layers\.\d+\.mlp\.)(?:gate|up)_proj\.(weight)$"), 2),
)
def _checked_source(src: Path, cfg: InternVLConfig, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `src`, validated (names, shapes, completeness) against a meta-device model."""
    with torch.device("meta"):
        targets = InternVLModel(cfg).state_dict(keep_vars=True)
    mapper = CheckpointMapper(cfg, layout, targets)
    for path in checkpoint_files(src):
        for name, t in iter_file_tensors(path):
            mapper.map(name, torch.empty(t.shape, dtype=t.dtype, device="meta"), path)  # shapes only, no copies
            yield name, t
        mapper.end_file(path)
    mapper.finish(src)


def original_to_native_stream(tensors: Iterable[tuple[str, torch.Tensor]], cfg: InternVLConfig):
    for name, t in tensors:
        yield from original_to_native(name, t, cfg)


def native_to_original_stream(tensors: Iterable[tuple[str, torch.Tensor]], cfg: InternVLConfig):
    groups = _NATIVE_GROUPS + (_NATIVE_INTERNLM2_GROUPS if cfg.llm.arch == "InternLM2ForCausalLM" else ())
    pending: dict[tuple, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        name = modern_native_name(name)
        group = {name: t}
        for pattern, size in groups:
            m = pattern.match(name)
            if m:
                key = (pattern.pattern, m.group(1), m.group(2))
                group = pending.setdefault(key, {})
                group[name] = t
                if len(group) < size:
                    group = None
                else:
                    del pending[key]
                break
        if group:
            yield from native_to_original(group, cfg).items()
    if pending:
        names = [n for g in pending.values() for n in g]
        raise ValueError(f"projections that must be fused are incomplete: {', '.join(names[:10])}")


def _cast(tensors, dtype: torch.dtype | None, seen: list):
    for name, t in tensors:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if t.is_floating_point() and not seen:
            seen.append(t.dtype)
        yield name, t


# --------------------------------------------------------------------------------------------- convert
def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str = "native",
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Rewrite the checkpoint `src` (directory or hub id) into `dst` in layout `to`; dtype None keeps the stored one."""
    if to not in LAYOUTS:
        raise ValueError(f"cannot convert to {to!r}; choose one of {', '.join(LAYOUTS)}")
    target = None if dtype is None else parse_dtype(dtype)
    if target == "auto":
        target = None
    src = resolve_model_path(src)
    config_dict = read_config_dict(src)
    layout = detect_layout(config_dict)
    if layout == to:
        raise ValueError(f"{src} is already in the {to} layout; nothing to convert")
    cfg = InternVLConfig.from_dict(config_dict)
    image_token_id = None
    if to == "native":
        image_token_id = cfg.image_token_id if cfg.image_token_id is not None else find_image_token_id(src)
        if image_token_id is None:
            raise ValueError(
                f"the native layout needs image_token_id, but {src}/config.json has none and no {IMG_CONTEXT_TOKEN} "
                "token was found in its tokenizer files (tokenizer.json, tokenizer_config.json, added_tokens.json)"
            )
    dst = Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same directory ({src})")
    seen: list[torch.dtype] = []
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        source = _checked_source(src, cfg, layout)
        mapped = original_to_native_stream(source, cfg) if to == "native" else native_to_original_stream(source, cfg)
        write_weights(_cast(mapped, target, seen), tmp, max_shard_size)
        stored = seen[0] if seen else torch.bfloat16
        if to == "native":
            out_cfg = cfg.to_native_dict(image_token_id)
            out_cfg["torch_dtype"] = dtype_name(stored)
            out_cfg["text_config"]["torch_dtype"] = dtype_name(stored)
        else:
            out_cfg = original_config_dict(cfg, stored)
        write_json(tmp / "config.json", out_cfg)
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        else:
            write_json(tmp / "generation_config.json", generation_config_dict(cfg))
        copy_tokenizer_files(src, tmp)
    return dst


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="internvl convert",
        description="Convert an InternVL checkpoint between the original (OpenGVLab) and transformers-native layouts.",
    )
    p.add_argument("src", help="source checkpoint directory or hub id (org/name)")
    p.add_argument("dst", help="destination directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--to", required=True, choices=LAYOUTS, help="layout to write")
    p.add_argument("--dtype", default=None, help=f"cast weights on the way ({', '.join(ACCEPTED_DTYPE_NAMES)}); "
                                                 "default: keep the stored dtype")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination directory")
    return p


def main(argv: list[str] | None = None) -> int:
    """`internvl convert`; returns the exit code (0 ok, 1 user error, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    try:
        out = convert_checkpoint(args.src, args.dst, to=args.to, dtype=args.dtype,
                                 max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (OSError, ValueError) as e:  # user errors: bad paths, layouts, dtypes, corrupt or mismatched files
        print(f"internvl convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
