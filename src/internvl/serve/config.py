"""`ServerConfig`: every setting of the OpenAI-compatible server, one frozen dataclass (SERVING.md §14 defaults).

The CLI (`internvl serve`) turns flags into this; tests and embedders build it directly:

    app = create_app(engine_or_model_or_path, ServerConfig(api_keys=("sk-1",), max_queue=8))

Media fetching has its own frozen policy (`internvl.serve.media.MediaPolicy`), carried here as `media`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

MIB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    # network
    host: str = "127.0.0.1"  # loopback unless told otherwise (§8); a public bind without a key logs a warning
    port: int = 23333

    # model and engine
    model_name: str | None = None  # the served id; None: the checkpoint directory's name ("internvl-demo" for the demo)
    max_batch_size: int = 16  # running sequences (--max-num-seqs)
    session_len: int | None = None  # context length; None: the LLM's max_position_embeddings, capped by the KV pool
    kv_budget_bytes: int = 512 * MIB  # KV pool size, fixed at start-up so a request fits, waits or is refused (§7)
    prefill_chunk_tokens: int = 2048
    vit_max_batch_tiles: int = 16
    device: str | None = None  # None: cuda when available, else cpu (only used when the server loads the model)
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's dtype on CUDA

    # admission (§7)
    max_queue: int = 256  # waiting requests; beyond it 429 + Retry-After: 1
    queue_timeout: float = 60.0  # seconds a request may wait for its first token; then 503 + Retry-After
    shutdown_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM before they are aborted (§11)

    # request limits (§3)
    max_body_bytes: int = 20 * MIB
    limit_images_per_prompt: int = 4
    max_dynamic_patch_cap: int = 24  # upper bound of the per-image `max_dynamic_patch` extension
    max_n: int = 8
    max_new_tokens_default: int = 2048  # default max_tokens: min(context - prompt, this)
    max_stop_sequences: int = 4
    max_stop_length: int = 256
    video_num_frames: int = 8  # frames sampled from a `video_url` video unless the part says `num_frames`

    # auth and CORS (§8)
    api_keys: tuple[str, ...] = ()  # none: auth off
    metrics_require_auth: bool = False
    allowed_origins: tuple[str, ...] = ()  # CORS off unless set; "*" never comes with credentials

    # media fetching (§5): a `MediaPolicy` (None = its safe defaults, built by `media_policy()`)
    media: Any = None

    # logging
    log_requests: bool = True  # one structured line per request (§9)

    def __post_init__(self):
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(what)

        need(isinstance(self.port, int) and 0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port!r}")
        for name in ("max_batch_size", "kv_budget_bytes", "prefill_chunk_tokens", "vit_max_batch_tiles", "max_queue",
                     "max_body_bytes", "limit_images_per_prompt", "max_dynamic_patch_cap", "max_n",
                     "max_new_tokens_default", "max_stop_sequences", "max_stop_length", "video_num_frames"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        if self.session_len is not None:
            need(isinstance(self.session_len, int) and self.session_len >= 2,
                 f"session_len must be an integer >= 2, got {self.session_len!r}")
        for name in ("queue_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value > 0, f"{name} must be a number > 0, got {value!r}")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        for key in self.api_keys:
            need(isinstance(key, str) and key.strip() == key and key != "",
                 "API keys must be non-empty strings without surrounding whitespace")
        if self.model_name is not None:
            need(bool(re.fullmatch(r"[^\s]{1,256}", self.model_name)),
                 f"model_name must be 1-256 characters without whitespace, got {self.model_name!r}")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def media_policy(self):
        from internvl.serve.media_policy import MediaPolicy

        policy = self.media if self.media is not None else MediaPolicy()
        if self.video_num_frames > policy.max_video_frames:
            raise ValueError(f"video_num_frames={self.video_num_frames} exceeds the media policy's "
                             f"max_video_frames={policy.max_video_frames}")
        return policy

    @property
    def max_video_frames(self) -> int:
        return self.media_policy().max_video_frames

    def replace(self, **changes) -> "ServerConfig":
        return replace(self, **changes)


def read_api_key_file(path: str) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    with open(path, encoding="utf-8") as f:
        keys = tuple(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"API key file {path} contains no keys")
    return keys

