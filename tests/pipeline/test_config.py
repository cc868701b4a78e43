"""GenerationConfig (LMDeploy's names and defaults) -> the engine's SamplingParams; PipelineConfig checks."""

import dataclasses

import pytest

from internvl import GenerationConfig
from internvl.engine.sampler import SamplingParams
from internvl.pipeline import PipelineConfig


def test_defaults_are_lmdeploys():
    # lmdeploy/messages.py GenerationConfig: n=1, max_new_tokens=512, do_sample=False, top_p=1.0, top_k=50,
    # min_p=0.0, temperature=0.8, repetition_penalty=1.0, ignore_eos=False, skip_special_tokens=True
    g = GenerationConfig()
    assert (g.n, g.max_new_tokens, g.do_sample, g.top_p, g.top_k, g.min_p, g.temperature, g.repetition_penalty,
            g.ignore_eos, g.random_seed, g.skip_special_tokens, g.logprobs) == (
        1, 512, False, 1.0, 50, 0.0, 0.8, 1.0, False, None, True, None)


def test_greedy_by_default_and_sampling_settings_map_field_by_field():
    assert GenerationConfig(max_new_tokens=7).to_sampling_params() == SamplingParams(
        max_new_tokens=7, greedy=True, top_k=50)
    g = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.9, top_k=0, min_p=0.1, repetition_penalty=1.2,
                         random_seed=3, stop_words=["\n\n", "END"], stop_token_ids=[5], min_new_tokens=2,
                         ignore_eos=True, logprobs=3, max_new_tokens=9)
    assert g.to_sampling_params() == SamplingParams(
        max_new_tokens=9, min_new_tokens=2, greedy=False, temperature=0.5, top_k=None, top_p=0.9, min_p=0.1,
        repetition_penalty=1.2, seed=3, stop=("\n\n", "END"), stop_token_ids=(5,), ignore_eos=True, logprobs=True,
        top_logprobs=3)
    assert g.to_sampling_params(max_new_tokens=1).min_new_tokens == 1  # a lowered limit lowers the minimum too
    assert GenerationConfig(stop_words="END").stop_words == ("END",)
    assert GenerationConfig(logprobs=0).to_sampling_params().logprobs  # the chosen token's logprob only


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=2), "n=2"),
    (dict(bad_words=["x"]), "bad_words / bad_token_ids are not supported"),
    (dict(bad_token_ids=[1]), "bad_words / bad_token_ids are not supported"),
    (dict(logprobs=21), "logprobs=21"),
    (dict(logprobs=True), "logprobs=True"),
    (dict(random_seed="1"), "random_seed='1'"),
    (dict(stop_words=[""]), "non-empty"),
    (dict(stop_words=[1]), "stop_words=[1]"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(do_sample=True, temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(do_sample="yes"), "do_sample='yes'"),
    (dict(min_new_tokens=1.5), "min_new_tokens=1.5"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as e:
        GenerationConfig(**kwargs)
    assert message in str(e.value)


def test_unknown_setting_and_frozen():
    with pytest.raises(TypeError, match="response_format"):
        GenerationConfig(response_format={"type": "json_object"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerationConfig().max_new_tokens = 3


@pytest.mark.parametrize("options, error, message", [
    (dict(max_batch_size=0), ValueError, "max_batch_size=0"),
    (dict(session_len=-1), ValueError, "session_len=-1"),
    (dict(max_dynamic_patch=1.5), ValueError, "max_dynamic_patch=1.5"),
    (dict(vision_cache_size=-1), ValueError, "vision_cache_size=-1"),
    (dict(quantize="fp8"), ValueError, "quantize='fp8'"),
    (dict(system_message=3), ValueError, "system_message must be a string"),
    (dict(backend_config=1), TypeError, "unknown pipeline option(s) ['backend_config']"),
])
def test_bad_pipeline_options(options, error, message):
    with pytest.raises(error) as e:
        PipelineConfig.from_options(options)
    assert message in str(e.value)
