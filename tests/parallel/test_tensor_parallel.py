"""Tensor parallelism: 2 CPU processes on gloo give the same greedy tokens as 1 process (reference `generate` and
the engine, every LLM family), logits within fp32 rounding, and each rank holds only its share of heads and KV."""

import pytest
import torch
import torch.multiprocessing as mp

from internvl.parallel import shard_sizes, tensor_parallel
from parallel.tp_worker import build, run_scenario, worker
from tiny import LLM_ARCHS, tiny_llm

WORLD = 2
SHARDED_HEAD = ["Qwen2ForCausalLM", "Phi3ForCausalLM"]  # vocab-parallel lm_head on these, replicated on the rest


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(worker, args=(WORLD, str(out / "rendezvous"), str(out), list(LLM_ARCHS), SHARDED_HEAD),
             nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_two_ranks_equal_one_process(two_ranks, arch):
    single = run_scenario(build(arch))
    for rank, results in enumerate(two_ranks):
        got = results[arch]
        assert got["reference"] == single["reference"], f"rank {rank}: reference generate differs"
        assert got["engine"] == single["engine"], f"rank {rank}: engine output differs"
        torch.testing.assert_close(got["logits"], single["logits"], rtol=1e-5, atol=1e-5)
    assert two_ranks[0][arch]["engine"] == two_ranks[1][arch]["engine"]
    # the sharded layers and the engine's KV pool hold this rank's heads only
    cfg = build(arch).config.llm
    assert single["pool_kv_heads"] == cfg.num_kv_heads and single["q_rows"] == cfg.num_heads * cfg.head_dim
    for results in two_ranks:
        assert results[arch]["pool_kv_heads"] == cfg.num_kv_heads // WORLD
        assert results[arch]["q_rows"] == cfg.num_heads * cfg.head_dim // WORLD


def test_shard_sizes_and_divisibility_error():
    cfg = tiny_llm(num_heads=4, num_kv_heads=2, intermediate_size=97)
    sizes = shard_sizes(cfg, 2)
    assert (sizes.heads, sizes.kv_heads, sizes.intermediate) == (2, 1, (49, 48))
    assert sizes.intermediate_range(1) == (49, 97)
    with pytest.raises(ValueError, match=r"num_kv_heads = 2 not divisible.*World sizes that work: 1, 2"):
        shard_sizes(cfg, 4)
    with pytest.raises(ValueError, match=r"divisible by 3; this model has num_heads = 4 and num_kv_heads = 2 not"):
        shard_sizes(cfg, 3)


def test_needs_an_initialised_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        tensor_parallel(build("Qwen2ForCausalLM"))
