"""Checkpoint I/O: load (original or transformers-native layout), save (original layout), convert. INTERNVL.md §10.

The public names are imported lazily so that `internvl.checkpoint.names` stays importable from model code without
pulling in the loader (which imports the model) and creating an import cycle.
"""

import importlib

_EXPORTS = {
    "convert_checkpoint": "internvl.checkpoint.convert",
    "copy_tokenizer_files": "internvl.checkpoint.saver",
    "detect_layout": "internvl.checkpoint.loader",
    "load_model": "internvl.checkpoint.loader",
    "resolve_model_path": "internvl.checkpoint.hub",
    "save_pretrained": "internvl.checkpoint.saver",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'internvl.checkpoint' has no attribute {name!r}")
