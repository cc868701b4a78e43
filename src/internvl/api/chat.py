"""`chat()` and `batch_chat()` with the model-card semantics (INTERNVL.md §8.1, §8.4).

Differences from the reference, each deliberate: too few `<image>` placeholders raise a ValueError that names both
counts (the reference fails deep inside `generate`); `batch_chat` accepts `history` (one history per question); the
decoded answer keeps `<ref>`/`<box>` tags whichever tokenizer class is used (§8.6).
"""

from __future__ import annotations

import torch

from internvl.generation.generate import generate
from internvl.generation.sampling import GenerationConfig
from internvl.templates.conversation import build_batch_prompts, build_chat_prompt, get_template
from internvl.templates.tokens import IMG_CONTEXT_TOKEN
from internvl.tokenizer import decode_keep_grounding, eos_id_for_template, image_context_id


def _prepare(model, tokenizer, generation_config):
    template = get_template(model.config.template)
    model.img_context_token_id = image_context_id(tokenizer)
    eos = eos_id_for_template(tokenizer, template)
    if generation_config is None:
        generation_config = {}
    if isinstance(generation_config, dict):
        # the reference writes eos into the caller's dict (§8.1 step 9); model-card code relies on nothing else
        generation_config["eos_token_id"] = eos
        streamer = generation_config.get("streamer")
    else:
        streamer = None
    cfg = GenerationConfig.from_any(generation_config, eos_token_id=eos)
    if cfg.pad_token_id is None and tokenizer.pad_token_id is not None:
        cfg = GenerationConfig.from_any(cfg, pad_token_id=tokenizer.pad_token_id)
    return template, cfg, streamer


def _check_patches(pixel_values, num_patches_list) -> list[int]:
    if pixel_values is None:
        if num_patches_list:
            raise ValueError(f"num_patches_list={list(num_patches_list)} was given without pixel_values")
        return []
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must have shape (tiles, 3, H, W), got {tuple(pixel_values.shape)}")
    patches = [pixel_values.shape[0]] if num_patches_list is None else [int(n) for n in num_patches_list]
    if sum(patches) != pixel_values.shape[0]:
        raise ValueError(
            f"num_patches_list {patches} sums to {sum(patches)} tiles but pixel_values has {pixel_values.shape[0]}"
        )
    return patches


def _finish(tokenizer, template, ids: list[int], eos: int) -> str:
    """Text before the end of turn (§8.1 step 10). Cutting the ids first also holds when the tokenizer class
    would decode `<|im_end|>` to nothing (so a text split could not find it)."""
    if eos in ids:
        ids = ids[: ids.index(eos)]
    text = decode_keep_grounding(tokenizer, ids)
    return text.split(template.end_of_turn)[0].strip()


def chat(
    model,
    tokenizer,
    pixel_values: torch.Tensor | None,
    question: str,
    generation_config=None,
    history: list | None = None,
    return_history: bool = False,
    num_patches_list: list[int] | None = None,
    verbose: bool = False,
):
    """One turn. pixel_values (T, 3, S, S) are all images' tiles in prompt order; see the module docstring."""
    patches = _check_patches(pixel_values, num_patches_list)
    template, cfg, streamer = _prepare(model, tokenizer, generation_config)
    prompt, stored_question = build_chat_prompt(
        model.config.template,
        question,
        history=history,
        system_message=model.system_message,
        num_patches_list=patches,
        num_image_token=model.config.num_image_token,
        has_pixels=pixel_values is not None,
    )
    if verbose and pixel_values is not None:
        print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
    enc = tokenizer(prompt, return_tensors="pt")
    out = generate(model, enc["input_ids"], enc.get("attention_mask"), pixel_values=pixel_values, config=cfg,
                   streamer=streamer)
    response = _finish(tokenizer, template, out[0].tolist(), cfg.eos_token_id[0])
    new_history = list(history or []) + [(stored_question, response)]
    if verbose:
        print(prompt.replace(IMG_CONTEXT_TOKEN * model.config.num_image_token, "<IMG_CONTEXT>x{n}"), response)
    return (response, new_history) if return_history else response


def batch_chat(
    model,
    tokenizer,
    pixel_values: torch.Tensor | None,
    questions: list[str],
    generation_config=None,
    num_patches_list: list[int] | None = None,
    history=None,
    return_history: bool = False,
    verbose: bool = False,
    image_counts: list[int] | None = None,
):
    """Several independent questions, one image each (`num_patches_list[i]` tiles), answered as one batch."""
    if image_counts is not None:  # deprecated alias in the reference
        num_patches_list = image_counts
    if history is not None or return_history:
        raise ValueError("batch_chat does not take history (as the reference); call chat() per conversation")
    if pixel_values is not None and num_patches_list is None:
        raise ValueError("batch_chat with pixel_values needs num_patches_list: the tile count of each question's image")
    patches = _check_patches(pixel_values, num_patches_list) if pixel_values is not None else None
    template, cfg, _ = _prepare(model, tokenizer, generation_config)
    prompts = build_batch_prompts(
        model.config.template,
        questions,
        num_patches_list=patches,
        system_message=model.system_message,
        num_image_token=model.config.num_image_token,
        has_pixels=pixel_values is not None,
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side  # unlike the reference, leave the caller's tokenizer as it was
    out = generate(model, enc["input_ids"], enc["attention_mask"], pixel_values=pixel_values, config=cfg)
    responses = [_finish(tokenizer, template, row.tolist(), cfg.eos_token_id[0]) for row in out]
    if verbose:
        for q, r in zip(questions, responses):
            print(q, r)
    return responses
