"""`chat()` and `batch_chat()` with the model-card semantics (INTERNVL.md §8.1, §8.4).

Differences from the reference, each deliberate: too few `<image>` placeholders raise a ValueError that names both
counts (the reference fails deep inside `generate`); `batch_chat` accepts `history` (one history per question); the
decoded answer keeps `<ref>`/`<box>` tags whichever tokenizer class is used (§8.6).

Generation goes through the paged engine by default (`engine=True`): `generate` below is `engine_generate`, a
drop-in with the reference signature and output whose greedy tokens equal the reference's (tests/engine), served by
one engine kept on the model (`engine_for`). `engine=False` calls the plain reference loop (`reference_generate`),
which `InternVLChatModel.generate` always uses. With the engine, `batch_chat` runs each question as its own request
(no padding), and later turns of a conversation reuse the KV of the earlier ones through the prefix cache.
`num_beams > 1` runs `beam_search` (transformers' beam search, on the plain KV cache) on both paths.

Additions: `pixel_values` may be images (paths, URLs, bytes, PIL images), which chat tiles itself with as many tiles
as fit `max_image_tokens` and the context length (`internvl.preprocessing.budget`).
"""

from __future__ import annotations

import os

import torch

from internvl.engine.engine import DEFAULT_KV_BUDGET_BYTES, Engine
from internvl.engine.kv_cache import block_bytes
from internvl.engine.sampler import SamplingParams
from internvl.generation.beam_search import beam_search
from internvl.generation.generate import generate as reference_generate
from internvl.generation.inputs import pad_token_id
from internvl.generation.sampling import GenerationConfig
from internvl.preprocessing.budget import image_token_room, max_tiles_for_budget
from internvl.preprocessing.image import load_image
from internvl.templates.conversation import build_batch_prompts, build_chat_prompt, get_template
from internvl.templates.tokens import IMG_CONTEXT_TOKEN
from internvl.tokenizer import decode_keep_grounding, eos_id_for_template, image_context_id


# ---------------------------------------------------------------------------------------------- engine seam
def engine_for(model, min_blocks: int = 0, want_blocks: int = 0, block_size: int = 16) -> Engine:
    """The engine `chat()` uses for `model`: created on first use, kept on the model (so the prefix cache serves
    later turns of a conversation), and rebuilt larger when a call needs it.

    min_blocks: what the largest single request needs (it must fit alone). want_blocks: what the whole call would
    like (all requests at once); honoured up to DEFAULT_KV_BUDGET_BYTES, beyond which requests simply wait.
    """
    weight = model.language_model.lm_head.weight
    dtype = model.language_model.get_input_embeddings().weight.dtype  # the KV dtype, also for quantized models
    cfg = model.language_model.config
    cap = max(1, DEFAULT_KV_BUDGET_BYTES // block_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size,
                                                       dtype))
    want = max(min_blocks, min(want_blocks, cap))
    eng = getattr(model, "_internvl_engine", None)
    same = eng is not None and eng.model is model and eng.pool.block_size == block_size
    if not (same and eng.pool.dtype == dtype and eng.pool.device == weight.device
            and eng.pool.num_blocks >= want):
        old = eng.pool.num_blocks if same else 0
        eng = Engine(model, num_blocks=max(want, min(2 * old, cap), min(64, cap)), block_size=block_size)
        model._internvl_engine = eng
    return eng


