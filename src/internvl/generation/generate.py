"""The plain, readable reference `generate` (INTERNVL.md §8.3): the oracle the fast engine is tested against.

Embeds the prompt (vision features spliced in), prefills once with a growing KV cache, then decodes one token at
a time for the whole batch. Like the reference, it returns only the new tokens; rows that finished early are
padded with `pad_token_id` (the first eos id when none is given).
"""

from __future__ import annotations

import torch

from internvl.generation.beam_search import beam_search
from internvl.generation.inputs import pad_token_id, prepare_inputs
from internvl.generation.sampling import GenerationConfig, next_tokens
from internvl.model.internvl import InternVLModel
from internvl.model.llm import KVCache


@torch.inference_mode()
def generate(
    model: InternVLModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    visual_features: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    streamer=None,
) -> torch.Tensor:
    """input_ids (B, L) left-padded -> new token ids (B, n <= max_new_tokens). num_beams > 1: `beam_search`."""
    cfg = config or GenerationConfig()
    if cfg.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, pixel_values, visual_features, cfg, streamer)
    device, input_ids, attention_mask, pixel_values = prepare_inputs(model, input_ids, attention_mask, pixel_values)
    b = input_ids.shape[0]
    if streamer is not None and b != 1:
        raise ValueError(f"streaming supports one sequence at a time, got a batch of {b}")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    pad = pad_token_id(cfg)
    eos = torch.tensor(cfg.eos_token_id or [-1], device=device)

    embeds = model.embed(input_ids, pixel_values=pixel_values, visual_features=visual_features)
    cache = KVCache(model.config.llm.num_layers)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(out.cpu())  # transformers streams the (here empty) prompt first; skip_prompt drops it
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    mask = attention_mask
    hidden = model.language_model(embeds, attention_mask=mask, cache=cache)
    for step in range(cfg.max_new_tokens):
        logits = model.language_model.lm_head(hidden[:, -1])  # (B, V)
        tok = next_tokens(logits, out, cfg, step, generator)
        tok = torch.where(unfinished, tok, torch.full_like(tok, pad))
        out = torch.cat([out, tok[:, None]], dim=1)
        if streamer is not None:
            streamer.put(tok.cpu())
        unfinished &= ~torch.isin(tok, eos)
        if not bool(unfinished.any()) or step + 1 == cfg.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        step_embeds = model.language_model.get_input_embeddings()(tok[:, None])
        hidden = model.language_model(step_embeds, attention_mask=mask, cache=cache)
    if streamer is not None:
        streamer.end()
    return out
