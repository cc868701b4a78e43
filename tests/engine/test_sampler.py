"""SamplingParams validation and the sampler's semantics against the reference `generation.sampling`."""

import pytest
import torch

from internvl.engine.sampler import (
    SamplingParams,
    process_logits,
    sample_token,
    sequence_seed,
    token_logprob,
    warp,
)
from internvl.generation.sampling import GenerationConfig, apply_repetition_penalty, next_tokens
from internvl.generation.sampling import warp as reference_warp


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(min_new_tokens=5, max_new_tokens=4), "min_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=1.2), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(seed=1.5), "seed"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(n=0), "n"),
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(greedy="yes"), "greedy"),
    ],
)
def test_invalid_params_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingParams(**kwargs)


def test_params_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=7, top_k=-1)
    assert p.stop == ("###",) and p.stop_token_ids == (7,) and p.top_k is None
    assert SamplingParams(top_k=0).top_k is None
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(greedy=True).is_greedy
    assert not SamplingParams().is_greedy and SamplingParams().top_k is None  # OpenAI default: no top-k
    with pytest.raises(Exception):
        p.n = 2  # frozen


def test_from_generation_config_keeps_the_model_card_semantics():
    cfg = GenerationConfig(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=5, seed=3,
                           repetition_penalty=1.2, min_new_tokens=2)
    p = SamplingParams.from_generation_config(cfg)
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (9, 2, 0.7, 0.9, 50, 3)
    assert p.stop_token_ids == (5,) and p.repetition_penalty == 1.2 and not p.is_greedy
    assert SamplingParams.from_generation_config(GenerationConfig(temperature=0.5)).is_greedy


def test_repetition_penalty_is_the_reference_over_generated_tokens_only():
    logits = torch.randn(50)
    gen = [3, 7, 7, 40]
    p = SamplingParams(repetition_penalty=1.3)
    ref = apply_repetition_penalty(logits[None].clone(), torch.tensor([gen]), 1.3)[0]
    assert torch.equal(process_logits(logits, gen, p), ref)
    assert torch.equal(process_logits(logits, [], p), logits)  # the prompt is never penalised
    assert not torch.equal(ref, logits)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(10)
    gen = [2, 2, 2, 5]
    out = process_logits(logits, gen, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    expected = torch.zeros(10)
    expected[2] = -(0.5 + 3 * 0.25)
    expected[5] = -(0.5 + 1 * 0.25)
    assert torch.allclose(out, expected)
    boosted = process_logits(logits, gen, SamplingParams(presence_penalty=-1.0))
    assert boosted[2] == 1.0 and boosted[0] == 0.0


def test_min_new_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(6)
    logits[4] = 10.0
    p = SamplingParams(min_new_tokens=2, greedy=True)
    assert sample_token(logits, [1], p, suppress=(4,)) != 4
    assert sample_token(logits, [1, 1], p, suppress=(4,)) == 4
    assert sample_token(logits, [], SamplingParams(greedy=True), suppress=(4,)) == 4


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.7, top_k=10, top_p=0.8), dict(temperature=1.3, top_p=0.5), dict(top_k=3),
     dict(temperature=0.9, min_p=0.2), dict(top_k=1)],
)
def test_warpers_equal_the_reference(settings):
    torch.manual_seed(0)
    scores = torch.randn(4, 40)
    ref_cfg = GenerationConfig(do_sample=True, **{"top_k": None, **settings})
    ref = reference_warp(scores.clone(), ref_cfg)
    ours = warp(scores.clone(), SamplingParams(**settings))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
    assert torch.isinf(ours).any()


def test_seeded_sampling_equals_the_reference_draw():
    torch.manual_seed(0)
    logits = torch.randn(64)
    gen = [1, 2, 3]
    cfg = GenerationConfig(do_sample=True, temperature=1.4, top_k=20, top_p=0.95, repetition_penalty=1.1)
    p = SamplingParams.from_generation_config(cfg)
    ours, ref = [], []
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for step in range(20):
        ours.append(sample_token(logits, gen, p, g1))
        ref.append(int(next_tokens(logits[None], torch.tensor([gen]), cfg, step + 3, g2)[0]))
    assert ours == ref and len(set(ours)) > 1


def test_sequence_seeds():
    assert sequence_seed(None, 0) is None and sequence_seed(5, 0) == 5
    assert len({sequence_seed(5, i) for i in range(8)}) == 8


def test_token_logprob_is_log_softmax_of_raw_logits():
    logits = torch.randn(30)
    lp = token_logprob(logits, 4, top=3)
    ref = torch.log_softmax(logits, -1)
    assert lp.token_id == 4 and abs(lp.logprob - float(ref[4])) < 1e-6
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    assert all(abs(v - float(ref[t])) < 1e-6 for t, v in lp.top)
    assert token_logprob(logits, 4).top == ()
