"""The serving engine: paged KV, continuous batching, chunked prefill, prefix and vision caches, streaming, abort.

    engine = Engine(model, tokenizer, kv_budget_bytes=2 << 30)
    outs = engine.generate([dict(prompt_ids=ids, pixel_values=px, params=SamplingParams(max_new_tokens=64))])
    for delta in engine.stream(ids, SamplingParams(stop=["\\n\\n"])): print(delta.text, end="")
    async for delta in engine.astream(ids, params): ...          # engine loop in a background thread

The oracle is the plain reference `internvl.generation.generate.generate`: greedy output is the same token for
token, for every request, whatever it is batched with (tests/engine/test_engine.py).

One step (`step()`): the scheduler picks the work (decodes + prefill chunks, `scheduler.py`); vision features are
computed for requests whose prompt chunk needs them (`vision_cache.py`); the decodes run as one (B, 1) forward and
the prefill chunks as one right-padded (B, n) forward, both through `CausalLM.forward` with a `PagedBatch` cache
view, its additive mask and per-sequence positions and RoPE; every sequence whose tokens are all cached samples
its next token (`sampler.py`); text is detokenized incrementally with stop strings held back (`stopping.py`);
finished sequences release their blocks. A sequence's tokens are the same whether it runs alone or batched, in one
prefill or in chunks, or after a preemption (recompute).

RoPE per sequence: families with length-dependent frequencies (Phi-3 su/yarn, dynamic NTK) choose them from one
length per forward call in the reference (INTERNVL.md §11.6): the prompt length for the prefill, the current length
for each decode step. The engine computes cos/sin per sequence with exactly those lengths, so a chunked prefill,
a batch mate or a recompute after preemption does not change them. The KV of a prompt block depends on that
length regime, so it is part of the prefix-cache hash root.

Abort: `abort(request_id)` removes the request from the queues and releases its blocks at once (it waits for a step
in progress to end, at most one step). Streams abort on `close()`, on garbage collection, and async streams also on
task cancellation. Errors in a step fail only the requests of that step; the background loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
from collections.abc import Iterable, Sequence as Seq
from dataclasses import dataclass, field

import torch

from internvl.engine.constraints import GrammarCompiler
from internvl.engine.kv_cache import PagedKVCache, hash_prompt_blocks
from internvl.engine.sampler import SamplingParams, TokenLogprob, sample_token, sequence_seed, token_logprob
from internvl.engine.scheduler import FINISHED, Scheduler, Sequence, Work
from internvl.engine.stopping import SequenceText, dropped_ids
from internvl.engine.vision_cache import ImageInput, VisionCache, VisionEncoder

DEFAULT_KV_BUDGET_BYTES = 512 << 20
_STATIC_ROPE_KINDS = ("default", "linear", "llama3")  # frequencies independent of the sequence length


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class CompletionOutput:
    """One choice. `token_ids` includes the stop token when one ended it (as the reference); `text` never contains
    a stop string or the end-of-turn token."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: BaseException | None = None


