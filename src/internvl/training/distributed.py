"""Data parallelism for training: process-group setup, the seeded rank-aware sampler, DDP/FSDP wrapping and
full (unsharded) state dicts for checkpoints.

Launch: `torchrun --nproc-per-node N -m internvl.cli train CONFIG.yaml` (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Backend: nccl on CUDA, gloo on CPU. A process group that is
already initialised (tests, notebooks) is used as it is.

Data order: one permutation per epoch, a function of (seed, epoch) only. Global micro-batch m of an epoch is
`perm[m*G : (m+1)*G]` with G = per-device batch x world size; rank r takes the r-th per-device slice of it. So the
union of what the ranks see in a step is exactly what one process with the whole global batch would see, and a
resumed run can jump to micro-batch m without reading anything before it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Join (or reuse) the process group described by the environment; a single process needs nothing."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = _resolve_device(device, local)
        if dist.get_backend() == "gloo" and dev.type == "cuda":
            dev = torch.device("cpu")  # a gloo group set up by the caller means CPU training
        return DistContext(rank, world, local, dev)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, 0, _resolve_device(device, 0))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    return DistContext(rank, world, local, dev)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process); returns `t`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


# ------------------------------------------------------------------------------------------------ data order
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch; depends only on (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_samples)


class RankBatchSampler(torch.utils.data.Sampler):
    """Per-device batches of one epoch for one rank, starting at micro-batch `start` (used on resume).

    The incomplete last global batch of an epoch is dropped, so every rank runs the same number of steps.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"({batch_size} per device x {world_size} processes)"
            )
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    @staticmethod
    def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
        return num_samples // (batch_size * world_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.num_samples, self.batch_size, self.world_size) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        g = self.batch_size * self.world_size
        for m in range(self.start, self.batches_per_epoch(self.num_samples, self.batch_size, self.world_size)):
            lo = m * g + self.rank * self.batch_size
            yield perm[lo:lo + self.batch_size].tolist()


def rank_shard(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Samples of one epoch for one rank (every world_size-th of the permutation), for packed streams."""
    perm = epoch_permutation(num_samples, seed, epoch)
    usable = (num_samples // world_size) * world_size
    return perm[:usable][rank::world_size].tolist()


# ------------------------------------------------------------------------------------------------ wrapping
def wrap_model(model: nn.Module, ctx: DistContext, fsdp: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 (`fully_shard` per ViT/LLM block, then the root) for multi-process runs."""
    if not ctx.distributed:
        if fsdp:
            raise ValueError("fsdp needs a multi-process launch (torchrun --nproc-per-node N ...)")
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in list(model.vision_model.encoder.layers) + list(model.language_model.model.layers):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # find_unused_parameters: text-only batches drop every vision feature (image_flags = 0, INTERNVL.md §12.3),
    # so the ViT can get no gradient in a step while another rank's ViT does.
    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
               find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(unwrap(model), FSDPModule)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded, CPU copy of the weights. Collective under FSDP (call on every rank; only rank 0 gets tensors)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state, strict=True)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


__all__ = [
    "DistContext", "setup", "is_main_process", "barrier", "all_reduce_sum", "broadcast_object",
    "epoch_permutation", "RankBatchSampler", "rank_shard", "wrap_model", "unwrap", "is_fsdp",
    "full_model_state_dict", "load_full_model_state_dict", "full_optimizer_state_dict",
    "load_full_optimizer_state_dict",
]
