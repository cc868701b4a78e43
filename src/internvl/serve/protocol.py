"""Request validation for the OpenAI routes (SERVING.md §3): a JSON object in, a frozen normalized request out, or
an `APIError` whose `param` is the JSON path of the offending field (`messages[0].content[1].image_url.url`).

Validation is written out by hand rather than left to pydantic so that every rejection names the exact field, says
what was wrong and what is accepted, and is a 400 (never a 422 or 500). The pydantic models in `schema.py` only
document the same shapes in the OpenAPI schema.

Integer fields accept JSON numbers with an integral value (`1e9` parses as a float in JSON), never booleans.
Unknown fields are accepted and ignored (§3.3); known OpenAI fields that would change the output and that we do not
implement are refused with `unsupported_parameter`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from internvl.serve.config import ServerConfig
from internvl.serve.errors import APIError, ErrorCode

log = logging.getLogger("internvl.serve")

MAX_TOP_LOGPROBS = 20
DETAIL_VALUES = ("auto", "low", "high")
PART_TYPES = ("text", "image_url", "video_url", "video")
# OpenAI fields whose presence would change the output and that we do not implement (§3.3)
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call")
CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "n", "stop", "seed", "logprobs", "top_logprobs",
    "stream", "stream_options", "response_format", "logit_bias", "max_image_tokens", "min_tokens", "ignore_eos",
    "user", "metadata", "store", "parallel_tool_calls", *TOOL_FIELDS,
}


# ---------------------------------------------------------------------------------------------- normalized requests
@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # JSON path of the URL, for errors about this image
    detail: str = "auto"
    max_dynamic_patch: int | None = None


@dataclass(frozen=True)
class VideoRef:
    param: str
    url: str | None = None  # a video file, sampled to `num_frames` frames
    frames: tuple[str, ...] = ()  # or the frames themselves, as image URLs
    num_frames: int | None = None


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" ("developer" arrives as "system")
    text: str  # text parts joined with "\n" (§3.2)
    media: tuple[ImageRef | VideoRef, ...] = ()


@dataclass(frozen=True)
class Sampling:
    """The generation controls shared by both routes; `max_tokens` None = fill the context (capped, §3.3)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    min_tokens: int = 0
    ignore_eos: bool = False
    constraint: Any = None  # what `response_format` asks of the engine (see `response_format_constraint`)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    max_image_tokens: int | None = None

    @property
    def num_media(self) -> int:
        return sum(len(m.media) for m in self.messages)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[str | tuple[int, ...], ...]  # text, or token ids
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


# ---------------------------------------------------------------------------------------------- body parsing
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

def parse_json_object(body: bytes) -> dict:
    """Bytes -> a JSON object, else 400 (bad JSON or a JSON value that is not an object, §2.2)."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise APIError(ErrorCode.INVALID_REQUEST, "The request body is not valid UTF-8 text; send a JSON object.",
                       code="invalid_json") from None
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise APIError(ErrorCode.INVALID_REQUEST, f"The request body is not valid JSON: {msg}{where}.",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(ErrorCode.INVALID_REQUEST, "The request body nests JSON too deeply.",
                       code="invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(ErrorCode.INVALID_REQUEST,
                       f"The request body must be a JSON object, got a JSON {_json_type(value)}.", code="invalid_json")
    if _SURROGATE_ESCAPE.search(body):  # "\ud800" alone decodes to a string no tokenizer or encoder accepts
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(ErrorCode.INVALID_REQUEST, "The request body's JSON contains an unpaired UTF-16 surrogate "
                           "escape (\\ud800-\\udfff); send valid Unicode text.", code="invalid_json") from None
    return value


# ---------------------------------------------------------------------------------------------- field helpers
def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _show(v) -> str:
    text = json.dumps(v, ensure_ascii=False) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(param: str, message: str, kind: ErrorCode = ErrorCode.INVALID_REQUEST) -> APIError:
    return APIError(kind, message, param=param)


def _int(value, param: str, lo: int | None = None, hi: int | None = None, rule: str | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value, ok = int(value), True
    rule = rule or ("an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
                    + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""))
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(param, f"{param} must be {rule}, got {_show(value)}.")
    return value


def _number(value, param: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    rule = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if hi == math.inf:
        rule = f"a number {'>' if lo_open else '>='} {lo}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        value = float(value)
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise _bad(param, f"{param} must be {rule}, got {_show(value)}.")
    return value


def _bool(value, param: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(param, f"{param} must be true or false, got {_show(value)}.")
    return value


def _opt(body: dict, key: str, default=None):
    """A field's value; JSON null counts as absent (clients send explicit nulls for unset options)."""
    value = body.get(key)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------- shared fields
