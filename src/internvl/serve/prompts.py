"""OpenAI messages -> the InternVL prompt: media fetched and tiled, template rendered, tokens counted (SERVING.md §3.2,
§3.4, §3.5, §5). Everything here runs before admission, so every error is a 400 sent before any streamed byte.

    prepared = await prepare_chat(request, backend, config, policy, limiter)   # ids, tiles, counts
    max_new = completion_budget(len(prepared.prompt_ids), request.sampling.max_tokens, backend, config)

Image placement (§3.2): a user message with one image gets `<image>\\n` before its text, one with k > 1 images gets
`Image-1: <image>\\n` ... numbered across the request; a video gets `Frame1: <image>\\n` ... (model-card convention).
The `<image>` placeholders are filled with `<img>` + `<IMG_CONTEXT>` x (tokens per tile x T) + `</img>` directly,
so a literal "<image>" typed by the user stays text.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from internvl.preprocessing.image import dynamic_preprocess, num_tiles, to_tensor
from internvl.serve import media
from internvl.serve.config import ServerConfig
from internvl.serve.errors import APIError, ErrorCode
from internvl.serve.media_policy import MediaError
from internvl.serve.protocol import ChatRequest, ImageRef, VideoRef
from internvl.templates.conversation import render
from internvl.templates.tokens import image_block


@dataclass
class Prepared:
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None  # (sum of tiles, 3, S, S), images in prompt order
    num_patches_list: list[int]  # tiles per image (a video frame counts as an image)
    num_images: int = 0
    num_tiles: int = 0


def media_error(e: MediaError) -> APIError:
    kind = ErrorCode.__members__.get(e.code, ErrorCode.INVALID_REQUEST)
    return APIError(kind, e.message, param=e.param)


# ---------------------------------------------------------------------------------------------- fetching
async def fetch_media(refs: list, policy, cfg: ServerConfig, limiter: asyncio.Semaphore | None, on_failure=None):
    """Every image / video of a request, concurrently (per-request bound from the policy, process-wide `limiter`).
    -> one item per ref: a PIL image, or a list of frames for a video. The first failure cancels the rest (§5.3.9);
    cancelling the caller (client disconnect) cancels every fetch (§6.4)."""
    local = asyncio.Semaphore(policy.max_concurrent_fetches)

    async def one(ref):
        async with local:
            if limiter is not None:
                await limiter.acquire()
            try:
                if isinstance(ref, ImageRef):
                    return await media.aload_image_url(ref.url, policy, param=ref.param)
                if ref.url is not None:
                    return await media.aload_video_url(ref.url, policy, ref.num_frames or cfg.video_num_frames,
                                                       param=ref.param)
                return [await media.aload_image_url(u, policy, param=f"{ref.param}[{k}]")
                        for k, u in enumerate(ref.frames)]
            finally:
                if limiter is not None:
                    limiter.release()

    tasks = [asyncio.ensure_future(one(r)) for r in refs]
    try:
        if tasks:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                e = t.exception()
                if isinstance(e, MediaError):
                    if on_failure is not None:
                        on_failure(e)
                    raise media_error(e) from None
                raise e
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)  # retrieve every outcome


# ---------------------------------------------------------------------------------------------- tiling
def tile_limit(ref: ImageRef, model_cfg) -> int:
    """§3.4: explicit max_dynamic_patch wins; detail "low" = 1 tile; otherwise the checkpoint's limit."""
    if not model_cfg.dynamic_image_size:
        return 1
    if ref.max_dynamic_patch is not None:
        return ref.max_dynamic_patch
    return 1 if ref.detail == "low" else model_cfg.max_dynamic_patch


def fit_image_budget(sizes: list[tuple[int, int]], limits: list[int], budget: int | None, per_tile: int,
                     use_thumbnail: bool, image_size: int) -> list[int]:
    """Lower the largest images' tile limits until all images fit `budget` tokens (§3.4 max_image_tokens)."""
    if budget is None or not sizes:
        return limits
    limits = list(limits)
    while True:
        tiles = [num_tiles(w, h, max_num=m, use_thumbnail=use_thumbnail, image_size=image_size)
                 for (w, h), m in zip(sizes, limits)]
        need = sum(t * per_tile + 2 for t in tiles)
        if need <= budget:
            return limits
        shrinkable = [i for i, m in enumerate(limits) if m > 1 and tiles[i] > 1]
        if not shrinkable:
            raise APIError(ErrorCode.INVALID_REQUEST,
                           f"max_image_tokens={budget} is too small: the images need {need} tokens even at one tile "
                           f"each ({per_tile} tokens per tile + 2).", param="max_image_tokens")
        i = max(shrinkable, key=lambda k: tiles[k])
        grid = tiles[i] - int(use_thumbnail and tiles[i] > 1)
        limits[i] = max(1, min(limits[i], grid) - 1)


def _tile(image, max_num: int, model_cfg) -> torch.Tensor:
    tiles = dynamic_preprocess(image.convert("RGB") if image.mode != "RGB" else image, max_num=max_num,
                               image_size=model_cfg.image_size, use_thumbnail=model_cfg.use_thumbnail)
    return to_tensor(tiles, image_size=model_cfg.image_size)  # (T, 3, S, S)


