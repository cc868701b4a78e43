"""`internvl train`: supervised fine-tuning (full, frozen parts, LoRA) and MPO on InternVL models.

Spec: INTERNVL.md §12-§14 (data, labels, packing, loss weights, recipes), §16 (MPO). Config: `TrainConfig`
(docs/TRAINING.md). Reference: `internvl_chat/internvl/train/internvl_chat_finetune.py` (on the HF Trainer).

One step, top to bottom:
1. take `grad_accum_steps` micro-batches from this rank's stream (seeded order, `distributed.RankBatchSampler`);
2. SFT: loss = Σ w·CE over the whole optimizer step on all ranks / Σ w over the same (w = 1 per trained token, or the
   packed loss weights of §14.2). The denominator is all-reduced before the backward passes, so the gradient does
   not depend on how the global batch is split over ranks and micro-batches (1 x 4 == 2 x 2 == 4 x 1 up to float
   summation order). The reference averages per-micro-batch means instead; equal whenever micro-batches hold equal
   token counts. MPO: the §16 loss averaged over micro-batches;
3. clip the global gradient norm, AdamW step (per-module lr groups, no decay for biases/norms/ls1/ls2/1-D), cosine
   schedule with linear warm-up;
4. every `save_steps`: `output_dir/checkpoint-{step}` written atomically (temp dir + COMPLETE marker + rename) with
   weights, optimizer, scheduler, per-rank RNG and data positions; `resume` continues from the newest complete one
   and replays exactly the remaining steps (bitwise identical to an uninterrupted run on CPU in fp32).
The final model goes to `output_dir/final` in the original checkpoint layout (LoRA merged unless `merge_lora: false`),
with the tokenizer files and the resolved `train_config.yaml`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from internvl.model.internvl import IGNORE_INDEX
from internvl.training import distributed as D
from internvl.training.config import TrainConfig, load_train_config, parse_overrides
from internvl.training.mpo import MPOState, collate_preference, copy_reference, mpo_forward

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL_DIR = "final"
LOG_FILE = "train_log.jsonl"
# Keys whose change makes a resumed run read different data than the interrupted one.
DATA_ORDER_KEYS = ("seed", "per_device_batch_size", "grad_accum_steps", "use_packed_ds", "max_packed_tokens",
                   "max_packed_tiles", "objective")
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "position_ids", "image_flags", "mask")


# ================================================================================================ model
def init_weights_(model: nn.Module, std: float = 0.02, vit_embedding_std: float = 0.02) -> nn.Module:
    """From-scratch initialisation: N(0, std) matrices and embeddings (transformers' initializer_range), zero
    biases, norms and layer scales at 1, InternViT class/position embeddings N(0, vit_embedding_std).

    InternViT creates its class/position embeddings with N(0, 1) (harmless there: it is always loaded from
    pretrained weights). From scratch, that per-position constant is ~2x the patch content (conv output std ~0.5)
    and the demo model's vision path collapsed to a constant; timm's ViT init (0.02) lets the content through."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("class_embedding", "position_embedding")):
                p.normal_(0.0, vit_embedding_std)
            elif p.ndim >= 2:
                p.normal_(0.0, std)
            elif name.endswith(".bias"):
                p.zero_()
            else:  # norm weights, ls1/ls2
                p.fill_(1.0)
    return model


def build_model(cfg: TrainConfig, tokenizer) -> nn.Module:
    """Load (or create) the model in float32 on CPU, resolve the image token, apply config overrides."""
    from internvl.api.model import InternVLChatModel
    from internvl.config import InternVLConfig
    from internvl.templates.conversation import get_template
    from internvl.tokenizer import image_context_id

    if cfg.model is not None:
        model = InternVLChatModel.from_pretrained(cfg.model, torch_dtype=torch.float32)
    else:
        model = init_weights_(InternVLChatModel(InternVLConfig.from_dict(cfg.model_config)))
    changes = {}
    if cfg.template is not None:
        changes["template"] = cfg.template
    if cfg.max_dynamic_patch is not None:
        changes["max_dynamic_patch"] = cfg.max_dynamic_patch
    if changes:  # the saved config.json then records what the model was trained with
        model.config = model.config.replace(**changes)
        model.conv_template = get_template(model.config.template)
    vocab = model.config.llm.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab} rows; "
                         "resizing the embeddings is not supported")
    model.img_context_token_id = image_context_id(tokenizer)
    return model.train()