def response_format_constraint(value, param: str = "response_format"):
    """THE place `response_format` is decided. `{"type": "text"}` (or absent) -> None: free text.

    `json_object` / `json_schema` need constrained decoding in the engine; until its SamplingParams field exists they
    are refused as unsupported (§3.3). To wire them: validate the schema here and return what the engine field takes;
    `generation.engine_params` passes `Sampling.constraint` on.
    """
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad(param, f'{param} must be an object like {{"type": "text"}}, got {_show(value)}.')
    kind = value["type"]
    if kind == "text":
        return None
    if kind in ("json_object", "json_schema"):
        raise _bad(f"{param}.type", f"{param} type {kind!r} is not supported yet by this server; "
                   'only {"type": "text"} is accepted.', ErrorCode.UNSUPPORTED_PARAMETER)
    raise _bad(f"{param}.type", f"{param}.type must be one of 'text', 'json_object', 'json_schema', got {kind!r}.")


def _stop(value, cfg: ServerConfig) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    rule = (f"a non-empty string or a list of at most {cfg.max_stop_sequences} non-empty strings of at most "
            f"{cfg.max_stop_length} characters")
    if not isinstance(stops, list) or len(stops) > cfg.max_stop_sequences:
        raise _bad("stop", f"stop must be {rule}, got {_show(value)}.")
    for k, s in enumerate(stops):
        p = "stop" if isinstance(value, str) else f"stop[{k}]"
        if not isinstance(s, str) or not s or len(s) > cfg.max_stop_length:
            raise _bad(p, f"stop must be {rule}; {p} is {_show(s)}.")
    return tuple(stops)


def _refuse_tools(body: dict) -> None:
    for key in TOOL_FIELDS:
        value = body.get(key)
        if value is None or value == [] or (key in ("tool_choice", "function_call") and value == "none"):
            continue
        raise _bad(key, f"{key} is not supported by this server (no tool or function calling); remove the field.",
                   ErrorCode.UNSUPPORTED_PARAMETER)


