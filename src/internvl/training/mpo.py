"""MPO (Mixed Preference Optimization): preference data, sequence log-probabilities and the mixed loss.

Spec: INTERNVL.md §16. Reference: `internvl_chat/internvl/train/internvl_chat_mpo.py`, `trainer_dpo.py` (on trl 0.10.1).

    L = w_p · L_DPO + w_q · L_BCO + α · L_SFT        (per example, averaged over the batch)
    L_DPO = −log σ(β·[(π_c − π_r) − (ρ_c − ρ_r)])
    L_BCO = −log σ(β·(π_c − ρ_c) − δ) − log σ(−(β·(π_r − ρ_r) − δ))
    L_SFT = token-mean cross-entropy on the chosen responses

π, ρ are SUMS of response-token log-probabilities under the policy and the frozen reference copy. δ is a running
mean (over steps and processes) of the batch mean of the concatenated rewards [β(π_c − ρ_c), β(π_r − ρ_r)], updated
with the current batch before it is used. Defaults: β 0.1, w_p 0.8, w_q 0.2, α 1.

Data: JSONL lines `{"image": path | [paths] (optional), "question": str, "chosen": str, "rejected": str}`, listed in a
meta JSON like SFT data (INTERNVL.md §12.1: `root`, `annotation`, optional `max_dynamic_patch`, `repeat_time`).
`'<image>\\n'` is prepended to the question when absent (single image); chosen and rejected are each tokenized as a
two-turn conversation with the template's label rules (`internvl.training.labels`). A batch is chosen rows first,
then rejected rows, and `pixel_values` holds the images twice (once per half). Video preference samples are not
supported yet.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from internvl.model.internvl import IGNORE_INDEX
from internvl.templates.tokens import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

MAX_REPLACEMENTS = 10  # attempts to replace an unreadable record (INTERNVL.md §12.5)


# ------------------------------------------------------------------------------------------------ loss
@dataclass
class MPOState:
    """Running mean of the reward batch means (trl's RunningMoments, mean only). Saved in training checkpoints."""

    mean: float = 0.0
    count: float = 0.0

    def update(self, value: float, n: float = 1.0) -> float:
        """Fold in `n` observations whose mean is `value`; returns the new mean."""
        total = self.count + n
        self.mean += (value - self.mean) * n / total
        self.count = total
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.count = float(d["mean"]), float(d["count"])


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_sft_loss: torch.Tensor,
    state: MPOState,
    beta: float = 0.1,
    w_p: float = 0.8,
    w_q: float = 0.2,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mixed loss (scalar) and metrics. Log-prob inputs are (B,) sums over response tokens; `state` is updated.

    In a process group, δ's update uses the mean of every rank's batch mean (count = world size), as trl does.
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    dpo = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))  # label smoothing 0

    chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
    batch_mean = torch.cat([chosen_rewards, rejected_rewards]).mean().detach().double()
    n = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(batch_mean, op=dist.ReduceOp.SUM)
        n = dist.get_world_size()
        batch_mean = batch_mean / n
    delta = state.update(float(batch_mean), n)  # updated before use (§16)
    bco = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))

    loss = (w_p * dpo + w_q * bco).mean() + alpha * chosen_sft_loss
    with torch.no_grad():
        metrics = {
            "dpo": float(dpo.mean()),
            "bco": float(bco.mean()),
            "sft": float(chosen_sft_loss),
            "delta": delta,
            "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
            "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        }
    return loss, metrics


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L, V), (B, L) -> (B,) sum of log p(label_t | prefix) over trained (non-IGNORE) shifted positions."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    trained = labels != IGNORE_INDEX
    safe = labels.masked_fill(~trained, 0)
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    return (token_logps * trained).sum(-1)


def token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy averaged over every trained token of the batch (trl's NLL term)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def mpo_forward(policy, reference, batch: dict, state: MPOState, beta: float = 0.1, w_p: float = 0.8,
                w_q: float = 0.2, alpha: float = 1.0, autocast=None) -> tuple[torch.Tensor, dict[str, float]]:
    """One MPO micro-batch: policy and reference forwards on the chosen+rejected batch, then `mpo_loss`.

    `batch` comes from `collate_preference` (chosen rows first). `autocast` is a context-manager factory or None.
    """
    import contextlib

    ctx = autocast or contextlib.nullcontext
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "position_ids", "image_flags")}
    labels = batch["labels"]
    b = labels.shape[0] // 2
    with ctx():
        logits = policy(**inputs).logits  # (2B, L, V)
    with torch.no_grad(), ctx():
        ref_logits = reference(**inputs).logits
    logps = sequence_logps(logits, labels)
    ref_logps = sequence_logps(ref_logits, labels)
    sft = token_mean_ce(logits[:b], labels[:b])
    return mpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], sft, state, beta, w_p, w_q, alpha)


