"""Packing and loss weights (INTERNVL.md §14.1-14.2, §20 item 30) on the tiny random model, float32 on CPU.

The packed row must give the same loss and gradients as the same samples run unpacked: for 'token' against the
model's ordinary padded batch (mean over every trained token of the batch), for 'sample' / 'square' against a
weighted sum computed here from per-sample runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_IMAGE, randomize_, tiny_config

from internvl.model.internvl import InternVLModel
from internvl.training.data import collate
from internvl.training.packing import collate_packed, pack_samples

IGNORE = -100
CTX, IMG, END = 120, 121, 122  # tiny_config's <IMG_CONTEXT> id is 120; <img>/</img> ids are arbitrary here
TOKENS_PER_TILE = 4  # 56-pixel tiles: (56 / 14)^2 / 4


# ---------------------------------------------------------------------------------------------------------------
# pack_samples (§14.1 steps 2, 4)


def test_pack_samples_greedy_by_hand():
    # max 10 tokens / 4 tiles, samples as (tokens, tiles):
    #   0 (6,1) -> new A.  1 (5,1): A would hold 11 tokens -> new B; open [A, B].
    #   2 (4,2) -> A = (10, 3): token budget reached -> emit [0, 2].  3 (3,1) -> B = (8, 2).
    #   4 (2,3): B would hold 5 tiles -> new C (2, 3); open sorted by tiles: [C, B]. End: emit C, then B.
    sizes = [(6, 1), (5, 1), (4, 2), (3, 1), (2, 3)]
    assert pack_samples(sizes, max_tokens=10, max_tiles=4) == [[0, 2], [4], [1, 3]]


def test_pack_samples_tile_budget_and_buffer_limit():
    # exactly max_tiles tiles emits: 0 (2,2) + 1 (2,2) = 4 tiles -> [0, 1]
    assert pack_samples([(2, 2), (2, 2), (1, 1)], max_tokens=100, max_tiles=4) == [[0, 1], [2]]
    # more than max_buffer_size open buffers: the one with most tiles leaves first
    # 0 (8,1) -> A; 1 (7,2) -> B; sorted [B, A]; 2 > 1 open -> emit [1]. 2 (2,1) -> A = 10 tokens -> emit [0, 2]
    assert pack_samples([(8, 1), (7, 2), (2, 1)], max_tokens=10, max_tiles=9, max_buffer_size=1) == [[1], [0, 2]]


def test_pack_samples_respects_budgets_on_dataset_like_samples():
    torch.manual_seed(0)
    samples = [
        {"input_ids": torch.zeros(int(n), dtype=torch.long), "pixel_values": torch.zeros(int(t), 3, 2, 2)}
        for n, t in zip(torch.randint(5, 60, (40,)), torch.randint(1, 7, (40,)))
    ]
    packs = pack_samples(samples, max_tokens=128, max_tiles=12)
    assert sorted(i for pack in packs for i in pack) == list(range(40))  # every sample exactly once
    for pack in packs:
        assert sum(len(samples[i]["input_ids"]) for i in pack) <= 128
        assert sum(samples[i]["pixel_values"].shape[0] for i in pack) <= 12


def test_pack_samples_rejects_a_sample_over_budget():
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pack_samples([(3, 1), (11, 1)], max_tokens=10, max_tiles=4)


# ---------------------------------------------------------------------------------------------------------------
# collate_packed layout


def _sample(ids, labels, tiles=0, flags=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(tiles, 1)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.randn(n, 3, TINY_IMAGE, TINY_IMAGE, generator=g),
        "image_flags": torch.tensor(flags if flags is not None else [1] * tiles if tiles else [0]),
    }


def test_collate_packed_layout_by_hand():
    a = _sample([5, 6, 7], [5, 6, 7])  # first label forced to IGNORE: x = 2
    b = _sample([8, 9, 10, 11], [IGNORE, IGNORE, 10, IGNORE], tiles=1)  # x = 1
    c = _sample([12, 13], [IGNORE, IGNORE])  # x = 0 -> weight 0
    row = collate_packed([a, b, c], loss_reduction="square", pad_token_id=0, pad_to=11)
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0]]
    assert row["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE, 10, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1]]
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(row["loss_weight"], torch.tensor([[0, r, r, 0, 0, 1.0, 0, 0, 0, 0, 0]]))
    assert row["cu_seqlens"].tolist() == [0, 3, 7, 9, 11]
    allowed = (row["mask"][0, 0] == 0).int().tolist()
    segments = [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]
    assert allowed == [[int(segments[i] == segments[j] and j <= i) for j in range(11)] for i in range(11)]
    assert row["mask"].shape == (1, 1, 11, 11)
    assert row["image_flags"].tolist() == [0, 1, 0] and row["pixel_values"].shape[0] == 3


@pytest.mark.parametrize("reduction, weight", [("token", 1.0), ("sample", 1 / 4), ("square", 1 / 2)])
def test_loss_weight_values(reduction, weight):
    row = collate_packed([_sample([1, 2, 3, 4, 5], [IGNORE, 2, 3, 4, 5])], loss_reduction=reduction)
    torch.testing.assert_close(row["loss_weight"], torch.tensor([[0.0] + [weight] * 4]))


# ---------------------------------------------------------------------------------------------------------------
# Packed == unpacked on the tiny model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(InternVLModel(tiny_config()), seed=1).float()


def _block(tiles):
    return [IMG] + [CTX] * (TOKENS_PER_TILE * tiles) + [END]


def _samples():
    """Three samples: 2-tile image, text only (dummy tile, flag 0), 1-tile image; prompts masked, answers trained."""
    s1_ids = [1, 11, 12] + _block(2) + [13, 14, 30, 31, 32, 2]
    s1_labels = [IGNORE] * (len(s1_ids) - 4) + [30, 31, 32, 2]
    s2_ids = [1, 21, 22, 23, 40, 41, 2]
    s2_labels = [IGNORE] * 4 + [40, 41, 2]
    s3_ids = [1] + _block(1) + [15, 50, 51, 52, 53, 54, 2]
    s3_labels = [IGNORE] * (len(s3_ids) - 6) + [50, 51, 52, 53, 54, 2]
    return [
        _sample(s1_ids, s1_labels, tiles=2, seed=1),
        _sample(s2_ids, s2_labels, seed=2),
        _sample(s3_ids, s3_labels, tiles=1, seed=3),
    ]


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _packed_loss(model, samples, reduction):
    row = collate_packed(samples, loss_reduction=reduction)
    out = model(
        pixel_values=row["pixel_values"], input_ids=row["input_ids"], position_ids=row["position_ids"],
        image_flags=row["image_flags"], labels=row["labels"], mask=row["mask"], loss_weight=row["loss_weight"],
    )
    return out


def _assert_same(packed_loss, packed_grads, loss, grads):
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == grads.keys() and any("vision_model" in k for k in grads)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_token_reduction_equals_the_unpacked_batch_mean(model):
    samples = _samples()
    packed = _packed_loss(model, samples, "token").loss
    packed_grads = _grads(model, packed)

    batch = collate(samples, pad_token_id=0)
    unpacked = model(**batch).loss  # mean CE over every trained token of the padded batch
    grads = _grads(model, unpacked)
    _assert_same(packed, packed_grads, unpacked, grads)


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_weighted_reduction_equals_an_independent_computation(model, reduction):
    samples = _samples()
    packed = _packed_loss(model, samples, reduction).loss
    packed_grads = _grads(model, packed)

    # Independent: run each sample alone; w = 1/x ('sample') or 1/sqrt(x) ('square') per trained token.
    numerator, denominator = 0.0, 0.0
    for s in samples:
        logits = model(pixel_values=s["pixel_values"], input_ids=s["input_ids"][None],
                       image_flags=s["image_flags"]).logits[0]
        ce = F.cross_entropy(logits[:-1], s["labels"][1:], ignore_index=IGNORE, reduction="sum")
        x = int((s["labels"][1:] != IGNORE).sum())
        w = 1 / x if reduction == "sample" else 1 / math.sqrt(x)
        numerator = numerator + w * ce
        denominator += w * x
    reference = numerator / denominator
    grads = _grads(model, reference)
    _assert_same(packed, packed_grads, reference, grads)


def test_no_cross_sample_attention_and_positions_restart(model):
    samples = _samples()
    with torch.no_grad():
        logits = _packed_loss(model, samples, "token").logits[0]
        changed = [dict(s) for s in samples]
        changed[0]["input_ids"] = samples[0]["input_ids"].clone()
        changed[0]["input_ids"][1:3] = torch.tensor([60, 61])  # sample A's text
        changed[0]["pixel_values"] = samples[0]["pixel_values"] + 1.0  # and its image
        logits_changed = _packed_loss(model, changed, "token").logits[0]
        alone = model(pixel_values=samples[1]["pixel_values"], input_ids=samples[1]["input_ids"][None],
                      image_flags=samples[1]["image_flags"]).logits[0]
    a, b = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    assert not torch.allclose(logits[:a], logits_changed[:a])
    torch.testing.assert_close(logits[a:], logits_changed[a:], rtol=0, atol=0)  # B and C untouched
    # B inside the pack equals B run alone from position 0
    torch.testing.assert_close(logits[a : a + b], alone, rtol=1e-5, atol=1e-5)
