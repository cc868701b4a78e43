"""Constrained decoding for OpenAI `response_format`: JSON mode and JSON Schema, one grammar matcher per sequence.

    fmt = ResponseFormat.from_openai({"type": "json_schema", "json_schema": {"name": "answer", "schema": {...}}})
    engine.generate([ids], SamplingParams(response_format=fmt))   # every choice's text is JSON valid for the schema

`{"type": "json_object"}` is the schema `{"type": "object"}`; `{"type": "text"}` means no constraint (None). The
schema is enforced whether `strict` is true or not (OpenAI only guarantees adherence with strict; we always do).

How it works. `ResponseFormat` turns the schema into an llguidance grammar when it is built, so a bad schema fails
at once with a ValueError naming what is wrong (grammar texts are cached by schema text). The engine owns one
`GrammarCompiler` (built on the first constrained request: the tokenizer's token -> bytes table and a cache of
compiled matchers by grammar text); each choice of a request gets its own `Constraint`, a copy of the compiled
matcher. At the one place logits become a token (`Engine._append` -> `sampler.sample_token`), `forbidden(stop_ids)`
gives the (V,) mask of tokens that would not keep the text a prefix of a valid document; their logits become -inf
before greedy argmax or temperature / top-k / top-p / min-p, and the chosen token advances the matcher. The
end-of-turn (and stop) tokens are allowed exactly when the document is complete, and are the only tokens left once
nothing can follow (then `min_new_tokens` no longer holds them back), so a finished document ends with the
end-of-turn token ("stop"). Batch mates without a constraint are not touched. The matcher state lives with the
choice, so preemption (recompute) and streaming change nothing; a stop string or `max_tokens` may still end the text
early (finish_reason "stop" / "length", an unfinished document).

Tokens the engine never shows as text (special and template control tokens, `stopping.dropped_ids`) are never
allowed inside the document, so the streamed text is exactly what the matcher consumed.

Whitespace between JSON tokens is bounded (`WHITESPACE`): compact and pretty-printed JSON both pass, but a model
cannot loop on blank lines (a known failure of unbounded JSON whitespace), and a schema of bounded size (enums,
integer ranges, `maxLength`, `maxItems`, no additional properties) always finishes in a bounded number of tokens.

Library decision (measured here on CPU, 2 shared cores; random walks through the mask on a synthetic 151,646-token
byte-level vocabulary, the size of Qwen2's; mask cost includes unpacking the bitmask to one flag per token):

| library (PyPI)        | dependencies                                   | compile: small schema / json_object | mask (median) |
|-----------------------|------------------------------------------------|-------------------------------------|---------------|
| llguidance 1.9.1      | none (one 3 MB abi3 wheel)                     | 1.5 ms / 1.1 ms                     | 83 / 72 us    |
| xgrammar 0.2.8        | torch, transformers, apache-tvm-ffi, triton (a 286 MB wheel) | 1.45 s / 0.05 s       | 32 / 48 us    |
| outlines-core 0.2.14  | none                                           | 7.0 s / 27.5 s                      | 97 us / 14 ms |

llguidance is used: no dependencies (a plain pip install of xgrammar pulls triton, which a CPU torch does not need),
millisecond compilation, so a new schema in a request adds no visible latency (xgrammar 1.5 s, outlines-core seconds
to tens of seconds), and a mask cost far below a decode step. In this module, on the same vocabulary with the
machine under load (load average 7 on 2 cores): `Constraint.forbidden` 133-249 us per token (median), `advance`
6-43 us, `GrammarCompiler` 1.4 s (quiet) to 6 s (loaded) once per engine. llguidance reads the `tokenizers` JSON of
the loaded fast tokenizer, which covers byte-level BPE (Qwen2, the demo model) and the SentencePiece models
`internvl.tokenizer` converts (InternLM2, Phi-3: `▁` and `<0xNN>` byte-fallback pieces); tests/engine/
test_constraints.py runs a byte-level BPE and an InternLM2 SentencePiece tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

# Between JSON tokens: up to 2 spaces/tabs, or one line break and an indentation of up to 32 spaces/tabs (depth 8
# at 4 spaces per level).
WHITESPACE = r"(?:[\x20\x09]{0,2}|\x0D?\x0A[\x20\x09]{0,32})"
JSON_OBJECT_SCHEMA = '{"type":"object"}'
TYPES = ("json_object", "json_schema")
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
MAX_CACHED_GRAMMARS = 64


class ResponseFormatError(ValueError):
    """A bad `response_format`; `param` is the JSON path of the offending field in an OpenAI request."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ResponseFormat:
    """What shape the text must have. Frozen and hashable: the schema is kept as compact JSON text (a dict is
    accepted; its key order is kept, as properties are generated in schema order). Invalid values raise
    `ResponseFormatError` (a ValueError) naming the field."""

    type: str  # "json_object" | "json_schema"
    schema: str | None = None  # JSON Schema as JSON text (json_schema only)
    name: str | None = None  # OpenAI json_schema.name (informational)
    strict: bool | None = None  # OpenAI json_schema.strict (informational: the schema is always enforced)

    def __post_init__(self):
        where = "response_format"
        if self.type not in TYPES:
            raise ResponseFormatError(f"{where}.type", f"{self.type!r} is not supported; use one of "
                                      f"{', '.join(map(repr, ('text',) + TYPES))} ('text' means no constraint)")
        schema_path = f"{where}.json_schema.schema"
        if self.type == "json_object":
            if self.schema is not None:
                raise ResponseFormatError(schema_path, "a schema is only accepted with type 'json_schema'")
            object.__setattr__(self, "schema", JSON_OBJECT_SCHEMA)
        else:
            object.__setattr__(self, "schema", _canonical_schema(self.schema, schema_path))
        if self.name is not None and not (isinstance(self.name, str) and _NAME.match(self.name)):
            raise ResponseFormatError(f"{where}.json_schema.name", f"{self.name!r} must be 1-64 characters from "
                                      "a-z, A-Z, 0-9, '_' and '-'")
        if self.strict is not None and not isinstance(self.strict, bool):
            raise ResponseFormatError(f"{where}.json_schema.strict", f"{self.strict!r} must be true, false or null")
        grammar_for_schema(self.schema)  # raises for a schema llguidance cannot compile

    @property
    def grammar(self) -> str:
        """The llguidance grammar (cached by schema text)."""
        return grammar_for_schema(self.schema)

    @classmethod
    def from_openai(cls, value) -> "ResponseFormat | None":
        """An OpenAI request's `response_format` (dict) -> a ResponseFormat, or None for absent / `{"type":"text"}`.

        {"type": "json_object"}
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}, "strict": true, "description": "..."}}
        """
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ResponseFormatError("response_format", f"must be an object such as {{\"type\": \"json_object\"}}, "
                                      f"got {type(value).__name__}")
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind != "json_schema":
            raise ResponseFormatError("response_format.type", f"{kind!r} is not supported; use 'text', "
                                      "'json_object' or 'json_schema'")
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ResponseFormatError("response_format.json_schema", "type 'json_schema' needs a 'json_schema' "
                                      "object with 'name' and 'schema'")
        if "name" not in spec:
            raise ResponseFormatError("response_format.json_schema.name", "is required")
        if "schema" not in spec:
            raise ResponseFormatError("response_format.json_schema.schema", "is required (a JSON Schema object)")
        return cls("json_schema", spec["schema"], spec["name"], spec.get("strict"))


