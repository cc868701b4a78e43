"""Where the shipped demo model lives, and how `None` as a model path resolves to it."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"


def resolve_default_model(path: str | Path | None) -> str | Path:
    """`None` -> the demo model shipped inside the package; anything else is returned unchanged."""
    if path is not None:
        return path
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"no model given and the shipped demo model is missing at {DEMO_MODEL_DIR}; "
            "pass a checkpoint directory or rebuild the demo model with `python -m internvl.demo.build`"
        )
    return DEMO_MODEL_DIR
