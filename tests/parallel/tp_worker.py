"""What the tensor-parallel test runs, once in the test process (one rank, unsharded) and in each spawned rank.

A module of its own so that `torch.multiprocessing.spawn` can import the worker in the child processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from internvl.engine import Engine, SamplingParams
from internvl.generation.generate import generate
from internvl.generation.sampling import GenerationConfig
from internvl.model.internvl import InternVLModel
from tiny import randomize_, tiny_config

IMG = 120  # tiny_config's <IMG_CONTEXT> id; one 56-pixel tile gives 4 image tokens
NEW_TOKENS = 10


def build(arch: str) -> InternVLModel:
    return randomize_(InternVLModel(tiny_config(arch)), seed=3, std=0.3).eval()


def prompts():
    g = torch.Generator().manual_seed(11)
    text = torch.randint(3, 100, (14,), generator=g).tolist()
    with_image = text[:3] + [IMG] * 4 + text[3:9]
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    return with_image, pixels, text


@torch.inference_mode()
def run_scenario(model: InternVLModel) -> dict:
    """Logits of a padded two-row forward with an image, greedy `generate`, and the engine (greedy + seeded)."""
    with_image, pixels, text = prompts()
    short = text[:6]
    ids = torch.tensor([with_image, [0] * (len(with_image) - len(short)) + short])  # left padded
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [len(with_image) - len(short)]])).long()
    logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    reference = generate(model, ids, attention_mask=mask, pixel_values=pixels,
                         config=GenerationConfig(max_new_tokens=NEW_TOKENS))
    engine = Engine(model, num_blocks=64, block_size=4, prefill_chunk_tokens=6)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True)
    outs = engine.generate([
        dict(prompt_ids=with_image, pixel_values=pixels),
        dict(prompt_ids=text),
        dict(prompt_ids=short, params=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=7)),
    ], greedy)
    return {
        "logits": logits,
        "reference": reference.tolist(),
        "engine": [o.outputs[0].token_ids for o in outs],
        "pool_kv_heads": engine.pool.num_kv_heads,
        "q_rows": model.language_model.model.layers[0].self_attn.q_proj.out_features,
    }


def worker(rank: int, world: int, init_file: str, out_dir: str, archs: list[str], sharded_head: list[str]) -> None:
    from internvl.parallel import tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for arch in archs:
            model = tensor_parallel(build(arch), shard_lm_head=arch in sharded_head)
            results[arch] = run_scenario(model)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