@dataclass(frozen=True)
class Delta:
    """What one step added to one choice (a stream item)."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    mixed_steps: int = 0  # steps that ran decodes and prefill chunks together
    max_running: int = 0
    preemptions: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache


_DONE = object()


class _Choice:
    __slots__ = ("output", "generator", "text", "seq", "constraint")

    def __init__(self, output, generator, text, seq, constraint=None):
        self.output, self.generator, self.text, self.seq = output, generator, text, seq
        self.constraint = constraint  # constraints.Constraint of a response_format request


class _Request:
    def __init__(self, rid, params, prompt_ids, images, image_positions, sink):
        self.id = rid
        self.params: SamplingParams = params
        self.prompt_ids: list[int] = prompt_ids
        self.images: list[ImageInput] = images
        self.image_positions = image_positions  # (num image tokens,) prompt positions of <IMG_CONTEXT>
        self.features: torch.Tensor | None = None  # (num image tokens, D) while a prefill needs them
        self.choices: list[_Choice] = []
        self.output = RequestOutput(rid, list(prompt_ids), [])
        self.sink = sink
        self.done = threading.Event()

    @property
    def all_finished(self) -> bool:
        return all(c.output.finish_reason is not None for c in self.choices)


# ---------------------------------------------------------------------------------------------- streams
class RequestStream:
    """Sync iterator of `Delta`s for one request. Drives the engine itself unless the background loop runs.
    `close()` (or leaving a `with` block, or garbage collection) aborts the request if it is still running."""

    def __init__(self, engine: "Engine", request_id: str, events: queue.SimpleQueue):
        self.engine, self.request_id, self._events, self._closed = engine, request_id, events, False

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        if self._closed:
            raise StopIteration
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                if self.engine.is_running:
                    try:
                        ev = self._events.get(timeout=0.1)
                    except queue.Empty:
                        continue
                else:
                    if not self.engine.step() and self._events.empty() and not self.engine.scheduler.has_work:
                        raise RuntimeError(f"request {self.request_id} is not queued and produced no end event")
                    continue
            if ev is _DONE:
                self._closed = True
                raise StopIteration
            if isinstance(ev, BaseException):
                self._closed = True
                raise ev
            return ev

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.abort(self.request_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class AsyncRequestStream:
    """Async iterator of `Delta`s fed by the engine's background thread. Cancellation of the consuming task,
    `aclose()` and garbage collection abort the request (its blocks return to the pool within one step)."""

    def __init__(self, engine: "Engine", request_id: str, events: asyncio.Queue):
        self.engine, self.request_id, self._events, self._closed = engine, request_id, events, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self._closed:
            raise StopAsyncIteration
        try:
            ev = await self._events.get()
        except BaseException:  # cancelled while waiting: the client went away
            self._abort()
            raise
        if ev is _DONE:
            self._closed = True
            raise StopAsyncIteration
        if isinstance(ev, BaseException):
            self._closed = True
            raise ev
        return ev

    def _abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.abort(self.request_id, wait=False)

    async def aclose(self) -> None:
        self._abort()

    def __del__(self):
        try:
            self._abort()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Continuous-batching generation over one `InternVLModel` (see the module docstring).

    kv_budget_bytes / num_blocks: size of the KV pool (one of them; default 512 MiB). block_size: tokens per block.
    max_batch_size: running sequences. prefill_chunk_tokens: prompt tokens prefilled per step (decodes are extra).
    vision_cache_size: images whose features are kept (LRU). vit_max_batch_tiles: ViT micro-batch.
    max_queue: bounded waiting queue (QueueFull beyond it). eos_token_ids: end-of-turn ids; default the template's
    (`<|im_end|>` / `<|end|>`) when a tokenizer is given, none otherwise.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        kv_budget_bytes: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_batch_size: int = 32,
        prefill_chunk_tokens: int = 2048,
        vision_cache_size: int = 64,
        vit_max_batch_tiles: int = 16,
        max_queue: int | None = None,
        enable_prefix_caching: bool = True,
        eos_token_ids: Iterable[int] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        lm = model.language_model
        cfg = lm.config
        weight = lm.lm_head.weight
        if kv_budget_bytes is None and num_blocks is None:
            kv_budget_bytes = DEFAULT_KV_BUDGET_BYTES
        layers = lm.model.layers
        self.pool = PagedKVCache(  # kv heads of this rank under tensor parallelism; layers may sit on other devices
            cfg.num_layers, layers[0].self_attn.kv_heads, cfg.head_dim, block_size=block_size, num_blocks=num_blocks,
            budget_bytes=kv_budget_bytes, dtype=lm.get_input_embeddings().weight.dtype, device=weight.device,
            layer_devices=[layer.input_layernorm.weight.device for layer in layers],
        )  # the embedding's dtype: a quantized lm_head holds int8/uint8 codes, the activations stay float
        self.device = weight.device
        self.scheduler = Scheduler(
            self.pool, max_batch_size=max_batch_size, prefill_chunk_tokens=prefill_chunk_tokens,
            max_queue=max_queue, enable_prefix_caching=enable_prefix_caching,
        )
        self.vision = VisionEncoder(model, VisionCache(vision_cache_size), vit_max_batch_tiles)
        if eos_token_ids is None:
            eos_token_ids = ()
            if tokenizer is not None:
                from internvl.tokenizer import eos_id_for_template

                eos_token_ids = (eos_id_for_template(tokenizer, model.config.template),)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self._drop = dropped_ids(tokenizer) if tokenizer is not None else None
        self._grammars: GrammarCompiler | None = None  # built on the first response_format request
        self._static_rope = self._rope_spec().kind in _STATIC_ROPE_KINDS
        self.stats = EngineStats()
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._requests: dict[str, _Request] = {}
        self._pending_aborts: list[str] = []
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # An engine is runtime state, not model state: copies and pickles of a model that carries one get none.
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_none, ())

    # ------------------------------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_ids,
        params: SamplingParams | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Seq[int] | None = None,
        visual_features: torch.Tensor | None = None,
        image_digests: Seq[str | None] | None = None,
        images: Seq[ImageInput] | None = None,
        request_id: str | None = None,
        sink=None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError for a request that can never run, QueueFull when
        the bounded queue is full.

        Images (all tiles in prompt order, one block of <IMG_CONTEXT> tokens per image, INTERNVL.md §8.2):
        `pixel_values` (T, 3, S, S) with `num_patches_list` (tiles per image; default one image), or
        `visual_features` (T, N, D) likewise, or `images` (a list of `ImageInput`). `image_digests` gives each
        image's content id (default: a hash of its tiles).
        """
        return self._add(prompt_ids, params, pixel_values, num_patches_list, visual_features, image_digests,
                         images, request_id, sink).id

    def _add(self, prompt_ids, params, pixel_values, num_patches_list, visual_features, image_digests, images,
             request_id, sink) -> _Request:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = _as_id_list(prompt_ids)
        images = self._collect_images(pixel_values, num_patches_list, visual_features, image_digests, images)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        self._check_response_format(params)
        positions = self._image_positions(ids, images)
        self._check_fits(len(ids), params)

        keys: list = list(ids)
        if images:
            row_owner = []  # (short image id, row within the image) for every image token, in order
            for img in images:
                short = hashlib.sha256(repr(img.key).encode()).hexdigest()[:32]
                rows = img.num_tiles * self._tokens_per_tile(img)
                row_owner.extend((short, r) for r in range(rows))
            for k, p in enumerate(positions.tolist()):
                keys[p] = row_owner[k]
        hashes = hash_prompt_blocks(keys, self.pool.block_size, self._rope_regime(len(ids)))

        with self._cv:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in use")
            req = _Request(rid, params, ids, images, positions, sink)
            seq = Sequence(next(self._seq_ids), req, 0, list(ids), len(ids), hashes, pending_forks=params.n - 1)
            for i in range(params.n):
                gen = None
                if params.seed is not None:
                    gen = torch.Generator(device=self.device).manual_seed(sequence_seed(params.seed, i))
                text = SequenceText(self.tokenizer, params.stop, self._drop) if self.tokenizer is not None else None
                out = CompletionOutput(i, logprobs=[] if params.logprobs else None)
                constraint = self._grammars.constraint(params.response_format) if params.response_format else None
                req.choices.append(_Choice(out, gen, text, seq if i == 0 else None, constraint))
                req.output.outputs.append(out)
            self.scheduler.add(seq)  # may raise QueueFull
            self._requests[rid] = req
            self._cv.notify_all()
        return req

    def _tokens_per_tile(self, img: ImageInput) -> int:
        return int(img.features.shape[1]) if img.features is not None else self.model.config.num_image_token

    def _collect_images(self, pixel_values, num_patches_list, visual_features, image_digests, images):
        given = [x is not None for x in (pixel_values, visual_features, images)]
        if sum(given) > 1:
            raise ValueError("give images as one of pixel_values, visual_features or images")
        if images is not None:
            out = list(images)
            if not all(isinstance(i, ImageInput) for i in out):
                raise ValueError("images must be ImageInput objects")
            return out
        src = pixel_values if pixel_values is not None else visual_features
        if src is None:
            if num_patches_list:
                raise ValueError(f"num_patches_list={list(num_patches_list)} was given without pixel_values")
            return []
        if src.ndim != 4 and pixel_values is not None:
            raise ValueError(f"pixel_values must have shape (tiles, 3, H, W), got {tuple(src.shape)}")
        patches = [int(src.shape[0])] if num_patches_list is None else [int(n) for n in num_patches_list]
        if sum(patches) != src.shape[0] or any(n < 1 for n in patches):
            raise ValueError(f"num_patches_list {patches} sums to {sum(patches)} tiles but the images have "
                             f"{src.shape[0]}")
        digests = list(image_digests) if image_digests is not None else [None] * len(patches)
        if len(digests) != len(patches):
            raise ValueError(f"{len(digests)} image_digests for {len(patches)} images")
        out, start = [], 0
        for n, digest in zip(patches, digests):
            part = src[start : start + n]
            start += n
            out.append(ImageInput(pixel_values=part, digest=digest) if pixel_values is not None
                       else ImageInput(features=part, digest=digest))
        return out

    def _image_positions(self, ids: list[int], images: list[ImageInput]) -> torch.Tensor:
        img_id = self.model.img_context_token_id
        if not images:
            return torch.empty(0, dtype=torch.long)  # without images, <IMG_CONTEXT> is a plain token (§8.3 step 5)
        if img_id is None:
            raise ValueError("img_context_token_id is not set; it comes from the tokenizer's <IMG_CONTEXT> token")
        positions = torch.tensor([i for i, t in enumerate(ids) if t == img_id], dtype=torch.long)
        rows = sum(img.num_tiles * self._tokens_per_tile(img) for img in images)
        if len(positions) != rows:
            tiles = sum(img.num_tiles for img in images)
            raise ValueError(
                f"prompt has {len(positions)} <IMG_CONTEXT> slots but the images produce {rows} feature rows "
                f"({tiles} tiles); the number of <image> placeholders or num_patches_list does not match the images"
            )
        return positions

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        """A request must be able to run alone in the whole pool, or preemption could not guarantee progress."""
        pool = self.pool
        alone = pool.blocks_for(prompt_len + params.max_new_tokens)
        forks = pool.blocks_for(prompt_len) + (params.n - 1)
        if max(alone, forks) > pool.num_blocks:
            raise ValueError(
                f"request needs {max(alone, forks)} KV blocks (prompt {prompt_len} + max_new_tokens "
                f"{params.max_new_tokens} tokens, n={params.n}) but the pool has {pool.num_blocks} blocks of "
                f"{pool.block_size} tokens; lower max_new_tokens or raise the KV budget"
            )
        if params.n > self.scheduler.max_batch_size:
            raise ValueError(f"n={params.n} exceeds max_batch_size={self.scheduler.max_batch_size}")

    def _check_response_format(self, params: SamplingParams) -> None:
        if params.response_format is None:
            return
        if self.tokenizer is None:
            raise ValueError("response_format needs an engine with a tokenizer")
        if params.ignore_eos and not params.stop_token_ids:
            raise ValueError("response_format needs an end token to end the document: ignore_eos=True without "
                             "stop_token_ids leaves none")
        if not self.eos_token_ids and not params.stop_token_ids:
            raise ValueError("response_format needs an end token: the engine has no eos_token_ids and the request "
                             "no stop_token_ids")
        with self._lock:
            if self._grammars is None:
                vocab = self.model.language_model.config.vocab_size  # logits width, whatever the lm_head
                self._grammars = GrammarCompiler(self.tokenizer, vocab, self._drop)
            self._grammars.constraint(params.response_format)  # compile now: errors surface before queuing

    def abort(self, request_id: str, wait: bool = True) -> bool:
        """Stop a request and free its KV blocks now. With wait=False (event-loop callers) and a step in progress,
        the abort is applied right after that step. Returns False if the request is unknown or already done."""
        if not self._lock.acquire(blocking=wait):
            self._pending_aborts.append(request_id)
            return False
        try:
            req = self._requests.get(request_id)
            if req is None:
                return False
            self._finish_request(req, "abort")
            return True
        finally:
            self._lock.release()

    def _apply_pending_aborts(self) -> None:
        while self._pending_aborts:
            rid = self._pending_aborts.pop()
            req = self._requests.get(rid)
            if req is not None:
                self._finish_request(req, "abort")

    def _finish_request(self, req: _Request, reason: str, error: BaseException | None = None) -> None:
        """End every unfinished choice of `req` with `reason`, release its blocks, close its stream."""
        for choice in req.choices:
            if choice.seq is not None and choice.seq.status != FINISHED:
                self.scheduler.remove(choice.seq)
            if choice.output.finish_reason is None:
                choice.output.finish_reason = reason
                if req.sink is not None:
                    req.sink(Delta(req.id, choice.output.index, "", finish_reason=reason))
        # a parent that never forked: its children had no sequence; their blocks went with the parent's
        req.output.error = error
        self._close(req, error)

    def _close(self, req: _Request, error: BaseException | None = None) -> None:
        req.output.finished = True
        req.features = None
        self._requests.pop(req.id, None)
        if req.sink is not None:
            if error is not None:
                req.sink(error)
            req.sink(_DONE)
        req.done.set()

    # ------------------------------------------------------------------------------------------ the step
    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Delta]:
        """One scheduling step; returns the deltas it produced (empty when there was nothing to do)."""
        with self._lock, torch.inference_mode():
            self._apply_pending_aborts()
            plan = self.scheduler.schedule()
            self.stats.preemptions = self.scheduler.num_preemptions
            self.stats.cached_prompt_tokens = self.scheduler.num_cached_tokens
            if not plan.works:
                return []
            try:
                return self._run(plan.works)
            except Exception as exc:  # fail only this step's requests; the engine stays usable
                for req in {id(w.seq.request): w.seq.request for w in plan.works}.values():
                    if req.id in self._requests:
                        self._finish_request(req, "error", exc)
                raise

    def _run(self, works: list[Work]) -> list[Delta]:
        st = self.stats
        st.steps += 1
        n_decode = sum(1 for w in works if w.n == 1 and w.start >= w.seq.prompt_len)
        st.decode_tokens += n_decode
        st.prefill_tokens += sum(w.n for w in works) - n_decode
        st.mixed_steps += int(0 < n_decode < len(works))
        st.max_running = max(st.max_running, len(self.scheduler.running))
        self._encode_images(works)
        sampled = []
        for group in ([w for w in works if w.n == 1], [w for w in works if w.n > 1]):
            if group:
                sampled += self._forward(group)
        for w in works:
            self.scheduler.advance(w)
        deltas = []
        for w, logits in sampled:
            deltas += self._sample(w.seq, logits)
        for w in works:  # vision features are only needed until the prompt is cached
            req = w.seq.request
            if req.features is not None and all(
                c.seq is None or c.seq.num_computed >= c.seq.prompt_len or c.seq.status == FINISHED
                for c in req.choices
            ):
                req.features = None
        return deltas

    def _encode_images(self, works: list[Work]) -> None:
        need: dict[int, _Request] = {}
        for w in works:
            req = w.seq.request
            pos = req.image_positions
            if req.features is None and len(pos) and w.start <= int(pos[-1]) and w.start + w.n > int(pos[0]):
                need[id(req)] = req
        if not need:
            return
        reqs = list(need.values())
        feats = self.vision.encode([img for req in reqs for img in req.images])
        k = 0
        dim = self.model.language_model.config.hidden_size
        for req in reqs:
            parts = feats[k : k + len(req.images)]
            k += len(req.images)
            req.features = torch.cat([f.reshape(-1, dim) for f in parts])  # (num image tokens, D)

    def _forward(self, group: list[Work]) -> list[tuple[Work, torch.Tensor]]:
        """Run one right-padded (B, n) forward through the paged cache; logits of the sequences that sample."""
        lm = self.model.language_model
        b, n = len(group), max(w.n for w in group)
        ids = torch.zeros(b, n, dtype=torch.long)
        pos = torch.zeros(b, n, dtype=torch.long)
        for i, w in enumerate(group):
            ids[i, : w.n] = torch.tensor(w.seq.token_ids[w.start : w.start + w.n])
            # padding queries repeat the last real position: no length beyond the real one reaches the RoPE
            pos[i] = torch.arange(w.start, w.start + n).clamp(max=w.start + w.n - 1)
        embeds = lm.get_input_embeddings()(ids.to(self.device))  # (B, n, D)
        for i, w in enumerate(group):
            self._splice_images(embeds[i], w)
        batch = self.pool.batch([w.seq.block_table for w in group], [w.start for w in group], [w.n for w in group])
        rope = self._rope(group, pos)
        hidden = lm(embeds, position_ids=pos.to(self.device), cache=batch, mask=batch.mask(embeds.dtype), rope=rope)
        rows = [i for i, w in enumerate(group) if w.samples]
        if not rows:
            return []
        last = hidden[rows, [group[i].n - 1 for i in rows]]  # (k, D)
        logits = lm.lm_head(last).float()  # (k, V)
        return [(group[i], logits[j]) for j, i in enumerate(rows)]

    def _splice_images(self, embeds: torch.Tensor, w: Work) -> None:
        """Overwrite the <IMG_CONTEXT> rows of this chunk with their vision features, in order (§8.3)."""
        req = w.seq.request
        pos = req.image_positions
        if not len(pos):
            return
        lo = int(torch.searchsorted(pos, w.start))
        hi = int(torch.searchsorted(pos, w.start + w.n))
        if hi > lo:
            embeds[pos[lo:hi] - w.start] = req.features[lo:hi].to(embeds.dtype)

    # ------------------------------------------------------------------------------------------ RoPE
    def _rope_spec(self):
        """The eager `RotaryEmbedding` (its kind, lengths, state), also when `internvl.model.fast` has wrapped it
        in a cos/sin table (which it does for the length-independent kinds only)."""
        rot = self.model.language_model.model.rotary
        return getattr(rot, "rope", rot)

    def _rope(self, group: list[Work], pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, n, d) with each token's reference length: the prompt length for prompt tokens (one
        prefill call in the reference), position + 1 for generated tokens (one decode call each)."""
        if self._static_rope:
            return self.model.language_model.model.rotary(pos.to(self.device))
        rot = self._rope_spec()
        b, n = pos.shape
        d = rot.dim
        cos = torch.empty(b, n, d, device=self.device)
        sin = torch.empty(b, n, d, device=self.device)
        for i, w in enumerate(group):
            p = pos[i]
            lengths = torch.where(p < w.seq.prompt_len, torch.full_like(p, w.seq.prompt_len), p + 1)
            for length in sorted(set(lengths.tolist())):
                sel = lengths == length
                # the rotary picks its frequencies from max(position) + 1 (InternLM2: kv_len); appending position
                # length - 1 makes both equal `length` without touching the model code
                ext = torch.cat([p[sel], torch.tensor([length - 1])])[None].to(self.device)
                c, s = rot(ext, kv_len=length)
                cos[i, sel.to(self.device)] = c[0, :-1]
                sin[i, sel.to(self.device)] = s[0, :-1]
        return cos, sin

    def _rope_regime(self, prompt_len: int):
        """What, besides the tokens, the cached K of a prompt block depends on: the RoPE frequencies in force."""
        rot = self._rope_spec()
        if self._static_rope:
            return None
        if rot.kind in ("su", "yarn"):
            return "long" if prompt_len > rot.orig_len else None
        if rot.family == "InternLM2ForCausalLM":  # stateful in the reference: the grown base persists
            length = max(prompt_len, rot.cached_len)
        else:
            length = prompt_len
        return None if length <= rot.max_len else ("ntk", length)

    # ------------------------------------------------------------------------------------------ sampling
    def _sample(self, seq: Sequence, logits: torch.Tensor) -> list[Delta]:
        req = seq.request
        seqs = [seq]
        while seq.pending_forks:  # n > 1: the other choices start from this prompt's KV
            child = Sequence(next(self._seq_ids), req, seq.index + len(seqs), list(seq.token_ids), seq.prompt_len,
                             seq.block_hashes, counts_in_queue=False)
            self.scheduler.fork(seq, child)
            req.choices[child.index].seq = child
            seqs.append(child)
        return [self._append(s, logits) for s in seqs]

    def _append(self, seq: Sequence, logits: torch.Tensor) -> Delta:
        req, params = seq.request, seq.request.params
        choice = req.choices[seq.index]
        out = choice.output
        eos = () if params.ignore_eos else self.eos_token_ids
        stop_ids = eos + params.stop_token_ids
        generated = seq.token_ids[seq.prompt_len :]
        constraint, forbidden, suppress = choice.constraint, None, stop_ids
        if constraint is not None:  # response_format: the grammar's mask; a complete document may end at once
            forbidden, suppress = constraint.forbidden(stop_ids), () if constraint.complete else stop_ids
        token = sample_token(logits, generated, params, choice.generator, suppress, forbidden)
        if constraint is not None and token not in stop_ids:
            constraint.advance(token)
        lp = token_logprob(logits, token, params.top_logprobs) if params.logprobs else None
        seq.token_ids.append(token)
        out.token_ids.append(token)
        if lp is not None:
            out.logprobs.append(lp)
        n_gen = seq.num_generated
        text, reason, stop_reason = "", None, None
        if token in stop_ids:  # only reachable once min_new_tokens exist: they are masked before that
            reason, stop_reason = "stop", token
        elif choice.text is not None:
            text, matched = choice.text.add(token, check_stops=n_gen >= params.min_new_tokens)
            if matched is not None:
                reason, stop_reason = "stop", matched
        if reason is None and n_gen >= params.max_new_tokens:
            reason = "length"
        if reason is not None and choice.text is not None and not isinstance(stop_reason, str):
            more, matched = choice.text.finish()
            text += more
            if matched is not None:
                stop_reason = matched
        out.text += text
        if reason is not None:
            out.finish_reason, out.stop_reason = reason, stop_reason
            self.scheduler.remove(seq)
        delta = Delta(req.id, seq.index, text, (token,), (lp,) if lp is not None else (), reason, stop_reason)
        if req.sink is not None:
            req.sink(delta)
        if reason is not None and req.all_finished:
            req.output.num_cached_tokens = req.choices[0].seq.num_cached_tokens
            self._close(req)
        return delta

    # ------------------------------------------------------------------------------------------ front ends
    def generate(self, requests: Iterable, params: SamplingParams | None = None) -> list[RequestOutput]:
        """Offline: run all requests to completion. Each item is a prompt (list of ids / 1-D tensor) or a dict of
        `add_request` keywords (`prompt_ids`, `params`, `pixel_values`, ...); `params` is the default."""
        reqs: list[_Request] = []
        try:
            for r in requests:
                kw = dict(r) if isinstance(r, dict) else {"prompt_ids": r}
                kw.setdefault("params", params)
                reqs.append(self._add(kw.pop("prompt_ids"), kw.pop("params"), kw.pop("pixel_values", None),
                                      kw.pop("num_patches_list", None), kw.pop("visual_features", None),
                                      kw.pop("image_digests", None), kw.pop("images", None),
                                      kw.pop("request_id", None), None))
                if kw:
                    raise ValueError(f"unknown request field(s) {sorted(kw)}")
            while not all(r.done.is_set() for r in reqs):
                if self.is_running:
                    next(r for r in reqs if not r.done.is_set()).done.wait(0.1)
                elif not self.step() and not self.scheduler.has_work:
                    raise RuntimeError("engine has no work left but requests are unfinished")
        except BaseException:
            for r in reqs:
                self.abort(r.id)
            raise
        return [r.output for r in reqs]

    def stream(self, prompt_ids, params: SamplingParams | None = None, **kwargs) -> RequestStream:
        """Sync stream of `Delta`s (`delta.text` is the new text). The request is queued now (QueueFull / ValueError
        surface here); closing the stream aborts it."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        rid = self.add_request(prompt_ids, params, sink=events.put, **kwargs)
        return RequestStream(self, rid, events)

    def astream(self, prompt_ids, params: SamplingParams | None = None, **kwargs) -> AsyncRequestStream:
        """Async stream of `Delta`s; call from a running event loop. Starts the background engine thread."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev):
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        rid = self.add_request(prompt_ids, params, sink=sink, **kwargs)
        self.start()
        return AsyncRequestStream(self, rid, events)

    # ------------------------------------------------------------------------------------------ background loop
    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the engine loop in a daemon thread (idempotent)."""
        with self._lock:
            if self.is_running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="internvl-engine", daemon=True)
            self._thread.start()

    def shutdown(self, abort_requests: bool = True) -> None:
        """Stop the background loop (and abort what is left)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if abort_requests:
            for rid in list(self._requests):
                self.abort(rid)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._apply_pending_aborts()
                while not self._stopping and not self.scheduler.has_work:
                    self._cv.wait(timeout=0.5)
                    self._apply_pending_aborts()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # already reported to the step's requests; keep serving the others
                pass


def _none():
    return None


def _as_id_list(prompt_ids) -> list[int]:
    if hasattr(prompt_ids, "tolist"):
        if getattr(prompt_ids, "ndim", 1) == 2:
            if prompt_ids.shape[0] != 1:
                raise ValueError(f"one prompt per request; got a batch of {prompt_ids.shape[0]}")
            prompt_ids = prompt_ids[0]
        prompt_ids = prompt_ids.tolist()
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty")
    return ids
