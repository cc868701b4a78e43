"""The serving engine: paged KV cache, continuous batching, chunked prefill, prefix and vision caches, streaming.

The reference `internvl.generation.generate` stays the readable oracle; this package is the fast path tested
against it (tests/engine).
"""

from internvl.engine.constraints import ResponseFormat, ResponseFormatError
from internvl.engine.engine import (
    AsyncRequestStream,
    CompletionOutput,
    Delta,
    Engine,
    EngineStats,
    RequestOutput,
    RequestStream,
)
from internvl.engine.kv_cache import BlockAllocator, PagedBatch, PagedKVCache, block_bytes, hash_prompt_blocks
from internvl.engine.sampler import SamplingParams, TokenLogprob
from internvl.engine.scheduler import QueueFull, Scheduler
from internvl.engine.stopping import IncrementalDetokenizer, SequenceText, StopStrings
from internvl.engine.vision_cache import ImageInput, VisionCache, VisionEncoder, tensor_digest

__all__ = [
    "AsyncRequestStream",
    "BlockAllocator",
    "CompletionOutput",
    "Delta",
    "Engine",
    "EngineStats",
    "ImageInput",
    "IncrementalDetokenizer",
    "PagedBatch",
    "PagedKVCache",
    "QueueFull",
    "RequestOutput",
    "RequestStream",
    "ResponseFormat",
    "ResponseFormatError",
    "SamplingParams",
    "Scheduler",
    "SequenceText",
    "StopStrings",
    "TokenLogprob",
    "VisionCache",
    "VisionEncoder",
    "block_bytes",
    "hash_prompt_blocks",
    "tensor_digest",
]
