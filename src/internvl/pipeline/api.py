"""`pipeline()`: LMDeploy's VLM pipeline API over our engine (continuous batching, prefix and vision caches).

    pipe = pipeline()                                   # the shipped demo model; or a directory / hub id
    pipe(("describe this image", "photo.jpg")).text     # one prompt -> Response
    pipe([prompt_a, prompt_b, ...])                     # a batch -> [Response], all submitted at once
    for piece in pipe.stream_infer(prompts): ...        # Response pieces (new text) with their prompt's .index
    session = pipe.chat(("what is it?", img)); session = pipe.chat("and its color?", session)

Prompts are built as `chat()` builds them (`messages.py`, INTERNVL.md §8.1), and the answer text is `chat()`'s
decoding (`api.chat.answer_text`), so a greedy answer equals `model.chat(...)` for the same prompt
(tests/pipeline/test_pipeline.py).
Every prompt of a call is validated (and its images opened and tiled) before any is submitted: a bad prompt fails
the whole call with an error that names it (the engine's own admission checks, e.g. a KV pool too small for one
request, abort whatever the call had submitted). The engine is driven from the calling thread.
"""

from __future__ import annotations

import itertools
import queue
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from internvl.api.chat import answer_text as chat_answer_text
from internvl.engine.engine import Delta, Engine
from internvl.engine.stopping import REPLACEMENT_CHAR, StopStrings
from internvl.engine.vision_cache import ImageInput
from internvl.pipeline.config import GenerationConfig, PipelineConfig, Response
from internvl.pipeline.messages import (
    IMAGE_TOKEN,
    ImageRef,
    Turn,
    is_single,
    parse_messages,
    render_prompt,
    to_messages,
)
from internvl.preprocessing.image import load_image
from internvl.templates.conversation import get_template
from internvl.tokenizer import decode_keep_grounding, eos_id_for_template, image_context_id

PROGRESS_MIN_PROMPTS = 16  # batches at least this large show a progress bar on stderr (use_tqdm=None)


@dataclass
class Session:
    """A multi-turn conversation for `Pipeline.chat`. history: (prompt as given, answer text) per turn;
    response: the last turn's Response."""

    session_id: int
    history: list[tuple] = field(default_factory=list)
    response: Response | None = None
    system_message: str | None = None
    turns: list[Turn] = field(default_factory=list)  # the conversation so far, images already tiled

    @property
    def num_images(self) -> int:
        return sum(len(t.images) for t in self.turns)


@dataclass
class _Request:
    """One validated prompt, ready for the engine."""

    prompt_ids: list[int]
    images: list[ImageInput]
    gen: GenerationConfig
    max_new_tokens: int


class _AnswerState:
    """The growing answer of one request: token ids, logprobs, and the text streamed so far."""

    def __init__(self, pipe: "Pipeline", req: _Request):
        self.pipe, self.req = pipe, req
        self.ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if req.gen.logprobs is not None else None
        self.emitted = ""  # text handed out by stream pieces so far

    def add(self, delta: Delta) -> None:
        self.ids.extend(delta.token_ids)
        if self.logprobs is not None:
            self.logprobs += [{lp.token_id: lp.logprob, **dict(lp.top)} for lp in delta.logprobs]

    def answer_ids(self, stop_reason) -> list[int]:
        # an answer that ended on a stop token (end of turn or stop_token_ids) does not include it (LMDeploy)
        return self.ids[:-1] if isinstance(stop_reason, int) and self.ids[-1:] == [stop_reason] else self.ids

    def new_text(self, finished: bool, stop_reason=None) -> str:
        """Text not yet emitted. While running, a possibly incomplete character and a possible stop-string start
        are held back; trailing whitespace is too (the final text is stripped, as `chat()` strips it)."""
        ids = self.answer_ids(stop_reason) if finished else self.ids
        text = self.pipe.decode(ids, self.req.gen, stop_reason if finished else None)
        if not finished:
            if text.endswith(REPLACEMENT_CHAR):
                return ""
            stops = StopStrings(self.req.gen.stop_words)
            text = stops.feed(text)  # cut at a stop string; hold back a possible start of one
        if not text.startswith(self.emitted):
            return ""  # cannot happen for prefix-stable decoding; never emit text that would be taken back
        new, self.emitted = text[len(self.emitted):], text
        return new

    def response(self, index: int, finish_reason, stop_reason) -> Response:
        ids = self.answer_ids(stop_reason)
        return Response(self.pipe.decode(ids, self.req.gen, stop_reason), len(ids), len(self.req.prompt_ids),
                        finish_reason, list(ids), self.logprobs[: len(ids)] if self.logprobs is not None else None,
                        index)


