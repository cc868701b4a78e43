"""The pipeline's settings and results: `GenerationConfig` (per call), `PipelineConfig` (per pipeline), `Response`.

`GenerationConfig` and `Response` use LMDeploy's field names (`lmdeploy.messages`), so LMDeploy pipeline code ports
by changing its imports. Defaults follow LMDeploy too: greedy, at most 512 new tokens; with `do_sample=True`,
temperature 0.8 and top-k 50. Each setting maps onto the engine's `SamplingParams` (`to_sampling_params`).

Differences from LMDeploy, each deliberate:
* `stop_words` are stop *strings* matched on the decoded text (LMDeploy maps each word to the token ids containing it);
  the answer ends before the stop string.
* `bad_words` / `bad_token_ids` and `n > 1` are refused with an error (the engine has no banned-token mask; the
  pipeline returns one answer per prompt; the server supports `n`).
* `logprobs=N` gives, per generated token, a dict {token id: logprob} with the chosen token and the N most likely
  ones (N = 0: the chosen token only), from the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from internvl.engine.sampler import MAX_TOP_LOGPROBS, SamplingParams


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_tuple(value, name: str, item_type: type, rule: str) -> tuple:
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ValueError(f"{name}={value!r}: must be {rule}") from None
    if not all(isinstance(i, item_type) and not isinstance(i, bool) for i in items):
        raise ValueError(f"{name}={value!r}: must be {rule}")
    return items


@dataclass(frozen=True)
class GenerationConfig:
    """What one call generates (LMDeploy's names and defaults). Invalid values raise ValueError naming the field."""

    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False  # False: greedy, and the sampling settings below are ignored
    top_p: float = 1.0
    top_k: int = 50  # 0 disables
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False  # keep going past the template's end-of-turn token
    random_seed: int | None = None
    stop_words: tuple[str, ...] = ()  # stop strings; a list or a single string is accepted
    bad_words: tuple[str, ...] = ()  # not supported: must stay empty
    stop_token_ids: tuple[int, ...] = ()
    bad_token_ids: tuple[int, ...] = ()  # not supported: must stay empty
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True  # False: special tokens (other than the stop token) stay in the text
    logprobs: int | None = None  # None: off; N: the chosen token plus the N most likely per position

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "stop_words", _as_tuple(self.stop_words, "stop_words", str, "a string or a list of strings"))
        set_(self, "bad_words", _as_tuple(self.bad_words, "bad_words", str, "a list of strings"))
        set_(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids", int, "a list of token ids"))
        set_(self, "bad_token_ids", _as_tuple(self.bad_token_ids, "bad_token_ids", int, "a list of token ids"))
        if not _is_int(self.n) or self.n != 1:
            raise ValueError(f"n={self.n!r}: the pipeline returns one answer per prompt, so n must be 1 "
                             "(submit the prompt several times with different random_seed values instead)")
        if self.bad_words or self.bad_token_ids:
            raise ValueError("bad_words / bad_token_ids are not supported: the engine cannot ban tokens yet; "
                             "leave them empty")
        if self.random_seed is not None and not _is_int(self.random_seed):
            raise ValueError(f"random_seed={self.random_seed!r}: must be an integer or None")
        if not all(self.stop_words):
            raise ValueError(f"stop_words={list(self.stop_words)!r}: every stop word must be a non-empty string")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs={self.logprobs!r}: must be None or an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.min_new_tokens is not None and not _is_int(self.min_new_tokens):
            raise ValueError(f"min_new_tokens={self.min_new_tokens!r}: must be an integer or None")
        for name in ("do_sample", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a bool")
        self.to_sampling_params()  # the remaining fields share the engine's names and checks

    def to_sampling_params(self, max_new_tokens: int | None = None) -> SamplingParams:
        """The engine's parameters; `max_new_tokens` overrides the configured limit (the pipeline lowers it so
        prompt + answer fit `session_len`)."""
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        return SamplingParams(
            max_new_tokens=limit,
            min_new_tokens=min(self.min_new_tokens or 0, limit) if _is_int(limit) else 0,
            greedy=not self.do_sample,
            temperature=self.temperature if self.do_sample else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.random_seed,
            stop=self.stop_words,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
        )


@dataclass(frozen=True)
class PipelineConfig:
    """How a pipeline loads the model and sizes its engine (the keywords of `pipeline()`)."""

    dtype: str | torch.dtype | None = None  # None: float32 on CPU, the checkpoint's dtype on CUDA
    device: str | None = None  # None: "cuda" when available, else "cpu"
    quantize: str | None = None  # None, "int8" or "int4": weight-only quantization of the LLM after loading
    max_batch_size: int = 32  # sequences decoded together (continuous batching)
    session_len: int | None = None  # prompt + answer tokens; None: the LLM's max_position_embeddings
    max_dynamic_patch: int | None = None  # tile limit per image; None: the checkpoint's max_dynamic_patch
    kv_cache_bytes: int | None = None  # KV pool size; None: the engine default (512 MiB)
    vision_cache_size: int = 64  # images whose vision features are kept (repeated images skip the ViT)
    enable_prefix_caching: bool = True  # later turns of a session reuse the KV of the earlier ones
    system_message: str | None = None  # None: the model's (the template default unless the model sets one)

    def __post_init__(self):
        def positive(name, allow_none):
            v = getattr(self, name)
            if (v is None and not allow_none) or (v is not None and (not _is_int(v) or v < 1)):
                raise ValueError(f"{name}={v!r}: must be a positive integer" + (" or None" if allow_none else ""))

        for name, allow_none in (("max_batch_size", False), ("session_len", True), ("max_dynamic_patch", True),
                                 ("kv_cache_bytes", True)):
            positive(name, allow_none)
        if not _is_int(self.vision_cache_size) or self.vision_cache_size < 0:
            raise ValueError(f"vision_cache_size={self.vision_cache_size!r}: must be an integer >= 0 (0 disables)")
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize={self.quantize!r}: must be None, 'int8' or 'int4'")
        if self.system_message is not None and not isinstance(self.system_message, str):
            raise ValueError(f"system_message must be a string or None, got {type(self.system_message).__name__}")

    @classmethod
    def from_options(cls, options: dict) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown pipeline option(s) {unknown}; accepted: {sorted(known)}")
        return cls(**options)


@dataclass
class Response:
    """One answer (or, from `stream_infer`, one piece of it). LMDeploy's field names.

    text: the answer as `chat()` returns it (end-of-turn and stop strings cut, whitespace stripped); in a stream,
    the new text of this piece. token_ids: generated ids without the stop token that ended the answer (in a stream,
    this piece's ids). generate_token_len: len of all generated token_ids so far. logprobs: one dict per token id,
    {token id: logprob}, when GenerationConfig.logprobs is set. index: position of the prompt in the call.
    """

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None  # "stop" | "length" (None while a stream is still running)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