def _canonical_schema(schema, path: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ResponseFormatError(path, f"is not valid JSON text ({e})") from None
    if not isinstance(schema, dict):
        raise ResponseFormatError(path, f"must be a JSON Schema object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)  # key order kept: it is the output's
    except (TypeError, ValueError) as e:
        raise ResponseFormatError(path, f"is not JSON-serialisable ({e})") from None


@functools.lru_cache(maxsize=256)
def grammar_for_schema(schema_text: str) -> str:
    """Canonical schema text -> llguidance grammar text, validated. Raises ResponseFormatError."""
    path = "response_format.json_schema.schema"
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema_text, overrides={"whitespace_pattern": WHITESPACE})
    except ValueError as e:
        raise ResponseFormatError(path, str(e)) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ResponseFormatError(path, "invalid or unsupported JSON Schema: " + "; ".join(messages).strip())
    return grammar


# ---------------------------------------------------------------------------------------------- per engine
class GrammarCompiler:
    """Token side of the grammars for one engine: the tokenizer's token -> bytes table and compiled matchers.

    tokenizer: a `PreTrainedTokenizerFast` (what `internvl.tokenizer.load_tokenizer` returns). vocab_size: rows
    of the model's lm_head (may exceed the tokenizer's size; extra ids are never allowed). never_ids: ids never
    allowed inside a document (special / control tokens the text drops).
    """

    def __init__(self, tokenizer, vocab_size: int, never_ids=()):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"response_format needs a fast (`tokenizers`) tokenizer, got {type(tokenizer).__name__}")
        backend = backend.__class__.from_str(backend.to_str())  # a copy: padding/truncation off without side effects
        backend.no_padding()
        backend.no_truncation()
        self.vocab_size = int(vocab_size)
        self.lltok = LLTokenizer(backend.to_str(), n_vocab=max(self.vocab_size, len(tokenizer)),
                                 eos_token=tokenizer.eos_token_id)
        never = sorted({int(i) for i in never_ids} | set(self.lltok.eos_tokens))
        self.never = np.array([i for i in never if i < self.vocab_size], dtype=np.int64)
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()  # grammar text -> matcher in its start state

    def constraint(self, fmt: ResponseFormat) -> "Constraint":
        """A fresh per-sequence matcher for `fmt` (compiled once per grammar text, LRU-cached)."""
        grammar = fmt.grammar
        start = self._compiled.get(grammar)
        if start is None:
            start = LLMatcher(self.lltok, grammar, log_level=0)
            if start.is_error():
                raise ResponseFormatError("response_format.json_schema.schema", start.get_error())
            self._compiled[grammar] = start
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return Constraint(start.deep_copy(), self)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)


class Constraint:
    """One sequence's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: LLMatcher, compiler: GrammarCompiler):
        self.matcher, self.compiler = matcher, compiler

    def forbidden(self, stop_ids: tuple[int, ...]) -> torch.Tensor:
        """(V,) bool, True where a token would break the document; `stop_ids` are allowed once it is complete.

        Built in numpy: on a contended CPU a torch reduction over a 151k vocabulary can take milliseconds."""
        v = self.compiler.vocab_size
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        forbidden = np.unpackbits(bits, count=v, bitorder="little") == 0  # (V,)
        forbidden[self.compiler.never] = True
        if self.matcher.is_accepting():
            forbidden[[i for i in stop_ids if i < v]] = False
        if forbidden.all():
            detail = self.matcher.get_error() or "the document is complete but no stop token is allowed"
            raise RuntimeError(f"response_format: no token can continue the text ({detail})")
        return torch.from_numpy(forbidden)

    @property
    def complete(self) -> bool:
        """Nothing but an end token may follow (so min_new_tokens must not hold the end tokens back)."""
        return self.matcher.is_stopped()

    def advance(self, token: int) -> None:
        """Take the sampled token (never a stop token: those end the sequence)."""
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"response_format: token {token} was not allowed ({self.matcher.get_error()})")
