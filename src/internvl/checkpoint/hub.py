"""Turn "a local directory or a hub id" into a local directory. Spec: INTERNVL.md §10.1.

Only data files are fetched: configs, weights and tokenizer files. The remote code that OpenGVLab ships next to the
weights (`modeling_*.py`, `configuration_*.py`, `tokenization_*.py`) is never downloaded and never executed.
"""

from __future__ import annotations

import re
from pathlib import Path

from internvl.tokenizer import TOKENIZER_FILES

# What a checkpoint directory needs for loading, chatting and converting (no *.py: we never run remote code).
DEFAULT_ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    *TOKENIZER_FILES,
    "chat_template.json",
    "preprocessor_config.json",
)

# `org/name` with the characters the hub allows; anything else (./x, /abs, a/b/c, ~/x) is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and ".." not in s


def resolve_model_path(path_or_id: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """An existing local directory as is; an `org/name` string through `huggingface_hub.snapshot_download`.

    Raises FileNotFoundError for a local-looking path that does not exist, NotADirectoryError for a file, and an
    OSError naming the id and the cause when the hub cannot be reached.
    """
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise NotADirectoryError(f"{p} is a file; pass the checkpoint directory that contains config.json")
        return p
    s = str(path_or_id)
    if isinstance(path_or_id, Path) or not looks_like_hub_id(s):
        raise FileNotFoundError(f"checkpoint directory {s} does not exist")
    from huggingface_hub import snapshot_download  # imported here: only hub ids need it

    patterns = list(allow_patterns) if allow_patterns is not None else list(DEFAULT_ALLOW_PATTERNS)
    try:
        return Path(snapshot_download(repo_id=s, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - httpx, hub and OS errors differ across huggingface_hub versions
        lines = str(e).strip().splitlines()
        reason = lines[0] if lines else type(e).__name__
        raise OSError(
            f"could not fetch {s!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            f"download it elsewhere and pass the local directory instead"
        ) from e
