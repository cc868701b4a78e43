"""What both reference decoders (`generate`, `beam_search`) do to their inputs before the prefill."""

from __future__ import annotations

import torch

from internvl.generation.sampling import GenerationConfig
from internvl.model.internvl import InternVLModel


def prepare_inputs(model: InternVLModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   pixel_values: torch.Tensor | None):
    """-> (device, input_ids, attention_mask, pixel_values) on the LM head's device; a missing mask is all ones and
    pixel values take the ViT's dtype."""
    device = model.language_model.lm_head.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=model.vision_model.embeddings.patch_embedding.weight.dtype)
    return device, input_ids, attention_mask, pixel_values


def pad_token_id(cfg: GenerationConfig) -> int:
    """The id finished rows are padded with: `pad_token_id`, else the first eos id, else 0."""
    return cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id[0] if cfg.eos_token_id else 0)
