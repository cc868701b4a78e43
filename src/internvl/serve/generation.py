"""From a prepared prompt to OpenAI responses: engine parameters, admission, the JSON response, the SSE stream
(SERVING.md §4, §6, §7).

    streams = [await submit(engine, engine_id, ids, params, pixel_values, patches)]   # 429 when the queue is full
    events = merge(streams)                      # (choice offset, Delta) from every engine request of the call
    first = await first_event(events, timeout)   # 503 queue_timeout before any byte is sent
    body = await collect_chat(call, first, events) | sse = chat_sse(call, first, events)

Cancellation is the only abort path the HTTP layer uses: cancelling a task that awaits an engine stream makes the
engine's `AsyncRequestStream` abort the request and free its KV blocks (the engine owns the cleanup, §6).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from internvl.engine import AsyncRequestStream, QueueFull, SamplingParams
from internvl.serve.errors import APIError, ErrorCode, internal
from internvl.serve.protocol import Sampling
from internvl.serve.timeouts import within

log = logging.getLogger("internvl.serve")
_END = object()


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"  # 32 hex characters (§9)


@dataclass
class Call:
    """One generation request from arrival to its last byte: ids, counts and timings for the response, the metrics
    and the one log line per request (§9)."""

    request_id: str
    completion_id: str
    model: str
    kind: str  # "chat" | "completion"
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices per engine request
    arrived: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_tokens: int = 0
    num_images: int = 0
    num_tiles: int = 0
    logprobs: bool = False
    echo: tuple[str, ...] = ()  # completions with echo: the prompt text per engine request
    engine_ids: list[str] = field(default_factory=list)
    # outcome
    status: int = 200
    completion_tokens: int = 0
    admitted: bool = False  # every engine request of the call was queued
    submitted_at: float | None = None
    first_event_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reasons: dict[int, str] = field(default_factory=dict)
    abort_reason: str | None = None
    error_code: str | None = None


def engine_params(s: Sampling, max_new_tokens: int) -> SamplingParams:
    kw = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=min(s.min_tokens, max_new_tokens), temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, seed=s.seed, stop=s.stop, n=s.n,
        logprobs=s.logprobs, top_logprobs=s.top_logprobs, ignore_eos=s.ignore_eos,
    )
    if s.constraint is not None:  # response_format: the engine field that constrained decoding adds goes here
        kw.update(s.constraint)
    return SamplingParams(**kw)


# ---------------------------------------------------------------------------------------------- admission
async def submit(engine, engine_id: str, prompt_ids, params: SamplingParams, pixel_values=None,
                 num_patches_list=None) -> AsyncRequestStream:
    """Queue one engine request without blocking the event loop on the engine's lock (held during a step).
    QueueFull -> 429 (§7). If the caller is cancelled meanwhile, the request is aborted as soon as it exists."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(ev):
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    add = functools.partial(engine.add_request, prompt_ids, params, pixel_values=pixel_values,
                            num_patches_list=num_patches_list, request_id=engine_id, sink=sink)
    fut = loop.run_in_executor(None, add)
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() or engine.abort(engine_id, wait=False))
        raise
    except QueueFull:
        raise APIError(ErrorCode.OVERLOADED, "The server is busy: the request queue is full; retry shortly.") from None
    except ValueError as e:  # a request the engine can never run (our own checks should have caught it)
        raise APIError(ErrorCode.INVALID_REQUEST, str(e)) from None
    engine.start()
    return AsyncRequestStream(engine, engine_id, events)


