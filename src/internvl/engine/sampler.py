"""Per-request sampling parameters and the per-sequence sampler of the engine.

Order of logits processing (the reference's, `internvl.generation.sampling`, with the OpenAI penalties added):

1. repetition penalty over the *generated* tokens (transformers semantics: negative logits multiplied, positive
   divided; the prompt is not penalised, as in the reference `generate`, which only sees new tokens);
2. presence / frequency penalties over the generated tokens (OpenAI: `logit -= presence * [count > 0] +
   frequency * count`);
3. end-of-sequence and stop-token ids masked while fewer than `min_new_tokens` tokens exist;
   with a `response_format`, the tokens its grammar forbids are masked too (`constraints.py`; the engine does not
   suppress the end tokens once the document is complete);
4. greedy: argmax. Sampling: temperature -> top-k -> top-p -> min-p -> softmax -> `torch.multinomial` with the
   sequence's own `torch.Generator`.

Each sequence samples from its own row with its own generator, so a seeded request produces the same tokens
whatever else is in the batch (and, with n=1, the same tokens as the reference `generate` with that seed).

Defaults follow OpenAI (SERVING.md §3.3): no top-k unless asked. The model-card `chat(do_sample=True)` path has an
implicit top-k of 50 (a transformers default, INTERNVL.md §8.5); `SamplingParams.from_generation_config` keeps it.

Logprobs are those of the model's raw distribution: `log_softmax` of the float32 logits, before penalties and
temperature. They are reproducible and comparable across sampling settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from internvl.engine.constraints import ResponseFormat
from internvl.generation.sampling import GenerationConfig, apply_repetition_penalty

MAX_TOP_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. Frozen; invalid values raise ValueError naming the field."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    greedy: bool = False  # also implied by temperature == 0
    temperature: float = 1.0
    top_k: int | None = None  # None, 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a single string is accepted
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # ignore the engine's end-of-turn ids (stop_token_ids still stop)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: ResponseFormat | None = None  # JSON mode / JSON Schema; an OpenAI dict is accepted

    def __post_init__(self):
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif stop is None:
            stop = ()
        stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        ids = self.stop_token_ids
        ids = () if ids is None else (ids,) if _is_int(ids) else tuple(ids)
        object.__setattr__(self, "stop_token_ids", ids)
        if self.top_k in (0, -1):
            object.__setattr__(self, "top_k", None)
        if isinstance(self.response_format, dict):
            object.__setattr__(self, "response_format", ResponseFormat.from_openai(self.response_format))
        self._validate()

    def _validate(self) -> None:
        def bad(name, rule):
            raise ValueError(f"{name}={getattr(self, name)!r}: must be {rule}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", f"an integer in [0, max_new_tokens={self.max_new_tokens}]")
        if not isinstance(self.greedy, bool):
            bad("greedy", "a bool")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            bad("top_k", "an integer >= 1, or 0 / -1 / None to disable")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "a number in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "an integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a non-empty string or a list of non-empty strings")
        if not all(_is_int(i) and i >= 0 for i in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids (integers >= 0)")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "a bool")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "an integer >= 1")
        if not isinstance(self.logprobs, bool):
            bad("logprobs", "a bool")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs", "0 unless logprobs=True")
        if self.response_format is not None and not isinstance(self.response_format, ResponseFormat):
            bad("response_format", "a ResponseFormat, an OpenAI response_format dict, or None")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return SamplingParams(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    @classmethod
    def from_generation_config(cls, cfg: GenerationConfig) -> "SamplingParams":
        """The model-card settings (`chat(generation_config=...)`) as engine parameters; eos ids become stop ids."""
        return cls(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            greedy=not cfg.do_sample,
            temperature=cfg.temperature if cfg.do_sample else 1.0,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            min_p=cfg.min_p or 0.0,
            repetition_penalty=cfg.repetition_penalty,
            seed=cfg.seed,
            stop_token_ids=tuple(cfg.eos_token_id),
        )


def sequence_seed(seed: int | None, index: int) -> int | None:
    """Seed of choice `index` of a request: the request's seed for choice 0, a derived one for the others."""
    if seed is None:
        return None
    return seed if index == 0 else (seed * 1_000_003 + index) % (2**63)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def process_logits(
    logits: torch.Tensor, generated: list[int], params: SamplingParams, suppress: tuple[int, ...] = ()
) -> torch.Tensor:
    """logits (V,) -> float32 scores after penalties and min-new-tokens suppression (steps 1-3)."""
    scores = logits.float()
    if generated and params.repetition_penalty != 1.0:
        seen = torch.tensor(generated, dtype=torch.long, device=scores.device)
        scores = apply_repetition_penalty(scores[None], seen[None], params.repetition_penalty)[0]
    if generated and (params.presence_penalty or params.frequency_penalty):
        seen = torch.tensor(generated, dtype=torch.long, device=scores.device)
        counts = torch.zeros_like(scores).scatter_add_(0, seen, torch.ones_like(seen, dtype=scores.dtype))
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    if suppress and len(generated) < params.min_new_tokens:
        scores = scores.clone()
        scores[list(suppress)] = float("-inf")
    return scores


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on (V,) or (B, V) scores; removed entries become -inf (reference order)."""
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))  # ties with the k-th value stay
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - params.top_p)
        remove_sorted[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    if params.min_p > 0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return scores


def sample_token(
    logits: torch.Tensor,
    generated: list[int],
    params: SamplingParams,
    generator: torch.Generator | None = None,
    suppress: tuple[int, ...] = (),
    forbidden: torch.Tensor | None = None,
) -> int:
    """logits (V,) of the last position -> the next token id. `forbidden` (V,) bool: a response_format's mask."""
    scores = process_logits(logits, generated, params, suppress)
    if forbidden is not None:
        scores = scores.masked_fill(forbidden.to(scores.device), float("-inf"))
    if params.is_greedy:
        return int(scores.argmax())
    probs = warp(scores, params).softmax(-1)
    if not bool(torch.isfinite(probs).all()):  # a tiny temperature or repetition penalty (say 5e-324) overflowed
        return int(scores.argmax())  # float32 to inf: take their limit, the most likely token
    return int(torch.multinomial(probs[None], 1, generator=generator)[0, 0])


def token_logprob(logits: torch.Tensor, token: int, top: int = 0) -> TokenLogprob:
    """Log-probability of `token` under the raw distribution, plus the `top` most likely alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives = ()
    if top:
        values, ids = torch.topk(logp, top)
        alternatives = tuple((int(i), float(v)) for i, v in zip(ids, values))
    return TokenLogprob(int(token), float(logp[token]), alternatives)