def engine_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    visual_features: torch.Tensor | None = None,
    config=None,
    streamer=None,
) -> torch.Tensor:
    """The reference `generate` signature and output (new tokens, (B, n), finished rows padded), served by the
    engine: rows are un-padded and run as independent requests. `chat()`/`batch_chat()` call this by default.

    Greedy rows equal the reference's. With a seed, every row gets its own generator seeded with it, so each row
    equals the reference run of that row alone (the reference batch shares one generator between its rows).
    """
    cfg = config or GenerationConfig()
    if cfg.num_beams > 1:  # the engine schedules independent sequences; beams share a prompt: the plain KV cache
        return beam_search(model, input_ids, attention_mask, pixel_values, visual_features, cfg, streamer)
    b = input_ids.shape[0]
    if streamer is not None and b != 1:
        raise ValueError(f"streaming supports one sequence at a time, got a batch of {b}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = [input_ids[i][mask[i].bool()].tolist() for i in range(b)]
    pad = pad_token_id(cfg)
    if cfg.max_new_tokens == 0:
        if streamer is not None:
            streamer.put(torch.empty(1, 0, dtype=torch.long))
            streamer.end()
        return torch.empty(b, 0, dtype=torch.long)
    params = SamplingParams.from_generation_config(cfg)

    src = pixel_values if pixel_values is not None else visual_features
    per_row: list[dict] = [{} for _ in range(b)]
    if src is not None:
        img_id = model.img_context_token_id
        n_tok = model.config.num_image_token if visual_features is None else int(visual_features.shape[1])
        counts = [sum(1 for t in r if t == img_id) for r in rows]
        if any(c % n_tok for c in counts) or sum(counts) != src.shape[0] * n_tok:
            raise ValueError(
                f"prompt has {sum(counts)} <IMG_CONTEXT> slots but the images produced {src.shape[0] * n_tok} "
                f"feature rows ({src.shape[0]} tiles x {n_tok}); the number of <image> placeholders or "
                "num_patches_list does not match pixel_values"
            )
        start = 0
        for i, c in enumerate(counts):
            if c:
                key = "pixel_values" if visual_features is None else "visual_features"
                per_row[i] = {key: src[start : start + c // n_tok]}
                start += c // n_tok
    blocks = [-(-(len(r) + params.max_new_tokens) // 16) for r in rows]
    eng = engine_for(model, min_blocks=max(blocks), want_blocks=sum(blocks), block_size=16)
    requests = [dict(prompt_ids=r, params=params, **extra) for r, extra in zip(rows, per_row)]
    if streamer is None:
        outs = [o.outputs[0].token_ids for o in eng.generate(requests)]
    else:
        streamer.put(torch.empty(1, 0, dtype=torch.long))  # the reference streams the (empty) prompt first
        tokens: list[int] = []
        try:
            with eng.stream(requests[0].pop("prompt_ids"), requests[0].pop("params"), **requests[0]) as s:
                for delta in s:
                    tokens.extend(delta.token_ids)
                    if delta.token_ids:
                        streamer.put(torch.tensor(delta.token_ids))
        finally:
            streamer.end()
        outs = [tokens]
    width = max(len(o) for o in outs)
    result = torch.full((b, width), pad, dtype=torch.long)
    for i, o in enumerate(outs):
        result[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    return result.to(input_ids.device)


generate = engine_generate  # what chat()/batch_chat() call by default (tests replace it with a fake)


# ---------------------------------------------------------------------------------------------- chat API
def _prepare(model, tokenizer, generation_config, max_image_tokens=None):
    """-> (template, GenerationConfig, streamer, image token budget: the keyword, else the dict's key)."""
    template = get_template(model.config.template)
    model.img_context_token_id = image_context_id(tokenizer)
    eos = eos_id_for_template(tokenizer, template)
    if generation_config is None:
        generation_config = {}
    if isinstance(generation_config, dict):
        # the reference writes eos into the caller's dict (§8.1 step 9); model-card code relies on nothing else
        generation_config["eos_token_id"] = eos
        streamer = generation_config.get("streamer")
        if max_image_tokens is None:
            max_image_tokens = generation_config.get("max_image_tokens")
        generation_config = {k: v for k, v in generation_config.items() if k != "max_image_tokens"}
    else:
        streamer = None
    if max_image_tokens is not None and (isinstance(max_image_tokens, bool) or not isinstance(max_image_tokens, int)
                                         or max_image_tokens < 1):
        raise ValueError(f"max_image_tokens must be an integer >= 1 or None, got {max_image_tokens!r}")
    cfg = GenerationConfig.from_any(generation_config, eos_token_id=eos)
    if cfg.pad_token_id is None and tokenizer.pad_token_id is not None:
        cfg = GenerationConfig.from_any(cfg, pad_token_id=tokenizer.pad_token_id)
    return template, cfg, streamer, max_image_tokens


# ---------------------------------------------------------------------------------------------- image budget
def _is_image_source(x) -> bool:
    from PIL import Image

    return isinstance(x, (str, os.PathLike, bytes, bytearray, Image.Image))


def _image_token_limit(model, tokenizer, cfg, budget, question, history, n_images) -> int:
    """Image tokens one sequence may hold: the budget (None: no budget), and the room the context leaves after
    the prompt's text (rendered with one tile per image, minus those tiles) and max_new_tokens. Raises ValueError
    when not even one tile per image fits."""
    per_tile = model.config.num_image_token
    prompt, _ = build_chat_prompt(model.config.template, question, history=history,
                                  system_message=model.system_message, num_patches_list=[1] * n_images,
                                  num_image_token=per_tile, has_pixels=n_images > 0)
    text = len(tokenizer(prompt)["input_ids"]) - n_images * per_tile
    context = model.config.llm.max_position_embeddings
    room = image_token_room(context, text, cfg.max_new_tokens)
    if room < n_images * per_tile:
        raise ValueError(
            f"the context of {context} tokens leaves room for {max(room, 0)} image tokens after {text} text tokens "
            f"and max_new_tokens={cfg.max_new_tokens}; {n_images} image(s) need at least {n_images * per_tile} "
            "(one tile each): shorten the prompt or history, or lower max_new_tokens"
        )
    return room if budget is None else min(budget, room)


def _fit_images(model, tokenizer, cfg, budget, images, num_patches_list, question, history):
    """pixel_values given as image sources -> tiles that fit the limit; tensors -> checked against it (a budget
    given with tensors can only be checked: their tiles are cut already). -> (pixel_values, num_patches_list)."""
    if images is None or (isinstance(images, torch.Tensor) and budget is None):
        return images, num_patches_list
    if isinstance(images, torch.Tensor):
        n = len(num_patches_list) if num_patches_list is not None else 1
        limit = _image_token_limit(model, tokenizer, cfg, budget, question, history, n)
        have = images.shape[0] * model.config.num_image_token
        if have > limit:
            raise ValueError(
                f"pixel_values has {images.shape[0]} tiles = {have} image tokens, over the limit of {limit} "
                f"(max_image_tokens={budget} and the context room); pass the images themselves (paths or PIL "
                "images) as pixel_values so chat picks the tile counts, or tile them with load_image(max_num="
                "max_tiles_for_budget(...))"
            )
        return images, num_patches_list
    sources = [images] if _is_image_source(images) else list(images)
    if num_patches_list is not None:
        raise ValueError("num_patches_list is computed when pixel_values are images (paths or PIL images); omit it")
    limit = _image_token_limit(model, tokenizer, cfg, budget, question, history, len(sources))
    c = model.config
    max_num = c.max_dynamic_patch if c.dynamic_image_size else 1
    m = max_tiles_for_budget(limit, c.num_image_token, c.use_thumbnail, max_num, len(sources))
    tiles = [load_image(src, input_size=c.image_size, max_num=m, use_thumbnail=c.use_thumbnail) for src in sources]
    return torch.cat(tiles), [t.shape[0] for t in tiles]


def _fit_batch_images(model, tokenizer, cfg, budget, images, num_patches_list, questions, history):
    """`_fit_images` for batch_chat: one image per question, each question (its own sequence) fitted alone."""
    histories = history or [None] * len(questions)
    if isinstance(images, torch.Tensor):
        if budget is not None:
            if len(num_patches_list) != len(questions):
                raise ValueError(f"num_patches_list has {len(num_patches_list)} entries but there are "
                                 f"{len(questions)} questions; give one tile count per question")
            start = 0
            for n, q, h in zip(num_patches_list, questions, histories):
                _fit_images(model, tokenizer, cfg, budget, images[start : start + n], [n], q, h)
                start += n
        return images, num_patches_list
    sources = [images] if _is_image_source(images) else list(images)
    if len(sources) != len(questions):
        raise ValueError(f"batch_chat got {len(sources)} images for {len(questions)} questions; give one each")
    if num_patches_list is not None:
        raise ValueError("num_patches_list is computed when pixel_values are images (paths or PIL images); omit it")
    fitted = [_fit_images(model, tokenizer, cfg, budget, src, None, q, h)
              for src, q, h in zip(sources, questions, histories)]
    return torch.cat([px for px, _ in fitted]), [n for _, (n,) in fitted]


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


def answer_text(tokenizer, template, ids: list[int], eos: int) -> str:
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
    engine: bool = True,
    max_image_tokens: int | None = None,
):
    """One turn. pixel_values (T, 3, S, S) are all images' tiles in prompt order; see the module docstring.
    engine=False uses the plain reference generate instead of the paged engine.

    pixel_values may also be images (a path, URL, bytes or PIL image, or a list of them, one per <image>): chat
    then tiles them as the model's config says, with as many tiles as fit `max_image_tokens` (this keyword or a
    `generation_config` key; None: the config's max_dynamic_patch) and the context length (§9.2,
    `internvl.preprocessing.budget`). With tile tensors, a budget is checked (ValueError when exceeded).
    """
    template, cfg, streamer, budget = _prepare(model, tokenizer, generation_config, max_image_tokens)
    pixel_values, num_patches_list = _fit_images(model, tokenizer, cfg, budget, pixel_values, num_patches_list,
                                                 question, history)
    patches = _check_patches(pixel_values, num_patches_list)
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
    run = generate if engine else reference_generate
    out = run(model, enc["input_ids"], enc.get("attention_mask"), pixel_values=pixel_values, config=cfg,
              streamer=streamer)
    response = answer_text(tokenizer, template, out[0].tolist(), cfg.eos_token_id[0])
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
    engine: bool = True,
    max_image_tokens: int | None = None,
):
    """Several independent questions, one image each (`num_patches_list[i]` tiles), answered as one batch.

    pixel_values may also be a list of images (paths, URLs, bytes or PIL images), one per question, tiled to fit
    `max_image_tokens` per question and the context, as in `chat()`.

    history: None, or one history per question (a list of (question, answer) pairs, or None for a first turn);
    each question is then rendered as `chat()` renders a turn with that history (§8.1). return_history=True
    returns (responses, histories). engine=False uses the plain reference generate (one left-padded batch).
    """
    if image_counts is not None:  # deprecated alias in the reference
        num_patches_list = image_counts
    template, cfg, _, budget = _prepare(model, tokenizer, generation_config, max_image_tokens)
    if isinstance(pixel_values, torch.Tensor) and num_patches_list is None:
        raise ValueError("batch_chat with pixel_values needs num_patches_list: the tile count of each question's image")
    if history is not None and (isinstance(history, (str, tuple)) or len(history) != len(questions)):
        raise ValueError(
            f"batch_chat history must be a list with one history (or None) per question; got "
            f"{type(history).__name__} for {len(questions)} questions"
        )
    if pixel_values is not None:
        pixel_values, num_patches_list = _fit_batch_images(model, tokenizer, cfg, budget, pixel_values,
                                                           num_patches_list, questions, history)
    patches = _check_patches(pixel_values, num_patches_list) if pixel_values is not None else None
    stored = list(questions)
    if history is None:
        prompts = build_batch_prompts(
            model.config.template,
            questions,
            num_patches_list=patches,
            system_message=model.system_message,
            num_image_token=model.config.num_image_token,
            has_pixels=pixel_values is not None,
        )
    else:
        if patches is not None and len(patches) != len(questions):
            raise ValueError(
                f"num_patches_list has {len(patches)} entries but there are {len(questions)} questions; "
                "give one tile count per question"
            )
        prompts = []
        for i, question in enumerate(questions):
            prompt, stored[i] = build_chat_prompt(
                model.config.template,
                question,
                history=history[i],
                system_message=model.system_message,
                num_patches_list=[patches[i]] if patches is not None else None,
                num_image_token=model.config.num_image_token,
                has_pixels=pixel_values is not None,
            )
            prompts.append(prompt)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side  # unlike the reference, leave the caller's tokenizer as it was
    run = generate if engine else reference_generate
    out = run(model, enc["input_ids"], enc["attention_mask"], pixel_values=pixel_values, config=cfg)
    responses = [answer_text(tokenizer, template, row.tolist(), cfg.eos_token_id[0]) for row in out]
    if verbose:
        for q, r in zip(questions, responses):
            print(q, r)
    if return_history:
        histories = [list((history or [None] * len(questions))[i] or []) + [(stored[i], responses[i])]
                     for i in range(len(questions))]
        return responses, histories
    return responses