async def merge(streams: list[AsyncRequestStream], n: int) -> AsyncIterator[tuple[int, object]]:
    """(choice index offset, Delta) from several engine streams (one per completions prompt), as they come."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, s):
        try:
            async for d in s:
                queue.put_nowait((k * n, d))
        except Exception as e:  # engine failure: hand it to the consumer
            queue.put_nowait((k * n, e))
        finally:
            queue.put_nowait((k * n, _END))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(tasks):
            off, item = await queue.get()
            if item is _END:
                ended += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield off, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_event(call: Call, events, timeout: float):
    """The first (offset, Delta), waiting at most `timeout` s (queue + prefill); 503 queue_timeout otherwise, before
    anything is sent (§7). None when the streams ended without an event."""
    try:
        item = await within(events.__anext__(), timeout)
    except asyncio.TimeoutError:
        call.abort_reason = "timeout"
        raise APIError(ErrorCode.QUEUE_TIMEOUT, f"The request waited more than {timeout:g} s for the model; retry "
                       "later.") from None
    except StopAsyncIteration:
        return None
    call.first_event_at = time.monotonic()
    return item


# ---------------------------------------------------------------------------------------------- accumulation
class ChoiceState:
    __slots__ = ("text", "tokens", "logprobs", "finish_reason")

    def __init__(self):
        self.text: list[str] = []
        self.tokens = 0
        self.logprobs: list = []
        self.finish_reason: str | None = None


def observe(call: Call, delta, metrics) -> None:
    """Token counts and latencies of one engine delta."""
    if not delta.token_ids:
        return
    now = time.monotonic()
    if call.first_token_at is None:
        call.first_token_at = now
        if metrics is not None:
            metrics.ttft.observe(now - call.arrived)
    elif metrics is not None:
        metrics.itl.observe(now - call.last_token_at)
    call.last_token_at = now
    call.completion_tokens += len(delta.token_ids)


def usage(call: Call) -> dict:
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens}


def _chat_logprob(backend, lp) -> dict:
    def entry(token_id, value):
        text = backend.token_text(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def _legacy_logprobs(backend, lps: list, offset: int) -> dict:
    """The /v1/completions logprobs object for some tokens; text offsets start at `offset`."""
    tokens = [backend.token_text(lp.token_id) for lp in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{backend.token_text(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _engine_failure(call: Call, exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    log.error("request %s: generation failed: %s: %s", call.request_id, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return internal("Generation failed inside the engine; the error was logged on the server.")


async def _consume(call: Call, first, events, states: list[ChoiceState], metrics, on_delta=None):
    """Feed every (offset, Delta) into `states`; re-raise engine failures as APIError."""
    item = first
    try:
        while item is not None:
            off, d = item
            st = states[off + d.index]
            observe(call, d, metrics)
            st.tokens += len(d.token_ids)
            if d.text:
                st.text.append(d.text)
            st.logprobs.extend(d.logprobs)
            if d.finish_reason is not None and d.finish_reason != "error":
                st.finish_reason = d.finish_reason
                call.finish_reasons[off + d.index] = d.finish_reason
            if on_delta is not None:
                for out in on_delta(off + d.index, d, st):
                    yield out
            try:
                item = await events.__anext__()
            except StopAsyncIteration:
                item = None
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as e:
        raise _engine_failure(call, e) from None


def _shutdown_abort(call: Call, state) -> APIError | None:
    if "abort" in call.finish_reasons.values() and state is not None and state.status == "draining":
        call.abort_reason = "shutdown"
        return APIError(ErrorCode.UNAVAILABLE, "The server shut down before the response was complete; retry.",
                        code="shutting_down")
    return None


# ---------------------------------------------------------------------------------------------- JSON responses
async def collect(call: Call, first, events, backend, metrics, server_state, total_choices: int) -> dict:
    states = [ChoiceState() for _ in range(total_choices)]
    async for _ in _consume(call, first, events, states, metrics):
        pass
    err = _shutdown_abort(call, server_state)
    if err is not None:
        raise err
    choices = []
    for i, st in enumerate(states):
        text = "".join(st.text)
        if call.kind == "chat":
            lp = {"content": [_chat_logprob(backend, x) for x in st.logprobs]} if call.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": st.finish_reason or "abort"})
        else:
            echo = call.echo[i // call.n] if call.echo else ""
            lp = _legacy_logprobs(backend, st.logprobs, len(echo)) if call.logprobs else None
            choices.append({"index": i, "text": echo + text, "logprobs": lp,
                            "finish_reason": st.finish_reason or "abort"})
    obj = "chat.completion" if call.kind == "chat" else "text_completion"
    return {"id": call.completion_id, "object": obj, "created": call.created, "model": call.model,
            "choices": choices, "usage": usage(call)}


# ---------------------------------------------------------------------------------------------- SSE
def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def stream_events(call: Call, first, events, backend, metrics, total_choices: int) -> AsyncIterator[bytes]:
    """The SSE body (§4.2): role chunks, content chunks, one finish chunk per choice, the usage chunk, [DONE].
    An engine failure after the first byte becomes one error event, then [DONE] (§4.2, #36)."""
    chat = call.kind == "chat"
    head = {"id": call.completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": call.created, "model": call.model}

    def chunk(index: int, payload: dict, finish=None, logprobs=None) -> bytes:
        choice = {"index": index, **payload, "logprobs": logprobs, "finish_reason": finish}
        body = {**head, "choices": [choice]}
        if call.include_usage:
            body["usage"] = None
        return sse(body)

    def on_delta(index: int, d, st: ChoiceState):
        lps = None
        if call.logprobs and d.logprobs:
            lps = ({"content": [_chat_logprob(backend, x) for x in d.logprobs]} if chat
                   else _legacy_logprobs(backend, list(d.logprobs), 0))
        if d.text or lps:
            yield chunk(index, {"delta": {"content": d.text}} if chat else {"text": d.text}, logprobs=lps)
        if d.finish_reason is not None and d.finish_reason != "error":
            yield chunk(index, {"delta": {}} if chat else {"text": ""}, finish=d.finish_reason)

    states = [ChoiceState() for _ in range(total_choices)]
    for i in range(total_choices):
        if chat:
            yield chunk(i, {"delta": {"role": "assistant", "content": ""}})
        elif call.echo:
            yield chunk(i, {"text": call.echo[i // call.n]})
    try:
        async for out in _consume(call, first, events, states, metrics, on_delta):
            yield out
            # Queued engine events and writes do not suspend: without this a stream's backlog starves the loop, which
            # then sees a client's disconnect only after hundreds of tokens, or never (§6; tests/serve/test_load.py).
            await asyncio.sleep(0)
    except APIError as e:
        call.error_code = e.code
        if metrics is not None:
            metrics.errors.labels(e.code).inc()
        yield sse(e.body())
        yield DONE
        return
    if call.include_usage:
        yield sse({**head, "choices": [], "usage": usage(call)})
    yield DONE
