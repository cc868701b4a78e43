"""Tensor parallelism (Megatron-style) for the LLM of an `InternVLModel`, over a torch.distributed process group.

    dist.init_process_group("gloo" or "nccl")          # torchrun --nproc-per-node N ...
    model = tensor_parallel(load_model(path), group=None)   # every rank loads, then keeps its shard

Every rank runs the same program on the same inputs and gets the same outputs; inside each decoder layer the work
is split by heads and by MLP columns:
* attention: rank r keeps query heads [r*H/W, (r+1)*H/W) and KV heads [r*KV/W, (r+1)*KV/W) of q/k/v_proj (column
  parallel: their output rows). Query head h uses KV head h // (H/KV) (INTERNVL.md §11.1), and rank r's query heads
  map exactly onto rank r's KV heads, so attention needs no communication. o_proj keeps the matching input columns
  (row parallel) and the partial outputs are summed with one all_reduce; its bias is added once, after the sum.
* MLP: gate/up keep a slice of the intermediate rows, down_proj the matching columns, then one all_reduce.
* lm_head (optional, `shard_lm_head=True`): vocabulary rows split, logits all_gathered (vocab parallel).
The ViT, projector, embeddings, norms and RoPE are replicated. The KV cache of each rank holds only its KV heads:
the attention modules report the local count (`self_attn.kv_heads`), which the engine sizes its pool with.

Requirements: num_heads and num_kv_heads divisible by the world size (checked, `shard_sizes`). Inference only
(the collectives are not differentiable). Apply before `optimize_for_inference` and before `quantize_model`: both
then work on the sharded layers. All four LLM families (Qwen2, Llama, InternLM2/3, Phi-3) use the modules of
`internvl.model.llm` after loading (the loader splits fused projections), so one transform covers them.

Numerics: an all_reduce sums the ranks' partial products in a different order than one matmul does, so logits agree
with one process to fp32 rounding (tests/parallel: 1e-5), and greedy output token for token. Sampling must draw the
same random numbers on every rank: use seeded sampling or the same `torch.manual_seed` on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from internvl.config import LLMConfig
from internvl.model.llm import MLP, Attention


@dataclass(frozen=True)
class ShardSizes:
    """Per-rank sizes for `world` ranks."""

    world: int
    heads: int  # query heads per rank
    kv_heads: int  # KV heads per rank
    intermediate: tuple[int, ...]  # MLP columns of each rank (the remainder goes to the first ranks)

    def intermediate_range(self, rank: int) -> tuple[int, int]:
        start = sum(self.intermediate[:rank])
        return start, start + self.intermediate[rank]


def shard_sizes(cfg: LLMConfig, world: int) -> ShardSizes:
    """Check that `cfg` splits over `world` ranks and say how. Raises ValueError with the numbers otherwise."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    counts = (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads))
    bad = [f"{name} = {n}" for name, n in counts if n % world]
    if bad:
        ok = [w for w in range(1, cfg.num_kv_heads + 1) if cfg.num_heads % w == 0 and cfg.num_kv_heads % w == 0]
        raise ValueError(
            f"tensor parallelism over {world} ranks needs num_heads and num_kv_heads divisible by {world}; this "
            f"model has {' and '.join(bad)} not divisible. World sizes that work: {', '.join(map(str, ok))}"
        )
    base, extra = divmod(cfg.intermediate_size, world)
    return ShardSizes(world, cfg.num_heads // world, cfg.num_kv_heads // world,
                      tuple(base + (r < extra) for r in range(world)))


@torch.no_grad()
def _rows(lin: nn.Linear, start: int, stop: int) -> nn.Linear:
    """Output rows [start, stop) of `lin` as a new Linear (column parallel)."""
    out = nn.Linear(lin.in_features, stop - start, bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    out.weight.copy_(lin.weight[start:stop])
    if lin.bias is not None:
        out.bias.copy_(lin.bias[start:stop])
    return out.requires_grad_(False)


class RowParallelLinear(nn.Module):
    """Input columns [start, stop) of a Linear; the ranks' partial outputs are summed, then the bias is added."""

    def __init__(self, lin: nn.Linear, start: int, stop: int, group=None):
        super().__init__()
        self.group = group
        self.linear = nn.Linear(stop - start, lin.out_features, bias=False, device=lin.weight.device,
                                dtype=lin.weight.dtype).requires_grad_(False)
        with torch.no_grad():
            self.linear.weight.copy_(lin.weight[:, start:stop])
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = stop - start, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (..., out) partial sum of this rank's columns
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelLinear(nn.Module):
    """lm_head rows split over ranks (the last shard zero-padded to equal size); logits gathered in rank order.

    `weight` is this rank's (V/W, D) shard; `out_features` is the full vocabulary.
    """

    def __init__(self, lin: nn.Linear, rank: int, world: int, group=None):
        super().__init__()
        self.group, self.world = group, world
        self.in_features, self.out_features = lin.in_features, lin.out_features
        per = -(-lin.out_features // world)  # ceil: every rank's shard has `per` rows, so all_gather sizes agree
        shard = lin.weight.detach()[rank * per : (rank + 1) * per]
        self.weight = nn.Parameter(F.pad(shard, (0, 0, 0, per - shard.shape[0])).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()  # (..., V/W)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.out_features]  # (..., V)


@torch.no_grad()
def tensor_parallel(model: nn.Module, group=None, *, shard_lm_head: bool = False) -> nn.Module:
    """Keep this rank's shard of every decoder layer (and optionally of lm_head); in place. Returns `model`.

    group: a torch.distributed process group (None: the default group, which must be initialised).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("tensor_parallel needs torch.distributed initialised (dist.init_process_group), "
                         "e.g. by running under `torchrun --nproc-per-node N`")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    lm = model.language_model if hasattr(model, "language_model") else model
    sizes = shard_sizes(lm.config, world)
    for i, layer in enumerate(lm.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not Attention or type(mlp) is not MLP or any(
            type(m) is not nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                               mlp.up_proj, mlp.down_proj)
        ):
            raise ValueError(
                f"layer {i} is not the eager float Attention/MLP of internvl.model.llm (already sharded, fused or "
                "quantized?); apply tensor_parallel once, right after loading, before optimize_for_inference or "
                "quantize_model"
            )
        d = attn.head_dim
        q0, kv0 = rank * sizes.heads * d, rank * sizes.kv_heads * d
        attn.q_proj = _rows(attn.q_proj, q0, q0 + sizes.heads * d)  # (H/W * d, D)
        attn.k_proj = _rows(attn.k_proj, kv0, kv0 + sizes.kv_heads * d)  # (KV/W * d, D)
        attn.v_proj = _rows(attn.v_proj, kv0, kv0 + sizes.kv_heads * d)
        attn.o_proj = RowParallelLinear(attn.o_proj, q0, q0 + sizes.heads * d, group)
        attn.heads, attn.kv_heads = sizes.heads, sizes.kv_heads
        m0, m1 = sizes.intermediate_range(rank)
        mlp.gate_proj = _rows(mlp.gate_proj, m0, m1)
        mlp.up_proj = _rows(mlp.up_proj, m0, m1)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, m0, m1, group)
    if shard_lm_head:
        if type(lm.lm_head) is not nn.Linear:
            raise ValueError("shard_lm_head needs the float nn.Linear lm_head; apply tensor_parallel before "
                             "optimize_for_inference or quantize_model")
        lm.lm_head = VocabParallelLinear(lm.lm_head, rank, world, group)
    return model