def apply_training_setup(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freezing, LoRA and gradient checkpointing, in that order (LoRA freezes the base of the part it adapts)."""
    from internvl.training.lora import apply_lora

    for flag, part in ((cfg.freeze_vision, model.vision_model), (cfg.freeze_projector, model.mlp1),
                       (cfg.freeze_llm, model.language_model)):
        if flag:
            part.requires_grad_(False)
    if cfg.use_llm_lora or cfg.use_vision_lora:
        apply_lora(model, cfg.use_llm_lora, cfg.use_vision_lora, cfg.lora_alpha, cfg.lora_dropout)
    model.vision_model.encoder.gradient_checkpointing = cfg.gradient_checkpointing
    model.language_model.model.gradient_checkpointing = cfg.gradient_checkpointing
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter is trainable with this freezing/LoRA setup")
    return model


# ================================================================================================ optimizer
def _part(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("mlp1."):
        return "projector"
    if name.startswith("language_model."):
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no known part (vision_model, mlp1, language_model)")


def no_decay(name: str, p: torch.Tensor) -> bool:
    # biases, norms, ls1/ls2 and every other 1-D parameter: no weight decay
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name or name.endswith((".ls1", ".ls2"))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one group per (part, decay): vision / projector / llm, each with its own lr (INTERNVL.md §14)."""
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = _part(name)
        key = part + ("_no_decay" if no_decay(name, p) else "")
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": cfg.group_lr(part),
                           "weight_decay": 0.0 if key.endswith("_no_decay") else cfg.weight_decay}
        groups[key]["params"].append(p)
    order = [f"{part}{suffix}" for part in ("vision", "projector", "llm") for suffix in ("", "_no_decay")]
    # the fused kernel: one pass per tensor instead of ~10 elementwise ops (measured 8x faster on 2 CPU cores)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups.values() for p in g["params"])
    return torch.optim.AdamW([groups[k] for k in order if k in groups], betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """lr multiplier for 0-based update `step`: linear warm-up reaching 1 at update `warmup`, then a half cosine
    from 1 towards 0 (transformers' `get_cosine_schedule_with_warmup`, shifted so the first update is not at 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))


# ================================================================================================ data
def data_config(cfg: TrainConfig, model_config):
    from internvl.training.data import DataConfig

    max_patch = model_config.max_dynamic_patch if model_config.dynamic_image_size else 1
    return DataConfig(template=model_config.template, num_image_token=model_config.num_image_token,
                      image_size=model_config.image_size, min_dynamic_patch=min(model_config.min_dynamic_patch, max_patch),
                      max_dynamic_patch=max_patch, use_thumbnail=model_config.use_thumbnail,
                      max_seq_length=cfg.max_seq_length, seed=cfg.seed)


def build_dataset(cfg: TrainConfig, tokenizer, model_config) -> tuple[torch.utils.data.Dataset, Callable]:
    """The dataset of `cfg.meta_path` and its collate function (one sample list -> model inputs + labels)."""
    import functools

    dcfg = data_config(cfg, model_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.objective == "mpo":
        from internvl.training.mpo import PreferenceDataset

        ds = PreferenceDataset(cfg.meta_path, tokenizer, dcfg, skip_bad_records=cfg.skip_bad_records)
        return ds, functools.partial(collate_preference, pad_token_id=pad)
    from internvl.training.data import SupervisedDataset, collate

    ds = SupervisedDataset(cfg.meta_path, tokenizer, dcfg, skip_bad_records=cfg.skip_bad_records)
    if cfg.use_packed_ds:
        from internvl.training.packing import collate_packed

        return ds, functools.partial(collate_packed, loss_reduction=cfg.loss_reduction, pad_token_id=pad)
    return ds, functools.partial(collate, pad_token_id=pad)


def _identity(x):
    return x


def _loader_generator(seed: int, epoch: int) -> torch.Generator:
    # the DataLoader draws worker seeds from this, never from the global RNG (which would break bitwise resume)
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0]))


PACK_CHUNK = 64  # samples planned together by `pack_samples` (its open buffers live within one chunk)


@dataclass
class BatchStream:
    """This rank's micro-batches, epoch after epoch, with a resumable position.

    Non-packed: `position` counts micro-batches of the epoch already handed out; an epoch is cut to whole optimizer
    steps. Packed: this rank's shard is read in chunks of PACK_CHUNK samples, each chunk is grouped by
    `packing.pack_samples` (the reference's buffer rule, §14.1) and every pack is one micro-batch; `position` is the
    chunk's first sample and `pack_offset` the packs of it already handed out. The epoch ends for every rank as
    soon as one rank's shard runs out (ranks stay in lockstep).
    """

    dataset: Any
    collate_fn: Callable
    cfg: TrainConfig
    ctx: D.DistContext
    epoch: int = 0
    position: int = 0
    pack_offset: int = 0

    def micro_batches_per_epoch(self) -> int:
        b = D.RankBatchSampler.batches_per_epoch(len(self.dataset), self.cfg.per_device_batch_size,
                                                 self.ctx.world_size)
        return (b // self.cfg.grad_accum_steps) * self.cfg.grad_accum_steps

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "pack_offset": self.pack_offset}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.position, self.pack_offset = int(d["epoch"]), int(d["position"]), int(d["pack_offset"])

    def __iter__(self) -> Iterator[dict]:
        empty_epochs = 0
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            got = 0
            for batch in self._packed_epoch() if self.cfg.use_packed_ds else self._epoch():
                got += 1
                yield batch
            empty_epochs = 0 if got else empty_epochs + 1
            if empty_epochs > 1:  # one empty epoch is a resume at an epoch's end; two mean no data at all
                raise ValueError(f"the data gives rank {self.ctx.rank} no micro-batch in a whole epoch "
                                 f"({len(self.dataset)} samples, {self.ctx.world_size} processes)")
            self.epoch, self.position, self.pack_offset = self.epoch + 1, 0, 0

    def _loader(self, sampler, samples: bool = False):
        kw = dict(num_workers=self.cfg.num_workers, generator=_loader_generator(self.cfg.seed, self.epoch))
        if samples:  # one sample at a time, in `sampler` order
            return torch.utils.data.DataLoader(self.dataset, sampler=sampler, batch_size=None, collate_fn=_identity,
                                               **kw)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn, **kw)

    def _epoch(self) -> Iterator[dict]:
        stop = self.micro_batches_per_epoch()
        if self.position >= stop:
            return
        sampler = D.RankBatchSampler(len(self.dataset), self.cfg.per_device_batch_size, self.cfg.seed, self.epoch,
                                     self.ctx.rank, self.ctx.world_size, start=self.position)
        for batch in self._loader(sampler):
            self.position += 1
            yield batch
            if self.position >= stop:
                return

    def _lockstep(self, have: bool) -> bool:
        flag = torch.tensor([1.0 if have else 0.0])
        if self.ctx.distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _packed_epoch(self) -> Iterator[dict]:
        from internvl.training.packing import pack_samples

        shard = D.rank_shard(len(self.dataset), self.cfg.seed, self.epoch, self.ctx.rank, self.ctx.world_size)
        while True:
            chunk = shard[self.position:self.position + PACK_CHUNK]
            samples = list(self._loader(chunk, samples=True)) if chunk else []
            plan = pack_samples(samples, self.cfg.max_packed_tokens, self.cfg.max_packed_tiles) if samples else []
            for j in range(self.pack_offset, len(plan)):
                if not self._lockstep(True):
                    return
                self.pack_offset = j + 1
                yield self.collate_fn([samples[i] for i in plan[j]])
            if not chunk:
                self._lockstep(False)
                return
            self.position, self.pack_offset = self.position + len(chunk), 0


# ================================================================================================ loss
def weighted_ce_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None):
    """(Σ w·CE, Σ w) over shifted trained positions; w = 1 without packed loss weights (INTERNVL.md §14.2)."""
    shift_labels = labels[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shift_labels,
                                           ignore_index=IGNORE_INDEX, reduction="none")
    trained = (shift_labels != IGNORE_INDEX).float()
    w = trained if weight is None else weight[:, 1:].reshape(-1).float() * trained
    return (w * ce).sum(), w.sum()


def _num_tokens(batch: dict) -> float:
    """Non-padding tokens of a batch (packed rows have no attention_mask; their padding has label weight 0)."""
    if batch.get("attention_mask") is not None:
        return float(batch["attention_mask"].sum())
    return float(batch["input_ids"].numel())


def loss_denominator(batch: dict) -> float:
    labels = batch["labels"][:, 1:]
    trained = labels != IGNORE_INDEX
    if batch.get("loss_weight") is None:
        return float(trained.sum())
    return float((batch["loss_weight"][:, 1:].float() * trained).sum())


# ================================================================================================ checkpoints
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint that has its COMPLETE marker, oldest first. Others are ignored."""
    out = Path(output_dir)
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = CHECKPOINT_RE.match(d.name)
            if m and d.is_dir() and (d / COMPLETE_MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


@dataclass
class TrainState:
    step: int = 0
    total_steps: int = 0
    mpo: MPOState = field(default_factory=MPOState)


def save_checkpoint(out_dir: Path, wrapped: nn.Module, optimizer, scheduler, state: TrainState, stream: BatchStream,
                    cfg: TrainConfig, ctx: D.DistContext) -> Path:
    """Write `out_dir/checkpoint-{step}` atomically: every file goes into a temp dir, COMPLETE last, then rename.

    Collective: every rank calls it (each writes its own RNG and data position).
    """
    from safetensors.torch import save_file

    final = out_dir / f"checkpoint-{state.step}"
    tmp = out_dir / f".checkpoint-{state.step}.partial"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    torch.save(rng_state(), tmp / f"rng_state_{ctx.rank}.pt")
    _write_json(tmp / f"data_state_{ctx.rank}.json", stream.state_dict())
    weights = D.full_model_state_dict(wrapped)  # collective under FSDP
    optim = D.full_optimizer_state_dict(wrapped, optimizer)
    D.barrier()
    if ctx.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json(tmp / "trainer_state.json", {
            "step": state.step, "total_steps": state.total_steps, "world_size": ctx.world_size,
            "num_samples": len(stream.dataset),
            "mpo": state.mpo.state_dict(), "config": cfg.to_dict(), "time": time.time(),
        })
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        (tmp / COMPLETE_MARKER).write_text(f"{state.step}\n", encoding="utf-8")
        _fsync_dir(tmp)
        if final.exists():  # e.g. an incomplete copy with the final name; replaced as a whole
            stale = out_dir / f".checkpoint-{state.step}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(out_dir)
        if cfg.save_total_limit is not None:
            for _, old in complete_checkpoints(out_dir)[:-cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def load_checkpoint(ckpt: Path, wrapped: nn.Module, optimizer, scheduler, state: TrainState, stream: BatchStream,
                    cfg: TrainConfig, ctx: D.DistContext) -> dict:
    """Restore everything `save_checkpoint` wrote. Returns the RNG state to install right before the loop."""
    from safetensors.torch import load_file

    meta = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    if meta["world_size"] != ctx.world_size:
        raise ValueError(f"{ckpt} was written by {meta['world_size']} processes; resume with the same number "
                         f"(got {ctx.world_size}), or the data order would change")
    if meta.get("num_samples", len(stream.dataset)) != len(stream.dataset):
        raise ValueError(f"cannot resume from {ckpt}: it was written for {meta['num_samples']} samples, the data now "
                         f"has {len(stream.dataset)}; the data order would differ")
    saved = meta.get("config", {})
    changed = [k for k in DATA_ORDER_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ValueError(f"cannot resume from {ckpt}: {', '.join(changed)} changed since it was written "
                         f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); the data order would differ")
    D.load_full_model_state_dict(wrapped, load_file(str(ckpt / "model.safetensors")))
    D.load_full_optimizer_state_dict(wrapped, optimizer, torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    state.step = int(meta["step"])
    state.mpo.load_state_dict(meta["mpo"])
    stream.load_state_dict(json.loads((ckpt / f"data_state_{ctx.rank}.json").read_text(encoding="utf-8")))
    return torch.load(ckpt / f"rng_state_{ctx.rank}.pt", weights_only=False)


def _clean_partials(out_dir: Path) -> None:
    for d in out_dir.glob(".checkpoint-*.partial"):
        shutil.rmtree(d, ignore_errors=True)  # a crash mid-save; never a usable checkpoint


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log entries up to the resumed step, so replayed steps are not logged twice."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the interruption
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


# ================================================================================================ final model
def _tokenizer_dir(cfg: TrainConfig) -> Path | None:
    src = cfg.tokenizer or cfg.model
    if src is None:
        return None
    if Path(src).expanduser().is_dir():
        return Path(src).expanduser()
    from internvl.checkpoint.hub import resolve_model_path

    return resolve_model_path(src)


def save_final(wrapped: nn.Module, cfg: TrainConfig, ctx: D.DistContext) -> Path:
    """`output_dir/final`: original layout, LoRA merged (or base + adapter files), tokenizer files, train_config."""
    import yaml

    from internvl.checkpoint.saver import atomic_directory, copy_tokenizer_files, save_pretrained
    from internvl.training.lora import apply_lora, has_lora, lora_state_dict, merge_lora, save_adapter, strip_lora

    out = Path(cfg.output_dir) / FINAL_DIR
    if D.is_fsdp(wrapped):  # gather, then rebuild a plain copy on the main process
        state = D.full_model_state_dict(wrapped)
        model = None
        if ctx.is_main:
            from internvl.api.model import InternVLChatModel

            inner = D.unwrap(wrapped)
            with torch.device("cpu"):
                model = InternVLChatModel(inner.config)
            apply_lora(model, cfg.use_llm_lora, cfg.use_vision_lora, cfg.lora_alpha, cfg.lora_dropout)
            model.load_state_dict(state)
            model.img_context_token_id = inner.img_context_token_id
    else:
        model = D.unwrap(wrapped)
    if ctx.is_main:
        model.eval()
        adapter = lora_state_dict(model) if has_lora(model) and not cfg.merge_lora else None
        if adapter:
            strip_lora(model)
        else:
            merge_lora(model)
        with atomic_directory(out, overwrite=True) as tmp:
            save_pretrained(model, tmp, dtype=cfg.save_dtype, overwrite=True)  # replaces tmp: write it first
            if adapter:
                save_adapter(adapter, tmp, cfg.use_llm_lora, cfg.use_vision_lora, cfg.lora_alpha, cfg.lora_dropout)
            tok = _tokenizer_dir(cfg)
            if tok is not None:
                copy_tokenizer_files(tok, tmp)
            (tmp / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    D.barrier()
    return out


# ================================================================================================ loop
def _no_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce until the last micro-step of the accumulation window."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if D.is_fsdp(wrapped):
        @contextlib.contextmanager
        def fsdp_no_sync():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _progress(step: int, total: int, loss: float, lr: float, tok_per_s: float, elapsed: float, done_here: int) -> str:
    eta = elapsed / max(1, done_here) * (total - step)
    h, rem = divmod(int(eta), 3600)
    return (f"step {step}/{total} | loss {loss:.4f} | lr {lr:.3e} | {tok_per_s:,.0f} tok/s | "
            f"ETA {h}:{rem // 60:02d}:{rem % 60:02d}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    cfg: TrainConfig,
    *,
    dataset: torch.utils.data.Dataset | None = None,
    collate_fn: Callable | None = None,
    on_step_end: Callable[[int, dict], None] | None = None,
) -> Path:
    """Run one training job; returns the final model directory (`output_dir/final`).

    `dataset` / `collate_fn` replace the meta-file dataset (custom data, tests). `on_step_end(step, metrics)` runs
    on every rank after each optimizer step and checkpoint; an exception there stops the run like a crash would.
    """
    from internvl.tokenizer import load_tokenizer

    ctx = D.setup(cfg.device)
    out_dir = Path(cfg.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clean_partials(out_dir)
    D.barrier()
    resume_from = latest_checkpoint(out_dir) if cfg.resume else None
    previous = [p.name for p in (out_dir / FINAL_DIR, out_dir / LOG_FILE) if p.exists()]
    previous += [d.name for _, d in complete_checkpoints(out_dir)]
    if not cfg.resume and previous:  # never overwrite another run's results
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(sorted(previous))}); pass --resume to "
                              "continue it, or use a new output_dir")
    if cfg.resume and resume_from is None and ctx.is_main:
        print(f"no complete checkpoint in {out_dir}; starting from step 0", file=sys.stderr, flush=True)
    D.barrier()

    _seed_everything(cfg.seed)
    tokenizer_src = cfg.tokenizer or cfg.model
    if tokenizer_src is None:
        raise ValueError("`tokenizer` is required when training from `model_config`")
    tokenizer = load_tokenizer(tokenizer_src)
    model = build_model(cfg, tokenizer)
    reference = copy_reference(model).to(ctx.device) if cfg.objective == "mpo" else None
    apply_training_setup(model, cfg)
    model.to(ctx.device)

    if dataset is None:
        dataset, collate_fn = build_dataset(cfg, tokenizer, model.config)
    elif collate_fn is None:
        raise ValueError("pass collate_fn together with dataset")
    skipped = getattr(dataset, "skipped", None)
    if ctx.is_main and skipped is not None and skipped.count:
        print(f"data: skipped {skipped.count} bad annotation lines (skip_bad_records); first: {skipped.errors[0]}",
              file=sys.stderr, flush=True)
    stream = BatchStream(dataset, collate_fn, cfg, ctx)
    if cfg.use_packed_ds:
        total = cfg.max_steps
    else:
        per_epoch = stream.micro_batches_per_epoch() // cfg.grad_accum_steps
        if per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} samples do not fill one optimizer step of {cfg.per_device_batch_size} x "
                f"{ctx.world_size} processes x {cfg.grad_accum_steps} accumulation steps"
            )
        total = cfg.max_steps or cfg.num_epochs * per_epoch

    wrapped = D.wrap_model(model, ctx, cfg.fsdp)
    optimizer = build_optimizer(D.unwrap(wrapped), cfg)
    warmup = cfg.warmup_for(total)
    scheduler = build_scheduler(optimizer, warmup, total)
    state = TrainState(step=0, total_steps=total)
    log_path = out_dir / LOG_FILE
    rng = None
    if resume_from is not None:
        rng = load_checkpoint(resume_from, wrapped, optimizer, scheduler, state, stream, cfg, ctx)
        if ctx.is_main:
            _truncate_log(log_path, state.step)
            print(f"resuming from {resume_from} (step {state.step}/{total})", file=sys.stderr, flush=True)
    elif ctx.is_main and log_path.exists():
        log_path.unlink()  # --resume without a checkpoint: the run starts over, and so does its log
    if rng is not None:
        set_rng_state(rng)  # last, so nothing above consumes random numbers the uninterrupted run did not

    autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if cfg.dtype == "bf16" else None
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    batches = iter(stream)
    start_step, t0, tokens_done = state.step, time.perf_counter(), 0
    wrapped.train()
    log_file = open(log_path, "a", encoding="utf-8") if ctx.is_main else None
    try:
        while state.step < total:
            window = [_to_device(next(batches), ctx.device) for _ in range(cfg.grad_accum_steps)]
            if cfg.objective == "mpo":
                loss_value, extra, tokens = _mpo_step(wrapped, reference, window, state, cfg, autocast)
            else:
                loss_value, extra, tokens = _sft_step(wrapped, window, ctx, autocast)
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            lr = cfg.lr * lr_factor(state.step, warmup, total)  # the schedule; groups scale their own lr by it
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            tokens_done += tokens

            elapsed = time.perf_counter() - t0
            metrics = {"step": state.step, "epoch": stream.epoch, "loss": loss_value, "lr": lr,
                       "grad_norm": grad_norm, "tokens": tokens, "elapsed_s": round(elapsed, 3), **extra}
            if log_file is not None:
                log_file.write(json.dumps(metrics) + "\n")
                log_file.flush()
                if state.step % cfg.log_steps == 0 or state.step == total:
                    line = _progress(state.step, total, loss_value, lr, tokens_done / max(elapsed, 1e-9), elapsed,
                                     state.step - start_step)
                    print(line, file=sys.stderr, flush=True)
            if cfg.save_steps and (state.step % cfg.save_steps == 0 or state.step == total):
                save_checkpoint(out_dir, wrapped, optimizer, scheduler, state, stream, cfg, ctx)
            if on_step_end is not None:
                on_step_end(state.step, metrics)
    finally:
        if log_file is not None:
            log_file.close()
    failures = getattr(dataset, "counters", {})
    if ctx.is_main and failures:
        print(f"data: {dict(failures)}", file=sys.stderr, flush=True)
    return save_final(wrapped, cfg, ctx)


def _sft_step(wrapped, window: list[dict], ctx: D.DistContext, autocast) -> tuple[float, dict, int]:
    """Forward/backward over one accumulation window with the step-global token normalisation."""
    counts = torch.tensor([sum(loss_denominator(b) for b in window),
                           sum(_num_tokens(b) for b in window)], dtype=torch.float64)
    D.all_reduce_sum(counts)
    denom = max(float(counts[0]), 1e-12)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(window):
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
        with _no_sync(wrapped, sync=i == len(window) - 1):  # FSDP reads the flag in backward: keep it inside
            with (autocast or contextlib.nullcontext)():
                logits = wrapped(**inputs).logits
            ce_sum, _ = weighted_ce_sum(logits, batch["labels"], batch.get("loss_weight"))
            # x world size: DDP/FSDP average gradients over ranks; this undoes it, so the sum over ranks is the loss
            (ce_sum * (ctx.world_size / denom)).backward()
        loss_sum += ce_sum.detach().double().cpu()
    D.all_reduce_sum(loss_sum)
    return float(loss_sum) / denom, {"trained_tokens": float(counts[0])}, int(counts[1])


def _mpo_step(wrapped, reference, window: list[dict], state: TrainState, cfg: TrainConfig,
              autocast) -> tuple[float, dict, int]:
    total, sums = 0.0, {}
    tokens = torch.tensor([sum(_num_tokens(b) for b in window)], dtype=torch.float64)
    for i, batch in enumerate(window):
        with _no_sync(wrapped, sync=i == len(window) - 1):
            loss, metrics = mpo_forward(wrapped, reference, batch, state.mpo, cfg.mpo_beta, cfg.mpo_preference_weight,
                                        cfg.mpo_quality_weight, cfg.mpo_generation_weight, autocast)
            (loss / len(window)).backward()
        total += float(loss.detach()) / len(window)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / len(window)
    reduced = torch.tensor([total], dtype=torch.float64)
    D.all_reduce_sum(reduced)
    D.all_reduce_sum(tokens)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    sums["delta"] = state.mpo.mean
    return float(reduced) / world, sums, int(tokens)


# ================================================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    """`internvl train CONFIG.yaml [--key value ...] [--resume]`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="internvl train",
        description="Fine-tune an InternVL model. Every key of the YAML config can be overridden as --key value "
                    "(see docs/TRAINING.md).",
        allow_abbrev=False,  # --res must not silently mean --resume
    )
    parser.add_argument("config", nargs="?", help="YAML file of training keys")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.resume:
            overrides["resume"] = True
        cfg = load_train_config(args.config, overrides)
        final = train(cfg)
    except KeyboardInterrupt:
        print("internvl train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, OSError) as e:
        print(f"internvl train: error: {e}", file=sys.stderr)
        return 2
    if D.is_main_process():
        print(f"final model written to {final}", file=sys.stderr)
    return 0


__all__ = [
    "train", "main", "build_model", "apply_training_setup", "build_optimizer", "build_scheduler", "lr_factor",
    "build_dataset", "BatchStream", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
    "complete_checkpoints", "save_final", "weighted_ce_sum", "init_weights_",
]
