"""Packing several samples into one training row, and per-sample loss weights.

Spec: INTERNVL.md §14.1 (packed buffers), §14.2 (loss weights `token` / `sample` / `square`), §20 item 30.
Reference: OpenGVLab/InternVL `internvl_chat/internvl/train/dataset_packed.py`, `internvl_chat_finetune.py` and the
MIC `forward` loss, restated in the spec.

`pack_samples` decides which samples share a row; `collate_packed` builds the row. Sub-samples never see each other:
positions restart at 0 per sub-sample and the attention mask is block-diagonal causal (the reference passes
`cu_seqlens` to varlen flash attention instead; we return both, the dense mask being what the eager model consumes).

What our `pack_samples` does not do (the reference's streaming packer does):
* step 1, drawing the next sample from datasets by weight: the caller passes samples in the order to pack them;
* step 3, cutting an over-long buffer at image boundaries (`allow_overflow`): a sample alone over either budget is an
  error here, so keep `max_seq_length <= max_tokens`;
* strict mode's dummy tiles up to exactly `num_images_expected` (token padding is available via `pad_to`).

One addition: the first label of every sub-sample is set to IGNORE. It would otherwise be predicted from the previous
sub-sample's last token; unpacked it is never predicted (the loss is shifted), and every template masks it anyway
(BOS or system text), so this only makes "packed == unpacked" hold for any labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from internvl.model.internvl import IGNORE_INDEX

LOSS_REDUCTIONS = ("token", "sample", "square")


def _sizes(sample) -> tuple[int, int]:
    """(tokens, tiles) of a dataset sample dict or of a `(num_tokens, num_tiles)` pair."""
    if isinstance(sample, Mapping):
        return int(sample["input_ids"].shape[0]), int(sample["pixel_values"].shape[0])
    tokens, tiles = sample
    return int(tokens), int(tiles)


@dataclass
class _Buffer:
    indices: list[int] = field(default_factory=list)
    tokens: int = 0
    tiles: int = 0


def pack_samples(
    samples: Sequence[Mapping[str, Any] | tuple[int, int]],
    max_tokens: int,
    max_tiles: int,
    max_buffer_size: int = 20,
) -> list[list[int]]:
    """Group sample indices into packs with at most `max_tokens` tokens and `max_tiles` tiles each (§14.1 steps 2, 4).

    Samples are taken in order. Each goes to the first open buffer it fits in (open buffers sorted by tile count,
    descending); otherwise it opens a new buffer. A buffer that reaches exactly `max_tokens` tokens or `max_tiles`
    tiles is emitted; when more than `max_buffer_size` buffers are open, the first (most tiles) is emitted. The rest
    are emitted at the end, in buffer order. Dummy tiles of text-only samples count as tiles, as in the reference.
    """
    for name, value in (("max_tokens", max_tokens), ("max_tiles", max_tiles), ("max_buffer_size", max_buffer_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    packs: list[list[int]] = []
    open_buffers: list[_Buffer] = []
    for index, sample in enumerate(samples):
        tokens, tiles = _sizes(sample)
        if tokens > max_tokens or tiles > max_tiles:
            raise ValueError(
                f"sample {index} has {tokens} tokens and {tiles} tiles; a pack holds at most {max_tokens} tokens and "
                f"{max_tiles} tiles (set max_seq_length <= max_tokens; over-long buffers are not cut here)"
            )
        buffer = next(
            (b for b in open_buffers if b.tokens + tokens <= max_tokens and b.tiles + tiles <= max_tiles), None
        )
        if buffer is None:
            buffer = _Buffer()
            open_buffers.append(buffer)
        buffer.indices.append(index)
        buffer.tokens += tokens
        buffer.tiles += tiles
        if buffer.tokens == max_tokens or buffer.tiles == max_tiles:
            open_buffers.remove(buffer)
            packs.append(buffer.indices)
        open_buffers.sort(key=lambda b: -b.tiles)  # stable: equal tile counts keep their order
        if len(open_buffers) > max_buffer_size:
            packs.append(open_buffers.pop(0).indices)
    packs += [b.indices for b in open_buffers]
    return packs


def loss_weight_for(num_trained: int, loss_reduction: str) -> float:
    """w(x) of §14.2: token 1, sample 1/x, square 1/sqrt(x); 0 when x = 0."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    if num_trained == 0:
        return 0.0
    if loss_reduction == "token":
        return 1.0
    if loss_reduction == "sample":
        return 1.0 / num_trained
    return 1.0 / math.sqrt(num_trained)


def collate_packed(
    samples: Sequence[Mapping[str, Any]],
    loss_reduction: str = "token",
    pad_token_id: int | None = None,
    pad_to: int | None = None,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Concatenate dataset samples into one packed row.

    Returns input_ids, labels, position_ids (restarting at 0 per sub-sample), loss_weight (w(x) of the sub-sample's
    x trained labels at its trained positions, 0 elsewhere; §14.2), all (1, L); mask (1, 1, L, L) additive
    block-diagonal causal (0 = attend, dtype minimum = blocked); cu_seqlens (n + 1,) int32; pixel_values and
    image_flags concatenated. With `pad_to`, the row is padded to that many tokens with `pad_token_id` as a final
    segment of its own (IGNORE labels, weight 0). Pass input_ids, position_ids, mask, labels, loss_weight,
    pixel_values and image_flags to `InternVLModel.forward` (no attention_mask).
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    loss_weight_for(0, loss_reduction)  # validates the name
    ids, labels, positions, weights, segments = [], [], [], [], []
    for k, sample in enumerate(samples):
        sample_ids = sample["input_ids"].long()
        sample_labels = sample["labels"].long().clone()
        sample_labels[0] = IGNORE_INDEX  # never predicted from the previous sub-sample (see module docstring)
        trained = sample_labels != IGNORE_INDEX
        w = loss_weight_for(int(trained.sum()), loss_reduction)
        ids.append(sample_ids)
        labels.append(sample_labels)
        positions.append(torch.arange(len(sample_ids)))
        weights.append(trained.float() * w)
        segments.append(torch.full((len(sample_ids),), k))
    length = sum(len(x) for x in ids)
    if pad_to is not None and pad_to > length:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(f"pad_to needs an integer pad_token_id, got {pad_token_id!r}")
        extra = pad_to - length
        ids.append(torch.full((extra,), pad_token_id))
        labels.append(torch.full((extra,), IGNORE_INDEX))
        positions.append(torch.arange(extra))
        weights.append(torch.zeros(extra))
        segments.append(torch.full((extra,), len(samples)))
    elif pad_to is not None and pad_to < length:
        raise ValueError(f"pad_to={pad_to} is shorter than the packed length {length}")

    segment = torch.cat(segments)  # (L,) sub-sample index of each token
    same = segment[:, None] == segment[None, :]  # (L, L)
    causal = torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    mask = torch.zeros(len(segment), len(segment), dtype=mask_dtype)
    mask = mask.masked_fill(~(same & causal), torch.finfo(mask_dtype).min)
    lengths = torch.tensor([len(x) for x in ids])
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions)[None],
        "mask": mask[None, None],  # (1, 1, L, L)
        "loss_weight": torch.cat(weights)[None],
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32),
        "pixel_values": torch.cat([sample["pixel_values"] for sample in samples]),
        "image_flags": torch.cat([sample["image_flags"] for sample in samples]),
    }
