"""Dense pre-training of the demo model's InternViT on synthetic scenes, before `internvl train` fine-tunes it all.

Why: InternVL never learns its vision encoder from scratch inside the VLM; InternViT arrives pre-trained
(contrastive image-text training) and the VLM stages start from it. The demo model has no such encoder. Trained from
scratch inside the VLM, its vision path learns far too slowly for a CPU budget: with four objects in the image,
"What color is the triangle?" stayed at 34% after 600 steps of batch 16 (chance 17%), while with one object the same
model reached 80-87% in 150 steps, i.e. the ViT had not learned to tell shapes apart. So the demo build first trains
the ViT alone on labels read off the scene description, its stand-in for InternViT's pre-training: for every 14 px
patch, the colour and the shape of the object covering most of it, the letter whose ink it holds, and the box of that
object. The linear head that reads those labels is thrown away; the ViT weights go into the checkpoint that
`internvl train` starts from.

    vit_state = pretrain_vision(model.vision_model, VisionPretrainConfig(steps=400))
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from internvl.demo.scenes import COLORS, LETTERS, SHAPES, Scene, _font, draw_object, make_scene, render

MIN_OBJECT_COVER = 0.2  # a patch is labelled with an object that covers at least this fraction of it
MIN_LETTER_INK = 8  # ... and with a letter that has at least this many ink pixels in it
BOX_LOSS_WEIGHT = 5.0
# label layout of the head's output: colour (none + 6), shape (none + 4), letter (none + 23), box (4 numbers)
HEADS = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "letter": 1 + len(LETTERS), "box": 4}


@dataclass(frozen=True)
class VisionPretrainConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.05
    seed: int = 0
    log_steps: int = 50


# ------------------------------------------------------------------------------------------------ labels
def _letter_map(scene: Scene) -> np.ndarray:
    """(H, W) int: 1 + index into LETTERS of the character whose ink covers each pixel, 0 elsewhere.

    The word is drawn once (as `render` draws it) and its ink split between characters by their advance widths:
    with the "mm" anchor, the text starts getlength(word) / 2 left of the anchor."""
    out = np.zeros((scene.height, scene.width), dtype=np.int64)
    if not scene.word:
        return out
    ink = Image.new("L", (scene.width, scene.height), 0)
    font = _font(scene.word_font_size)
    ImageDraw.Draw(ink).text(scene.word_center, scene.word, fill=255, font=font, anchor="mm")
    start = scene.word_center[0] - font.getlength(scene.word) / 2
    edges = np.array([start + font.getlength(scene.word[:k]) for k in range(1, len(scene.word))])
    char_of_column = np.searchsorted(edges, np.arange(scene.width) + 0.5)  # (W,) index of the character
    letters = np.array([1 + LETTERS.index(c) for c in scene.word])
    mask = np.asarray(ink) > 127
    out[mask] = letters[np.broadcast_to(char_of_column, mask.shape)[mask]]
    return out


def patch_labels(scene: Scene, patch: int = 14) -> dict[str, np.ndarray]:
    """Per-patch targets of a scene on its (H/patch, W/patch) grid, row-major like the ViT's patch tokens.

    color, shape, letter: (g, g) int64 class ids, 0 = none; box: (g, g, 4) float32, the covering object's box
    as fractions of the image size (meaningful where color > 0)."""
    ids = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(ids)
    for i, obj in enumerate(scene.objects):
        draw_object(draw, obj, i + 1)
    gh, gw = scene.height // patch, scene.width // patch

    def per_patch(a: np.ndarray, classes: int) -> np.ndarray:  # (H, W) ids -> (gh, gw, classes) pixel counts
        blocks = a[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3).reshape(gh, gw, -1)
        return np.stack([(blocks == c).sum(-1) for c in range(classes)], axis=-1)

    n = len(scene.objects)
    cover = per_patch(np.asarray(ids, dtype=np.int64), n + 1)[..., 1:]  # (gh, gw, n)
    best = cover.argmax(-1) if n else np.zeros((gh, gw), dtype=np.int64)
    has = (cover.max(-1) >= MIN_OBJECT_COVER * patch * patch) if n else np.zeros((gh, gw), dtype=bool)
    color = np.zeros((gh, gw), dtype=np.int64)
    shape = np.zeros((gh, gw), dtype=np.int64)
    box = np.zeros((gh, gw, 4), dtype=np.float32)
    size = np.array([scene.width, scene.height, scene.width, scene.height], dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        sel = has & (best == i)
        color[sel] = 1 + COLORS.index(obj.color)
        shape[sel] = 1 + SHAPES.index(obj.shape)
        box[sel] = np.array(obj.bbox, dtype=np.float32) / size
    ink = per_patch(_letter_map(scene), 1 + len(LETTERS))[..., 1:]  # (gh, gw, 23)
    letter = np.where(ink.max(-1) >= MIN_LETTER_INK, ink.argmax(-1) + 1, 0)
    return {"color": color, "shape": shape, "letter": letter, "box": box}


def make_batch(rng: random.Random, n: int, image_size: int, patch: int,
               word_prob: float = 0.9) -> tuple[torch.Tensor, dict]:
    """n fresh scenes -> pixel values (n, 3, S, S) normalized as the model's preprocessing, and stacked labels.

    Words are drawn in most scenes (the SFT data has them in 45%): letters are the slowest patch labels to learn."""
    from internvl.preprocessing.image import to_tensor

    scenes = [make_scene(rng, word_prob=word_prob) for _ in range(n)]
    images = [render(s) for s in scenes]
    if images[0].size != (image_size, image_size):
        images = [im.resize((image_size, image_size), Image.BICUBIC) for im in images]
    labels = [patch_labels(s, patch * s.width // image_size) for s in scenes]
    stacked = {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in HEADS}
    return to_tensor(images, image_size), stacked


# ------------------------------------------------------------------------------------------------ training
@torch.no_grad()
def init_sincos_positions_(vision_model: nn.Module, scale: float = 0.5) -> None:
    """Patch position embeddings := 2-D sine-cosine of (row, column), as MAE initialises a from-scratch ViT; the
    class position stays as it is. Half the channels encode the row, half the column, each with frequencies
    1 / 10000^(i / (C/4)). A learned parameter still: this only gives attention a notion of neighbourhood to start
    from, which a ViT otherwise has to discover (slowly) from N(0, 0.02) noise."""
    pos = vision_model.embeddings.position_embedding  # (1, 1 + g*g, C)
    c, g = pos.shape[-1], vision_model.embeddings.grid
    quarter = c // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (C/4,)
    rows, cols = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):  # row-major patch order, like the patch tokens
        angle = coord[:, None] * freq[None]  # (g*g, C/4)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=-1)  # (g*g, 4 * C/4)
    pos[0, 1:, : table.shape[1]] = (scale * table).to(pos.dtype)


def dense_loss(logits: torch.Tensor, labels: dict) -> tuple[torch.Tensor, dict]:
    """logits (B, g*g, sum(HEADS)); labels from `make_batch`.

    colour: CE over every patch (its class 0 is "no object": the objectness signal); shape: CE over object patches
    only; letter: CE over every patch, the ink patches weighted like all others together (they are ~3% of patches,
    and "none" would otherwise win); box: L1 over object patches."""
    parts = dict(zip(HEADS, logits.split(list(HEADS.values()), dim=-1)))
    flat = {k: labels[k].reshape(-1) for k in ("color", "shape", "letter")}
    on_object = flat["color"] > 0
    losses = {"color": F.cross_entropy(parts["color"].reshape(-1, HEADS["color"]), flat["color"])}
    shape_logits = parts["shape"].reshape(-1, HEADS["shape"])[on_object]
    losses["shape"] = F.cross_entropy(shape_logits, flat["shape"][on_object]) if len(shape_logits) else logits.sum() * 0
    letter_ce = F.cross_entropy(parts["letter"].reshape(-1, HEADS["letter"]), flat["letter"], reduction="none")
    inked = flat["letter"] > 0
    losses["letter"] = letter_ce[~inked].mean() + (letter_ce[inked].mean() if inked.any() else 0.0)
    pred_box = parts["box"].reshape(-1, 4)[on_object]
    losses["box"] = F.l1_loss(pred_box, labels["box"].reshape(-1, 4)[on_object]) if len(pred_box) else logits.sum() * 0
    total = sum(losses.values()) + (BOX_LOSS_WEIGHT - 1) * losses["box"]
    return total, {k: float(v.detach()) for k, v in losses.items()}


def pretrain_vision(vision_model: nn.Module, cfg: VisionPretrainConfig = VisionPretrainConfig(),
                    log=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """Train `vision_model` (an InternVisionModel, in place) on per-patch scene labels; returns a summary: the last
    losses, the per-patch accuracies on a held-out batch, and the label head (`head`, not part of the model)."""
    torch.manual_seed(cfg.seed)
    vcfg = vision_model.config
    init_sincos_positions_(vision_model)
    head = nn.Linear(vcfg.hidden_size, sum(HEADS.values()))
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    params = [p for p in vision_model.parameters() if p.requires_grad] + list(head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def forward(px: torch.Tensor) -> torch.Tensor:
        return head(vision_model(px)[:, 1:])  # patch tokens only, CLS dropped as InternVL drops it

    rng = random.Random(f"internvl-demo/{cfg.seed}/vision-pretrain")
    vision_model.train()
    start, parts = time.perf_counter(), {}
    for step in range(cfg.steps):
        px, labels = make_batch(rng, cfg.batch_size, vcfg.image_size, vcfg.patch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, parts = dense_loss(forward(px), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_steps == 0 or step + 1 == cfg.steps:
            log(f"vision pre-training step {step + 1}/{cfg.steps} | loss {float(loss.detach()):.4f} | "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f" | {time.perf_counter() - start:.0f} s")
    vision_model.eval()
    with torch.no_grad():  # per-patch accuracy on fresh scenes, on the patches that carry a label
        px, labels = make_batch(random.Random(f"internvl-demo/{cfg.seed}/vision-pretrain-eval"), 64,
                                vcfg.image_size, vcfg.patch_size)
        out = dict(zip(HEADS, forward(px).split(list(HEADS.values()), dim=-1)))  # (B, g*g, classes)
        labels = {k: v.flatten(1, 2) for k, v in labels.items()}  # (B, g, g, ...) -> (B, g*g, ...)
        acc = {}
        for name in ("color", "shape", "letter"):
            sel = labels[name] > 0
            acc[name] = float((out[name].argmax(-1)[sel] == labels[name][sel]).float().mean()) if sel.any() else 0.0
        on_object = labels["color"] > 0
        acc["box_l1_px"] = float((out["box"][on_object] - labels["box"][on_object]).abs().mean() * vcfg.image_size)
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": round(time.perf_counter() - start, 1),
            "last_losses": parts, "held_out": acc, "head": head}