class Pipeline:
    """See the module docstring. Built by `pipeline()`, or from a loaded model (`InternVLModel` or
    `InternVLChatModel`) and its tokenizer."""

    def __init__(self, model, tokenizer, config: PipelineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or PipelineConfig()
        cfg = model.config
        self.template = get_template(cfg.template)
        self.eos_id = eos_id_for_template(tokenizer, self.template)
        model.img_context_token_id = image_context_id(tokenizer)
        self.session_len = config.session_len or cfg.llm.max_position_embeddings
        self.max_dynamic_patch = config.max_dynamic_patch or cfg.max_dynamic_patch
        self.system_message = (config.system_message if config.system_message is not None
                               else getattr(model, "system_message", None))
        self.engine = Engine(model, tokenizer, kv_budget_bytes=config.kv_cache_bytes,
                             max_batch_size=config.max_batch_size, vision_cache_size=config.vision_cache_size,
                             enable_prefix_caching=config.enable_prefix_caching)
        self._session_ids = itertools.count()

    # ------------------------------------------------------------------------------------------ public API
    def __call__(self, prompts, gen_config: GenerationConfig | list[GenerationConfig] | None = None,
                 use_tqdm: bool | None = None):
        """One prompt -> Response; a list of prompts -> [Response] in order. use_tqdm: progress bar on stderr
        (None: for batches of PROGRESS_MIN_PROMPTS or more)."""
        single = is_single(prompts)
        reqs = [self._request(system, turns, gen) for (system, turns), gen in self._batch(prompts, gen_config)]
        show = use_tqdm if use_tqdm is not None else len(reqs) >= PROGRESS_MIN_PROMPTS
        out = self._collect(reqs, show)
        return out[0] if single else out

    infer = __call__

    def stream_infer(self, prompts, gen_config: GenerationConfig | list[GenerationConfig] | None = None
                     ) -> Iterator[Response]:
        """Response pieces as they are generated, interleaved across prompts (`.index` says whose). Each piece
        carries its new text and token ids; the last piece of a prompt has finish_reason set. The pieces of one
        prompt concatenate to its full answer. Closing the iterator early aborts the unfinished requests."""
        reqs = [self._request(system, turns, gen) for (system, turns), gen in self._batch(prompts, gen_config)]
        return self._stream(reqs)

    def session(self) -> Session:
        return Session(next(self._session_ids), system_message=self.system_message)

    def chat(self, prompt, session: Session | None = None, gen_config: GenerationConfig | None = None,
             stream_response: bool = False):
        """One turn of a conversation. Returns the session (its `.response` and `.history` updated), or with
        stream_response=True an iterator of Response pieces that updates the session when it ends."""
        session = session if session is not None else self.session()
        gen = self._gen(gen_config)
        system, turns = parse_messages(to_messages(prompt), session.num_images + 1)
        if system is not None and session.turns:
            raise ValueError("a system message can only be given on the first turn of a session")
        system = system if system is not None else session.system_message
        conversation = self._load_images(session.turns + turns, already_loaded=len(session.turns))
        req = self._request(system, conversation, gen)
        new_turns = conversation[len(session.turns):]

        def commit(resp: Response) -> None:
            session.system_message = system
            session.turns = session.turns + new_turns + [Turn("assistant", resp.text)]
            session.history.append((prompt, resp.text))
            session.response = resp

        if not stream_response:
            commit(self._collect([req], False)[0])
            return session
        # the session changes only once the whole answer exists: an abandoned stream leaves it as it was
        return self._stream([req], on_finish=commit)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ text
    def decode(self, ids: list[int], gen: GenerationConfig, stop_string=None) -> str:
        """The answer text of generated ids as `chat()` decodes it (grounding tags kept, INTERNVL.md §8.6); cut
        before a stop string. With ignore_eos, text after an end-of-turn token is kept (it was asked for)."""
        if gen.skip_special_tokens and not gen.ignore_eos:
            text = chat_answer_text(self.tokenizer, self.template, ids, self.eos_id)
        elif gen.skip_special_tokens:
            text = decode_keep_grounding(self.tokenizer, ids).strip()
        else:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            text = (text if gen.ignore_eos else text.split(self.template.end_of_turn)[0]).strip()
        if isinstance(stop_string, str):
            text = text.split(stop_string)[0].strip()
        return text

    # ------------------------------------------------------------------------------------------ inputs
    def _gen(self, gen_config) -> GenerationConfig:
        if gen_config is None:
            return GenerationConfig()
        if not isinstance(gen_config, GenerationConfig):
            raise ValueError(f"gen_config must be an internvl GenerationConfig, got {type(gen_config).__name__}")
        return gen_config

    def _batch(self, prompts, gen_config) -> list[tuple[tuple[str | None, list[Turn]], GenerationConfig]]:
        items = [prompts] if is_single(prompts) else prompts
        if not isinstance(items, list) or not items:
            raise ValueError("prompts must be one prompt or a non-empty list of prompts")
        gens = gen_config if isinstance(gen_config, list) else [gen_config] * len(items)
        if len(gens) != len(items):
            raise ValueError(f"{len(gens)} gen_configs for {len(items)} prompts; give one, or one per prompt")
        out = []
        for i, (prompt, gen) in enumerate(zip(items, gens)):
            where = "prompt" if len(items) == 1 else f"prompts[{i}]"
            system, turns = parse_messages(to_messages(prompt, where), where=where)
            system = system if system is not None else self.system_message
            out.append(((system, self._load_images(turns, 0, where)), self._gen(gen)))
        return out

    def _load_images(self, turns: list[Turn], already_loaded: int = 0, where: str = "prompt") -> list[Turn]:
        """Open and tile the images of turns[already_loaded:] (earlier turns of a session hold tiles already)."""
        loaded = list(turns[:already_loaded])
        for k, turn in enumerate(turns[already_loaded:]):
            tiles = tuple(self._tiles(ref, f"{where}, image {j + 1} of message {k + 1}")
                          for j, ref in enumerate(turn.images))
            loaded.append(Turn(turn.role, turn.text, tiles))
        return loaded

    def _tiles(self, ref: ImageRef, where: str) -> torch.Tensor:
        """(T, 3, S, S) tiles with the checkpoint's tiling (`load_image`, the model-card function)."""
        cfg = self.model.config
        max_num = ref.max_dynamic_patch or self.max_dynamic_patch
        try:
            return load_image(open_image_source(ref.source), input_size=cfg.image_size,
                              max_num=max_num if cfg.dynamic_image_size else 1, use_thumbnail=cfg.use_thumbnail)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: {e}") from e
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: {e}") from e

    def _request(self, system: str | None, turns: list[Turn], gen: GenerationConfig) -> _Request:
        tiles = [t for turn in turns for t in turn.images]
        prompt = render_prompt(self.model.config.template, system, turns, [t.shape[0] for t in tiles],
                               self.model.config.num_image_token)
        ids = self.tokenizer(prompt)["input_ids"]
        slots = sum(1 for t in ids if t == self.model.img_context_token_id)
        if slots != sum(t.shape[0] for t in tiles) * self.model.config.num_image_token:
            raise ValueError("the prompt text must not contain the image token <IMG_CONTEXT>; give images as "
                             f"images and mark their places with {IMAGE_TOKEN} or <image>")
        room = self.session_len - len(ids)
        if room < 1:
            raise ValueError(f"the prompt is {len(ids)} tokens (images included) but session_len is "
                             f"{self.session_len}; shorten it, use fewer tiles (max_dynamic_patch) or raise "
                             "session_len")
        max_new = min(gen.max_new_tokens, room)
        gen.to_sampling_params(max_new)  # fail before anything is submitted
        return _Request(ids, [ImageInput(pixel_values=t) for t in tiles], gen, max_new)

    # ------------------------------------------------------------------------------------------ running
    def _events(self, reqs: list[_Request]) -> Iterator[tuple[int, Delta]]:
        """Submit every request at once, then drive the engine; yields (request index, Delta) as they come.
        Leaving early (error, close) aborts what is unfinished and frees its KV blocks."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        ids: list[str] = []
        try:
            for i, r in enumerate(reqs):
                ids.append(self.engine.add_request(r.prompt_ids, r.gen.to_sampling_params(r.max_new_tokens),
                                                   images=r.images, sink=lambda ev, i=i: events.put((i, ev))))
            running = set(range(len(reqs)))
            while running:
                try:
                    i, ev = events.get_nowait()
                except queue.Empty:
                    if self.engine.is_running:  # someone started the background loop: wait for it
                        try:
                            i, ev = events.get(timeout=0.1)
                        except queue.Empty:
                            continue
                    else:
                        if not self.engine.step() and events.empty() and not self.engine.has_work:
                            raise RuntimeError("the engine has no work left but requests are unfinished")
                        continue
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, Delta):
                    if ev.finish_reason not in (None, "error"):  # "error" is followed by the exception itself
                        running.discard(i)
                    yield i, ev
        finally:
            for rid in ids:
                self.engine.abort(rid)  # no-op for finished requests

    def _collect(self, reqs: list[_Request], progress: bool) -> list[Response]:
        states = [_AnswerState(self, r) for r in reqs]
        out: list[Response | None] = [None] * len(reqs)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), file=sys.stderr, unit="prompt", desc="internvl")
        try:
            for i, delta in self._events(reqs):
                states[i].add(delta)
                if delta.finish_reason is not None:
                    out[i] = states[i].response(i, delta.finish_reason, delta.stop_reason)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return out  # type: ignore[return-value]

    def _stream(self, reqs: list[_Request], on_finish=None) -> Iterator[Response]:
        """Response pieces; on_finish(response) gets each prompt's whole Response when it ends."""
        states = [_AnswerState(self, r) for r in reqs]
        pending: list[list[int]] = [[] for _ in reqs]  # token ids not yet handed out with a piece
        pending_lp: list[list] = [[] for _ in reqs]
        for i, delta in self._events(reqs):
            st = states[i]
            before = len(st.ids)
            st.add(delta)
            pending[i] += st.ids[before:]
            if st.logprobs is not None:
                pending_lp[i] += st.logprobs[before:]
            finished = delta.finish_reason is not None
            text = st.new_text(finished, delta.stop_reason)
            if not text and not finished:
                continue
            ids = pending[i]
            if finished and len(st.answer_ids(delta.stop_reason)) < len(st.ids):
                ids = ids[:-1]  # the stop token is not part of the answer
            lp = pending_lp[i][: len(ids)] if st.logprobs is not None else None
            pending[i], pending_lp[i] = [], []
            if finished and on_finish is not None:
                on_finish(st.response(i, delta.finish_reason, delta.stop_reason))
            yield Response(text, len(st.answer_ids(delta.stop_reason)) if finished else len(st.ids),
                           len(st.req.prompt_ids), delta.finish_reason, ids, lp, i)



# ---------------------------------------------------------------------------------------------- images
def open_image_source(source):
    """What `load_image` may open: PIL images, paths, data URLs, bytes pass through; `file://` URLs become paths;
    http(s) URLs are fetched by the server's safe fetcher (`internvl.serve.media`), never by `load_image`."""
    if isinstance(source, (Image.Image, bytes, bytearray, Path)) or not isinstance(source, str):
        if not isinstance(source, (Image.Image, bytes, bytearray, Path)) and not hasattr(source, "__fspath__"):
            raise ValueError(f"unsupported image type {type(source).__name__}; accepted: a PIL image, a path, "
                             "a file://, data: or http(s) URL, or bytes")
        return source
    text = source.strip()
    scheme = text[:8].lower()
    if scheme.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    if scheme.startswith(("http://", "https://")):
        return _fetch_url_safely(text)
    return source


def _fetch_url_safely(url: str) -> Image.Image:
    """The server's fetcher with its default policy (SERVING.md §5.3: public hosts only, every redirect checked,
    time, size and pixel caps); a refused or failed fetch raises MediaError, a ValueError."""
    try:
        from internvl.serve.media import MediaPolicy, load_image_url
    except ImportError as e:
        raise ValueError(f"cannot open {url[:100]!r}: http(s) images need internvl.serve.media ({e}); download "
                         "the image and pass its path or a PIL image") from None
    return load_image_url(url, MediaPolicy())


# ---------------------------------------------------------------------------------------------- construction
def pipeline(path=None, tokenizer=None, **options) -> Pipeline:
    """Load a model and build a `Pipeline`.

    path: None (the shipped demo model, as `internvl chat`), a checkpoint directory (either layout, or a
    quantized one written by `save_quantized`), a hub id, or an already loaded model (then pass `tokenizer`).
    options: the fields of `PipelineConfig` (dtype, device, quantize, max_batch_size, session_len,
    max_dynamic_patch, kv_cache_bytes, vision_cache_size, enable_prefix_caching, system_message).
    """
    config = PipelineConfig.from_options(options)
    if isinstance(path, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("pipeline(model) with a loaded model needs its tokenizer: pipeline(model, tokenizer)")
        if config.quantize is not None:
            from internvl.model.quantize import quantize_model

            quantize_model(path, config.quantize)
        return Pipeline(path, tokenizer, config)
    return Pipeline(*_load(path, tokenizer, config), config)


def _load(path, tokenizer, config: PipelineConfig):
    from internvl.api.model import InternVLChatModel
    from internvl.checkpoint.hub import resolve_model_path
    from internvl.checkpoint.loader import read_config_dict
    from internvl.demo.model import resolve_default_model
    from internvl.model.fast import optimize_for_inference
    from internvl.model.quantize import load_quantized, quantize_model
    from internvl.tokenizer import load_tokenizer

    ckpt = resolve_model_path(resolve_default_model(path))
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if read_config_dict(ckpt).get("quantization"):
        if config.quantize is not None or config.dtype is not None:
            raise ValueError(f"{ckpt} is already quantized; drop the quantize / dtype options")
        model = load_quantized(ckpt, device=device)
    else:
        model = InternVLChatModel.from_pretrained(ckpt, torch_dtype=config.dtype, device=device)
        if config.quantize is not None:
            quantize_model(model, config.quantize)
    # the pipeline owns this model: swap in the fused inference modules (same logits, tests/model/test_fast.py)
    optimize_for_inference(model)
    return model.eval(), tokenizer if tokenizer is not None else load_tokenizer(ckpt)
