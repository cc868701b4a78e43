"""Training data pipeline: meta/JSONL records, label masks per template, packing, augmentation (INTERNVL.md §12-15)."""

from internvl.training.augment import jpeg_recompress
from internvl.training.data import (
    DataConfig,
    DatasetSpec,
    Record,
    RecordError,
    SupervisedDataset,
    collate,
    load_meta,
    read_records,
    sample_frame_indices,
    validate,
)
from internvl.training.labels import SampleError, tokenize_conversation
from internvl.training.packing import collate_packed, pack_samples

__all__ = [
    "DataConfig",
    "DatasetSpec",
    "Record",
    "RecordError",
    "SampleError",
    "SupervisedDataset",
    "collate",
    "collate_packed",
    "jpeg_recompress",
    "load_meta",
    "pack_samples",
    "read_records",
    "sample_frame_indices",
    "tokenize_conversation",
    "validate",
]