# ---------------------------------------------------------------------------------------------- the prompt
def _too_long(backend, prompt_tokens: int, completion: int, at_least: bool = False) -> APIError:
    n = backend.context_len
    more = "at least " if at_least else ""
    return APIError(
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        f"This model's maximum context length is {n} tokens. However, you requested {more}{prompt_tokens + completion} "
        f"tokens ({more}{prompt_tokens} in the messages, {completion} in the completion). Please reduce the length "
        "of the messages or completion.",
        param="messages" if prompt_tokens >= n else "max_tokens",
    )


def check_text_size(backend, texts: list[str], requested: int | None) -> None:
    """Refuse text that cannot fit before paying for its tokenization (§13 #13): no vocabulary entry is longer than
    `max_token_chars` characters, so a text has at least len / max_token_chars tokens."""
    chars = sum(len(t) for t in texts)
    lower = chars // backend.max_token_chars
    if lower + (requested or 1) > backend.context_len:
        raise _too_long(backend, lower, requested or 1, at_least=True)


def completion_budget(prompt_tokens: int, requested: int | None, backend, cfg: ServerConfig) -> int:
    """max_new_tokens for the engine, or 400 context_length_exceeded (§3.5)."""
    room = backend.context_len - prompt_tokens
    if requested is None:
        if room < 1:
            raise _too_long(backend, prompt_tokens, 1)
        return min(room, cfg.max_new_tokens_default)
    if requested > room:
        raise _too_long(backend, prompt_tokens, requested)
    return requested


def _tokenize(backend, text: str) -> list[int]:
    return list(backend.tokenizer(text)["input_ids"])


async def prepare_chat(req: ChatRequest, backend, cfg: ServerConfig, policy, limiter=None,
                       on_media_failure=None) -> Prepared:
    mcfg = backend.model_config
    per_tile = mcfg.num_image_token
    check_text_size(backend, [m.text for m in req.messages], req.sampling.max_tokens)

    refs = [r for m in req.messages for r in m.media]
    loaded = await fetch_media(refs, policy, cfg, limiter, on_media_failure)

    # tile limits: per image from its options, then the request's token budget
    image_idx = [k for k, r in enumerate(refs) if isinstance(r, ImageRef)]
    limits = fit_image_budget([loaded[k].size for k in image_idx], [tile_limit(refs[k], mcfg) for k in image_idx],
                              req.max_image_tokens, per_tile, mcfg.use_thumbnail, mcfg.image_size)
    limit_of = dict(zip(image_idx, limits))

    def tile_all():
        out = []  # per ref: list of (T, 3, S, S) tensors (one per image / frame)
        for k, (ref, item) in enumerate(zip(refs, loaded)):
            if isinstance(ref, ImageRef):
                out.append([_tile(item, limit_of[k], mcfg)])
            else:
                out.append([_tile(frame, 1, mcfg) for frame in item])  # one tile per frame (model card)
        return out

    tiles = await asyncio.to_thread(tile_all) if refs else []
    patches = [int(t.shape[0]) for group in tiles for t in group]
    if req.max_image_tokens is not None and sum(p * per_tile + 2 for p in patches) > req.max_image_tokens:
        raise APIError(ErrorCode.INVALID_REQUEST,
                       f"max_image_tokens={req.max_image_tokens} is too small for the images and video frames of "
                       f"this request ({sum(p * per_tile + 2 for p in patches)} tokens).", param="max_image_tokens")

    # the conversation text (§3.2)
    turns, system = [], None
    image_number, k = 0, 0
    for m in req.messages:
        if m.role == "system":
            system = m.text
            continue
        prefix = ""
        n_images = sum(isinstance(r, ImageRef) for r in m.media)
        for ref in m.media:
            blocks = [image_block(int(t.shape[0]), per_tile) for t in tiles[k]]
            k += 1
            if isinstance(ref, VideoRef):
                prefix += "".join(f"Frame{f}: {b}\n" for f, b in enumerate(blocks, 1))
                continue
            image_number += 1  # numbering runs across the whole request
            prefix += blocks[0] + "\n" if n_images == 1 else f"Image-{image_number}: {blocks[0]}\n"
        tag = backend.template.user_tag if m.role == "user" else backend.template.assistant_tag
        turns.append((tag, prefix + m.text))
    turns.append((backend.template.assistant_tag, None))
    system = system if system is not None else backend.system_message
    prompt = render(backend.template, system, turns)
    ids = await asyncio.to_thread(_tokenize, backend, prompt)

    expected = sum(patches) * per_tile
    if patches and sum(1 for t in ids if t == backend.img_context_id) != expected:
        raise APIError(ErrorCode.INVALID_REQUEST, "Message text must not contain the image tokens <img>, </img> or "
                       "<IMG_CONTEXT>; send images as image_url parts.", param="messages")
    pixel_values = torch.cat([t for group in tiles for t in group]) if patches else None
    return Prepared(ids, pixel_values, patches, num_images=len(patches), num_tiles=sum(patches))


async def prepare_completion(prompt, backend) -> list[int]:
    """A raw /v1/completions prompt (no template, no images) -> token ids."""
    if isinstance(prompt, tuple):
        vocab = len(backend.tokenizer)
        if any(t >= vocab for t in prompt):
            raise APIError(ErrorCode.INVALID_REQUEST, f"prompt token ids must be below the vocabulary size {vocab}.",
                           param="prompt")
        return list(prompt)
    check_text_size(backend, [prompt], None)
    ids = await asyncio.to_thread(_tokenize, backend, prompt)
    if not ids:
        raise APIError(ErrorCode.INVALID_REQUEST, "prompt tokenizes to no tokens.", param="prompt")
    return ids
