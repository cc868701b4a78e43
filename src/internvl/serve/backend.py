"""What the server serves (`Backend`: engine + tokenizer + model facts) and its lifecycle (`ServerState`).

`create_app` accepts an `Engine` (with its tokenizer), a model plus a tokenizer, a checkpoint path (None = the shipped
demo model), or a zero-argument loader returning any of those. Paths and loaders run in a background thread at
start-up, so `/health` answers `503 model_loading` meanwhile instead of the port being closed (§10, §13 #40).

Lifecycle: loading -> ready -> draining (SIGTERM, §11); `failed` if loading raised. The engine is `dead` when its
background loop stopped while the server is still ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl.engine import Engine
from internvl.serve.config import ServerConfig
from internvl.serve.errors import unavailable

log = logging.getLogger("internvl.serve")

DEMO_MODEL_NAME = "internvl-demo"


@dataclass
class Backend:
    engine: Engine
    tokenizer: Any
    model_config: Any  # InternVLConfig
    template: Any  # templates.Template
    system_message: str | None  # None: the template's default
    context_len: int  # prompt + completion tokens one sequence may hold
    img_context_id: int
    max_token_chars: int  # longest vocabulary entry, for a cheap lower bound on a text's token count
    _token_text: dict[int, str] = field(default_factory=dict, repr=False)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._token_text[token_id] = text
        return text


def default_model_name(source) -> str:
    from internvl.demo.model import DEMO_MODEL_DIR

    if source is None or (isinstance(source, (str, Path)) and Path(source).resolve() == DEMO_MODEL_DIR):
        return DEMO_MODEL_NAME
    if isinstance(source, (str, Path)):
        return Path(str(source).rstrip("/")).name or "internvl"
    return "internvl"


def load_source(source, config: ServerConfig, tokenizer=None) -> tuple[Any, Any]:
    """-> (model or engine, tokenizer). Paths (None = demo model) are loaded here; callables are called."""
    if callable(source) and not isinstance(source, (str, Path)) and not hasattr(source, "language_model"):
        result = source()
        source, tokenizer = result if isinstance(result, tuple) else (result, tokenizer)
    if source is None or isinstance(source, (str, Path)):
        import torch

        from internvl import InternVLChatModel, load_tokenizer
        from internvl.checkpoint.hub import resolve_model_path
        from internvl.demo.model import resolve_default_model
        from internvl.model.fast import optimize_for_inference

        path = resolve_default_model(source)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = InternVLChatModel.from_pretrained(path, torch_dtype=config.dtype, device=device).eval()
        # the server owns this model: fused inference modules (same logits, tests/model/test_fast.py)
        optimize_for_inference(model)
        return model, load_tokenizer(resolve_model_path(path))
    return source, tokenizer


def build_backend(source, config: ServerConfig, tokenizer=None) -> Backend:
    from internvl.templates.conversation import get_template
    from internvl.tokenizer import image_context_id

    if isinstance(source, Engine):
        engine = source
        tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        if tokenizer is None or engine.tokenizer is None:
            raise ValueError("the engine given to create_app needs a tokenizer (Engine(model, tokenizer, ...))")
        model = engine.model
    else:
        model = source
        if tokenizer is None:
            raise ValueError("create_app(model) needs tokenizer=...; or pass a checkpoint path or an Engine")
        engine = Engine(model, tokenizer, kv_budget_bytes=config.kv_budget_bytes, max_batch_size=config.max_batch_size,
                        prefill_chunk_tokens=config.prefill_chunk_tokens,
                        vit_max_batch_tiles=config.vit_max_batch_tiles, max_queue=config.max_queue)
    model.img_context_token_id = image_context_id(tokenizer)
    cfg = model.config
    context = config.session_len or cfg.llm.max_position_embeddings
    context = min(context, engine.pool.capacity_tokens)
    vocab = tokenizer.get_vocab()
    return Backend(
        engine=engine,
        tokenizer=tokenizer,
        model_config=cfg,
        template=get_template(cfg.template),
        system_message=getattr(model, "system_message", None),
        context_len=context,
        img_context_id=model.img_context_token_id,
        max_token_chars=max(1, max((len(t) for t in vocab), default=1)),
    )


@dataclass
class InFlight:
    """A request between admission and its last byte; shutdown aborts what is left of these (§11)."""

    request_id: str
    engine_ids: list[str] = field(default_factory=list)  # its engine requests (one per prompt)
    aborted_by_shutdown: bool = False


class ServerState:
    """Readiness and the in-flight registry. Only the event loop thread mutates `inflight`."""

    def __init__(self, config: ServerConfig, source, tokenizer=None, model_name: str | None = None):
        self.config = config
        self.model_name = model_name or config.model_name or default_model_name(
            source if isinstance(source, (str, Path)) or source is None else None)
        self._source, self._tokenizer = source, tokenizer
        self.backend: Backend | None = None
        self.status = "loading"
        self.load_error: str | None = None
        self.created = int(time.time())
        self.inflight: dict[str, InFlight] = {}
        self._loader: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ loading
    @property
    def needs_loading(self) -> bool:
        src = self._source
        return src is None or isinstance(src, (str, Path)) or (callable(src) and not isinstance(src, Engine)
                                                               and not hasattr(src, "language_model"))

    def load_now(self) -> None:
        """Build the backend in this thread (models and engines given directly are ready at once)."""
        try:
            source, tokenizer = load_source(self._source, self.config, self._tokenizer)
            backend = build_backend(source, self.config, tokenizer)
            backend.engine.start()
        except Exception as e:  # reported by /health; the process keeps answering
            log.exception("loading the model failed")
            self.load_error = f"{type(e).__name__}: {e}"
            self.status = "failed"
            return
        self.backend = backend
        if self.status == "loading":
            self.status = "ready"
        log.info("model %s ready (context %d tokens, KV pool %d blocks)", self.model_name, backend.context_len,
                 backend.engine.pool.num_blocks)

    def start_loading(self) -> None:
        if self.needs_loading:
            self._loader = threading.Thread(target=self.load_now, name="internvl-load", daemon=True)
            self._loader.start()
        else:
            self.load_now()

    # ------------------------------------------------------------------------------------------ readiness
    @property
    def engine_dead(self) -> bool:
        return self.status == "ready" and self.backend is not None and not self.backend.engine.is_running

    def check_ready(self) -> Backend:
        """The backend, or the 503 that says why not (§10)."""
        if self.status == "draining":
            raise unavailable("shutting_down", "The server is shutting down; retry on another instance.")
        if self.status == "loading":
            raise unavailable("model_loading", "The model is still loading; retry in a few seconds.")
        if self.status == "failed":
            raise unavailable("engine_dead", "The model failed to load; see the server log.")
        if self.engine_dead:
            raise unavailable("engine_dead", "The generation engine stopped; the server needs a restart.")
        return self.backend

    # ------------------------------------------------------------------------------------------ shutdown (§11)
    def begin_drain(self) -> None:
        if self.status != "draining":
            log.info("draining: %d request(s) in flight", len(self.inflight))
        self.status = "draining"

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` s for in-flight requests, then abort the rest; returns how many were aborted."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.inflight.values())
        for item in left:
            item.aborted_by_shutdown = True
            for rid in item.engine_ids:  # the engine ends each stream with finish_reason "abort"
                self.backend.engine.abort(rid, wait=False)
        if left:
            log.warning("shutdown timeout: aborted %d request(s)", len(left))
        while self.inflight and time.monotonic() < deadline + 5:  # let their responses finish
            await asyncio.sleep(0.05)
        return len(left)

    def stop_engine(self) -> None:
        if self.backend is not None:
            self.backend.engine.shutdown(abort_requests=True)
