"""InternVL = InternViT -> pixel shuffle -> mlp1 -> splice into the LLM's input embeddings -> decoder.

Spec: INTERNVL.md §2, §8.3. Parameter names equal the original checkpoint's for `vision_model.*` and `mlp1.*`; the
LLM uses one Llama-style layout (see `internvl.model.llm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from internvl.config import InternVLConfig
from internvl.model.llm import CausalLM, KVCache
from internvl.model.projector import make_mlp1, pixel_shuffle
from internvl.model.vision import InternVisionModel

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None  # (B, L, V)
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, L, D) final-norm output
    past_key_values: KVCache | None = None


class InternVLModel(nn.Module):
    """The network. The model-card API (`chat`, `from_pretrained`, ...) lives on `InternVLChatModel`."""

    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = make_mlp1(config.vision.hidden_size, config.llm.hidden_size, config.downsample_ratio)
        self.language_model = CausalLM(config.llm)
        self.img_context_token_id: int | None = config.image_token_id

    # ------------------------------------------------------------------------------------------ vision
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) -> (T, N, D) with N = num_image_token (256 for 448 tiles)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (tiles, 3, H, W), got {tuple(pixel_values.shape)}")
        h = self.vision_model(pixel_values, self.config.select_layer)[:, 1:]  # drop CLS: (T, g*g, C)
        t, n, c = h.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"{n} patch tokens do not form a square grid")
        h = pixel_shuffle(h.reshape(t, g, g, c), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(h.reshape(t, -1, h.shape[-1]))  # (T, N, D)

    # ------------------------------------------------------------------------------------------ splice
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every <IMG_CONTEXT> row overwritten, in order, by the vision features (§8.3)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, D)
        if visual_features is None and pixel_values is not None:
            visual_features = self.extract_feature(pixel_values)
        if visual_features is None:
            return embeds
        if self.img_context_token_id is None:
            raise ValueError("img_context_token_id is not set; it comes from the tokenizer's <IMG_CONTEXT> token")
        slots = input_ids == self.img_context_token_id
        feats = visual_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        n_slots = int(slots.sum())
        if n_slots != feats.shape[0]:
            raise ValueError(
                f"prompt has {n_slots} <IMG_CONTEXT> slots but the images produced {feats.shape[0]} feature rows "
                f"({visual_features.shape[0]} tiles x {self.config.num_image_token}); the number of <image> "
                "placeholders or num_patches_list does not match pixel_values"
            )
        embeds = embeds.clone()
        embeds[slots] = feats
        return embeds

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Training-style forward (MIC `forward`): logits for every position, loss when labels are given.

        image_flags (T,): tiles with flag 0 (dummy tiles of text-only samples) run through the ViT but are dropped.
        loss_weight (B, L): per-token weights for packed training (§14.2); None = mean over trained tokens.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            feats = None
            if pixel_values is not None:
                feats = self.extract_feature(pixel_values)
                if image_flags is not None:
                    feats = feats[image_flags.reshape(-1).bool()]
            inputs_embeds = self.embed(input_ids, visual_features=feats)
        cache = past_key_values if past_key_values is not None else (
            KVCache(self.config.llm.num_layers) if use_cache else None
        )
        hidden = self.language_model(inputs_embeds, position_ids, attention_mask, cache, mask)
        logits = self.language_model.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, loss_weight)
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden, past_key_values=cache)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Shifted cross-entropy; with `weight`, sum(w * CE) / sum(w) over trained positions (§14.2)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    trained = shift_labels != IGNORE_INDEX
    if weight is None:
        return ce.sum() / trained.sum().clamp(min=1)
    w = weight[:, 1:].reshape(-1).float() * trained
    return (w * ce).sum() / w.sum().clamp(min=1e-12)
