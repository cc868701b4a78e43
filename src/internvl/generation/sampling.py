"""Generation settings and logits processing with the semantics of the reference `generate` (transformers).

Order (as transformers applies them): repetition penalty, min-new-tokens eos suppression, then for sampling
temperature -> top-k -> top-p -> min-p, then softmax + multinomial. With `do_sample=True` top-k defaults to 50
(INTERNVL.md §8.5).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_IGNORED_KEYS = {"use_cache", "output_scores", "return_dict_in_generate", "output_attentions", "output_hidden_states"}


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20  # transformers' default when only embeddings are passed (max_length 20)
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: finished score = sum of log-probs / length ** length_penalty
    early_stopping: bool | str = False  # beam search: False (heuristic), True, or "never" (transformers' meanings)
    num_return_sequences: int = 1  # chat returns one answer; only 1 is accepted
    seed: int | None = None

    def __post_init__(self):
        eos = self.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
        object.__setattr__(self, "eos_token_id", eos)
        if self.top_k == 0:
            object.__setattr__(self, "top_k", None)
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(
                f"beam sampling (do_sample=True with num_beams={self.num_beams}) is not supported; use "
                "do_sample=False for beam search, or num_beams=1 to sample"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_return_sequences != 1:
            raise ValueError(f"num_return_sequences={self.num_return_sequences!r}: only 1 is supported (one answer)")

    @classmethod
    def from_any(cls, cfg=None, **overrides) -> "GenerationConfig":
        """From a model-card dict, a transformers GenerationConfig, our own config, or keywords."""
        if isinstance(cfg, GenerationConfig):
            base = {f.name: getattr(cfg, f.name) for f in fields(cls)}
        elif cfg is None:
            base = {}
        elif isinstance(cfg, dict):
            base = dict(cfg)
        elif hasattr(cfg, "to_dict"):
            base = {k: v for k, v in cfg.to_dict().items() if k in {f.name for f in fields(cls)} and v is not None}
        else:
            raise ValueError(f"generation_config must be a dict or GenerationConfig, got {type(cfg).__name__}")
        base.update(overrides)
        if "max_length" in base:  # embeddings-only generate: max_length counts new tokens
            base.setdefault("max_new_tokens", base.pop("max_length"))
        for k in _IGNORED_KEYS:
            base.pop(k, None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(base) - known - {"streamer"})
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; accepted: {sorted(known | {'streamer'})}")
        base.pop("streamer", None)
        return cls(**base)


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (B, V); seen (B, n) token ids already generated. Negative logits are multiplied, positive divided."""
    if penalty == 1.0 or seen.numel() == 0:
        return scores
    picked = scores.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def warp(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on (B, V) float scores; removed entries become -inf."""
    scores = scores / cfg.temperature if cfg.temperature != 1.0 else scores
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))  # ties with the k-th value are kept
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    if cfg.min_p is not None and cfg.min_p > 0:
        probs = scores.softmax(-1)
        threshold = cfg.min_p * probs.max(-1, keepdim=True).values
        scores = scores.masked_fill(probs < threshold, float("-inf"))
    return scores


def next_tokens(
    logits: torch.Tensor,
    generated: torch.Tensor,
    cfg: GenerationConfig,
    step: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) of the last position; generated (B, n) new tokens so far -> (B,) next token ids."""
    scores = apply_repetition_penalty(logits.float(), generated, cfg.repetition_penalty)
    if step < cfg.min_new_tokens and cfg.eos_token_id:
        scores[:, list(cfg.eos_token_id)] = float("-inf")
    if not cfg.do_sample:
        return scores.argmax(-1)
    probs = warp(scores, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