# ------------------------------------------------------------------------------------------------ data
def _read_records(meta_path: str | Path) -> list[dict]:
    """Every kept annotation line of every dataset of the meta file (SFT's meta format, `data.load_meta`)."""
    from internvl.training.data import load_meta

    entries = []
    for spec in load_meta(meta_path):
        lines = [(k, ln) for k, ln in enumerate(Path(spec.annotation).read_text(encoding="utf-8").splitlines(), 1)
                 if ln.strip()]
        if spec.repeat_time < 1:
            lines = lines[: int(len(lines) * spec.repeat_time)]
        lines = lines * int(max(1, spec.repeat_time))
        for number, line in lines:
            entries.append({"file": spec.annotation, "line": number, "raw": line, "root": spec.root,
                            "max_dynamic_patch": spec.max_dynamic_patch})
    return entries


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs for MPO. `cfg` carries template, num_image_token, image_size, min_dynamic_patch,
    max_dynamic_patch, use_thumbnail, max_seq_length and seed (the SFT `DataConfig` has them all).

    Items: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels (1-D long), pixel_values (T, 3, S, S),
    image_flags (T,). Text-only pairs carry one white dummy tile with image_flags 0 (INTERNVL.md §12.3).
    """

    def __init__(self, meta_path: str | Path, tokenizer, cfg, skip_bad_records: bool = False):
        self.records = _read_records(meta_path)
        if not self.records:
            raise ValueError(f"{meta_path} lists no preference records")
        self.tokenizer, self.cfg, self.skip_bad_records = tokenizer, cfg, skip_bad_records
        self.epoch = 0
        self.replacements = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        if not self.skip_bad_records:
            return self._load(index)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, index, 3])  # replacement stream, as in data.py
        first_error = None
        for _ in range(MAX_REPLACEMENTS + 1):
            try:
                return self._load(index)
            except (ValueError, OSError, KeyError) as e:  # unreadable image, bad JSON, cut image block, ...
                first_error = first_error or e
                self.replacements += 1
                logger.warning("skipping preference record %s: %s", self._where(index), e)
                index = int(rng.integers(len(self.records)))
        raise ValueError(f"{MAX_REPLACEMENTS} replacement records failed in a row; first error: {first_error}")

    def _where(self, index: int) -> str:
        r = self.records[index]
        return f"{r['file']}:{r['line']}"

    def _load(self, index: int) -> dict:
        from internvl.training.labels import tokenize_conversation

        r = self.records[index]
        try:
            rec = json.loads(r["raw"])
        except json.JSONDecodeError as e:
            raise ValueError(f"{self._where(index)} is not valid JSON: {e}") from None
        for key in ("question", "chosen", "rejected"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{self._where(index)}: preference records need a string {key!r}")
        if "video" in rec:
            raise ValueError(f"{self._where(index)}: video preference records are not supported yet")
        images = rec.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else list(images)
        question = rec["question"]
        if len(images) == 1 and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question  # §16
        cfg = self.cfg
        max_tiles = r["max_dynamic_patch"] or cfg.max_dynamic_patch
        if len(images) > 1:
            max_tiles = max(1, max_tiles // len(images))  # §12.3 multi-image budget
        tiles, counts = [], []
        for path in images:
            t = self._tiles(Path(r["root"]) / path, max_tiles)
            tiles.append(t)
            counts.append(t.shape[0])
        if tiles:
            pixel_values = torch.cat(tiles)
            flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
        else:
            pixel_values = self._dummy_tile()
            flags = torch.zeros(1, dtype=torch.long)
        out = {"pixel_values": pixel_values, "image_flags": flags}
        for side in ("chosen", "rejected"):
            conv = [{"from": "human", "value": question}, {"from": "gpt", "value": rec[side]}]
            ids, labels = tokenize_conversation(conv, self.tokenizer, cfg.template,
                                                [n * cfg.num_image_token for n in counts], cfg.max_seq_length)
            out[f"{side}_input_ids"] = torch.tensor(ids, dtype=torch.long)
            out[f"{side}_labels"] = torch.tensor(labels, dtype=torch.long)
        return out

    def _tiles(self, path: Path, max_tiles: int) -> torch.Tensor:
        from internvl.preprocessing.image import dynamic_preprocess, open_image, to_tensor

        # EXIF is not applied in training (the reference opens images with plain PIL, INTERNVL.md §20 item 17)
        image = open_image(path, exif_transpose=False)
        tiles = dynamic_preprocess(image, min_num=min(self.cfg.min_dynamic_patch, max_tiles), max_num=max_tiles,
                                   image_size=self.cfg.image_size, use_thumbnail=self.cfg.use_thumbnail)
        return to_tensor(tiles, image_size=self.cfg.image_size)

    def _dummy_tile(self) -> torch.Tensor:
        from internvl.preprocessing.image import to_tensor

        return to_tensor([Image.new("RGB", (224, 224), (255, 255, 255))], image_size=self.cfg.image_size)


def collate_preference(batch: list[dict], pad_token_id: int) -> dict:
    """B pairs -> a (2B, L) batch: rows 0..B-1 chosen, B..2B-1 rejected, right-padded; images repeated per half.

    attention_mask comes from the lengths (not `ids != 0`, INTERNVL.md §13.5); position_ids = cumsum(mask) - 1
    with padding at 1 (§12.3).
    """
    seqs = [item["chosen_input_ids"] for item in batch] + [item["rejected_input_ids"] for item in batch]
    labs = [item["chosen_labels"] for item in batch] + [item["rejected_labels"] for item in batch]
    length = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = s
        labels[i, : len(lab)] = lab
        attention_mask[i, : len(s)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    pixel_values = torch.cat([item["pixel_values"] for item in batch])
    image_flags = torch.cat([item["image_flags"] for item in batch])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pixel_values": torch.cat([pixel_values, pixel_values]),
        "image_flags": torch.cat([image_flags, image_flags]),
    }


def copy_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode deep copy of `model` (the DPO reference)."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


__all__ = [
    "MPOState", "mpo_loss", "sequence_logps", "token_mean_ce", "mpo_forward", "PreferenceDataset",
    "collate_preference", "copy_reference",
]