def _sampling(body: dict, cfg: ServerConfig, chat: bool) -> Sampling:
    mct = body.get("max_completion_tokens")
    if chat and mct is not None:  # the newer name wins when both are sent (§3.3)
        max_tokens = _int(mct, "max_completion_tokens", lo=1)
    elif body.get("max_tokens") is not None:
        max_tokens = _int(body["max_tokens"], "max_tokens", lo=1)
    else:
        max_tokens = None
    top_k = _opt(body, "top_k")
    if top_k is not None:
        top_k = _int(top_k, "top_k", rule="an integer >= 0, or -1 (0 and -1 disable top-k)")
        if top_k < -1:
            raise _bad("top_k", f"top_k must be an integer >= 0, or -1 (0 and -1 disable top-k), got {top_k}.")
        top_k = top_k if top_k > 0 else None
    n = _int(_opt(body, "n", 1), "n", lo=1, hi=cfg.max_n)
    seed = _opt(body, "seed")
    if seed is not None:
        seed = _int(seed, "seed", lo=-(2**63), hi=2**64 - 1)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise _bad("logit_bias", "logit_bias must be an object mapping token ids to biases, got "
                       f"{_show(logit_bias)}.")
        if logit_bias:
            raise _bad("logit_bias", "logit_bias is not supported yet by this server; send {} or leave it out.",
                       ErrorCode.UNSUPPORTED_PARAMETER)
    if chat:
        logprobs = _bool(_opt(body, "logprobs", False), "logprobs")
        top_logprobs = _int(_opt(body, "top_logprobs", 0), "top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if top_logprobs and not logprobs:
            raise _bad("top_logprobs", "top_logprobs needs logprobs: true.")
    else:  # the legacy completions API: logprobs is the number of alternatives
        legacy = _opt(body, "logprobs")
        logprobs = legacy is not None
        top_logprobs = _int(legacy, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS) if logprobs else 0
    min_tokens = _int(_opt(body, "min_tokens", 0), "min_tokens", lo=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise _bad("min_tokens", f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens}).")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(_opt(body, "temperature", 1.0), "temperature", 0, 2),
        top_p=_number(_opt(body, "top_p", 1.0), "top_p", 0, 1, lo_open=True),
        top_k=top_k,
        min_p=_number(_opt(body, "min_p", 0.0), "min_p", 0, 1),
        presence_penalty=_number(_opt(body, "presence_penalty", 0.0), "presence_penalty", -2, 2),
        frequency_penalty=_number(_opt(body, "frequency_penalty", 0.0), "frequency_penalty", -2, 2),
        repetition_penalty=_number(_opt(body, "repetition_penalty", 1.0), "repetition_penalty", 0, math.inf,
                                   lo_open=True),
        n=n,
        stop=_stop(body.get("stop"), cfg),
        seed=seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        min_tokens=min_tokens,
        ignore_eos=_bool(_opt(body, "ignore_eos", False), "ignore_eos"),
        constraint=response_format_constraint(body.get("response_format")),
    )


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", f"model must be the served model id (a non-empty string), got {_show(model)}; "
                   "GET /v1/models lists it.")
    return model


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(_opt(body, "stream", False), "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "stream_options is only accepted together with stream: true.")
    if not isinstance(options, dict):
        raise _bad("stream_options", f"stream_options must be an object, got {_show(options)}.")
    return stream, _bool(_opt(options, "include_usage", False), "stream_options.include_usage")


# ---------------------------------------------------------------------------------------------- messages
def _url_object(part: dict, key: str, param: str) -> dict:
    value = part.get(key)
    if isinstance(value, str):  # a bare URL string instead of the object (§3.1)
        value = {"url": value}
    if not isinstance(value, dict):
        raise _bad(f"{param}.{key}", f"{param}.{key} must be an object with a string 'url' (or the URL string "
                   f"itself), got {_show(value)}.")
    url = value.get("url")
    if not isinstance(url, str) or not url:
        raise _bad(f"{param}.{key}.url", f"{param}.{key}.url must be a non-empty URL string (https:, data: or "
                   f"file:), got {_show(url)}.")
    return value


def _image_part(part: dict, param: str, cfg: ServerConfig) -> ImageRef:
    obj = _url_object(part, "image_url", param)
    detail = _opt(obj, "detail", "auto")
    if detail not in DETAIL_VALUES:
        raise _bad(f"{param}.image_url.detail", f"{param}.image_url.detail must be one of "
                   f"{', '.join(DETAIL_VALUES)}, got {_show(detail)}.")
    mdp = _opt(obj, "max_dynamic_patch")
    if mdp is not None:
        mdp = _int(mdp, f"{param}.image_url.max_dynamic_patch", lo=1, hi=cfg.max_dynamic_patch_cap)
    return ImageRef(obj["url"], f"{param}.image_url.url", detail, mdp)


def _video_part(part: dict, param: str, cfg: ServerConfig) -> VideoRef:
    if part["type"] == "video_url":
        obj = _url_object(part, "video_url", param)
        frames = _opt(obj, "num_frames")
        if frames is not None:
            frames = _int(frames, f"{param}.video_url.num_frames", lo=1, hi=cfg.max_video_frames)
        return VideoRef(f"{param}.video_url.url", url=obj["url"], num_frames=frames)
    frames = part.get("video")
    if not isinstance(frames, list) or not 1 <= len(frames) <= cfg.max_video_frames:
        raise _bad(f"{param}.video", f"{param}.video must be a list of 1 to {cfg.max_video_frames} frame image "
                   f"URLs, got {_show(frames)}.")
    for k, url in enumerate(frames):
        if isinstance(url, dict):  # frames given as {"url": ...} objects
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise _bad(f"{param}.video[{k}]", f"{param}.video[{k}] must be a frame image URL string.")
    urls = tuple(u if isinstance(u, str) else u["url"] for u in frames)
    return VideoRef(f"{param}.video", frames=urls)


def _content(content, role: str, param: str, cfg: ServerConfig) -> tuple[str, tuple]:
    """-> (text with parts joined by "\\n", media refs in order)."""
    if isinstance(content, str):
        if role != "system" and not content:
            raise _bad(param, f"{param} must not be empty on a {role} message.")
        return content, ()
    if content is None:
        raise _bad(param, f"{param} is null; a {role} message needs a string or a list of content parts.")
    if not isinstance(content, list):
        raise _bad(param, f"{param} must be a string or a list of content parts, got a JSON {_json_type(content)}.")
    if not content and role == "user":
        raise _bad(param, f"{param} must not be an empty list on a user message.")
    texts, media = [], []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad(p, f"{p} must be a content part object like {{\"type\": \"text\", \"text\": \"...\"}}.")
        kind = part.get("type")
        if kind not in PART_TYPES:
            what = "missing" if kind is None else f"{_show(kind)}, which is not supported"
            raise _bad(f"{p}.type", f"{p}.type is {what}; accepted part types: {', '.join(PART_TYPES)}.")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{p}.text", f"{p}.text must be a string, got {_show(part.get('text'))}.")
            texts.append(part["text"])
            continue
        if role != "user":
            raise _bad(p, f"{p}: images and videos are only accepted in user messages, not in a {role} message.")
        media.append(_image_part(part, p, cfg) if kind == "image_url" else _video_part(part, p, cfg))
    text = "\n".join(texts)
    if role != "system" and not text and not media:  # the template cannot render an empty turn
        raise _bad(param, f"{param} has no text and no image; a {role} message must not be empty.")
    return text, tuple(media)


def _messages(body: dict, cfg: ServerConfig) -> tuple[Message, ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        what = "missing" if raw is None else f"a JSON {_json_type(raw)}" if not isinstance(raw, list) else "empty"
        raise _bad("messages", f"messages must be a non-empty list of chat messages; it is {what}.")
    out = []
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(p, f"{p} must be an object with 'role' and 'content', got a JSON {_json_type(m)}.")
        role = m.get("role")
        if role in ("tool", "function"):
            raise _bad(f"{p}.role", f"{p}.role {role!r} is not supported (no tool calling); use system, user or "
                       "assistant.", ErrorCode.UNSUPPORTED_PARAMETER)
        if role not in ("system", "developer", "user", "assistant"):
            what = "missing" if role is None else f"{_show(role)}"
            raise _bad(f"{p}.role", f"{p}.role is {what}; accepted roles: system, developer, user, assistant.")
        role = "system" if role == "developer" else role
        if m.get("tool_calls") or m.get("function_call"):
            key = "tool_calls" if m.get("tool_calls") else "function_call"
            raise _bad(f"{p}.{key}", f"{p}.{key} is not supported (no tool calling).", ErrorCode.UNSUPPORTED_PARAMETER)
        if role == "system" and i > 0:
            raise _bad(f"{p}.role", f"{p} is a system message; only the first message may be a system message.")
        if "content" not in m:
            raise _bad(f"{p}.content", f"{p}.content is missing.")
        text, media = _content(m.get("content"), role, f"{p}.content", cfg)
        out.append(Message(role, text, media))
    if out[-1].role != "user":
        last = len(out) - 1
        raise _bad(f"messages[{last}].role", f"the last message must be a user message, got {out[-1].role!r} "
                   "(assistant prefill is not supported).")
    count = sum(len(m.media) for m in out)
    if count > cfg.limit_images_per_prompt:
        raise _bad("messages", f"Too many images: {count} given, the limit is {cfg.limit_images_per_prompt} per "
                   "request.", ErrorCode.TOO_MANY_IMAGES)
    return tuple(out)


def _ignored(body: dict, known: set) -> None:
    extra = sorted(k for k in body if k not in known)
    if extra:
        log.debug("ignoring unknown request fields %s", extra[:20])


# ---------------------------------------------------------------------------------------------- the two routes
def parse_chat_request(body: dict, cfg: ServerConfig) -> ChatRequest:
    """Validate a /v1/chat/completions body (§3.1, §3.3, §3.4)."""
    model = _model(body)
    _refuse_tools(body)
    messages = _messages(body, cfg)
    sampling = _sampling(body, cfg, chat=True)
    stream, include_usage = _stream(body)
    mit = _opt(body, "max_image_tokens")
    if mit is not None:
        mit = _int(mit, "max_image_tokens", lo=1)
    _ignored(body, CHAT_FIELDS)
    return ChatRequest(model, messages, sampling, stream, include_usage, mit)


COMPLETION_FIELDS = (CHAT_FIELDS - {"messages", "max_completion_tokens", "top_logprobs", "max_image_tokens"}) | {
    "prompt", "echo", "suffix", "best_of"}


def parse_completion_request(body: dict, cfg: ServerConfig) -> CompletionRequest:
    """Validate a /v1/completions body: a raw text prompt (no template, no images)."""
    model = _model(body)
    _refuse_tools(body)
    prompt = body.get("prompt")
    rule = (f"a non-empty string, a list of 1 to {cfg.max_n} non-empty strings, or a non-empty list of token ids")
    if isinstance(prompt, str):
        prompts: tuple = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise _bad("prompt", "prompt token ids must be integers >= 0.")
        prompts = (tuple(prompt),)
    elif isinstance(prompt, list) and 1 <= len(prompt) <= cfg.max_n and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    else:
        raise _bad("prompt", f"prompt must be {rule}, got {_show(prompt)}.")
    for k, p in enumerate(prompts):
        if p == "":
            raise _bad("prompt" if len(prompts) == 1 else f"prompt[{k}]", "prompt must not be empty.")
    if body.get("suffix") is not None:
        raise _bad("suffix", "suffix (insertion) is not supported; leave it out.", ErrorCode.UNSUPPORTED_PARAMETER)
    sampling = _sampling(body, cfg, chat=False)
    best_of = body.get("best_of")
    if best_of is not None and _int(best_of, "best_of", lo=1) != sampling.n:
        raise _bad("best_of", "best_of other than n is not supported; leave it out.", ErrorCode.UNSUPPORTED_PARAMETER)
    if len(prompts) * sampling.n > cfg.max_n:
        raise _bad("n", f"{len(prompts)} prompts x n={sampling.n} gives {len(prompts) * sampling.n} choices; the "
                   f"limit is {cfg.max_n} per request.")
    stream, include_usage = _stream(body)
    echo = _bool(_opt(body, "echo", False), "echo")
    _ignored(body, COMPLETION_FIELDS)
    return CompletionRequest(model, prompts, sampling, stream, include_usage, echo)
