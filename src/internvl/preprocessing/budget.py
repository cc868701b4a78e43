"""Token-budget tiling: the tile limit (`max_num`) per image that keeps a request's image tokens within a budget.

Dynamic tiling (INTERNVL.md §9.2) with limit `max_num = m` picks a grid of cols·rows <= m tiles and adds the
thumbnail when cols·rows > 1; each tile costs `tokens_per_tile` prompt tokens (256 for 448-pixel tiles). A grid of
exactly m tiles exists for every m ((m, 1), which a wide enough image picks), so the most tiles limit m can produce is

    worst_case_tiles(m) = m + [use_thumbnail and m > 1]

Every image gets the same limit: the largest m <= max_num with num_images · worst_case_tiles(m) · tokens_per_tile
<= max_image_tokens. The image tokens then fit the budget whatever the images' sizes are. Because of the thumbnail,
two tiles per image buy nothing over one (a 2-tile grid costs 3 tiles), so a budget of 2 tiles per image gives m = 1.

`image_token_room` is the other bound: what the model's context leaves for image tokens after the text and the answer.
"""

from __future__ import annotations


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def worst_case_tiles(max_num: int, use_thumbnail: bool) -> int:
    """The most tiles one image can use when tiled with limit `max_num` (thumbnail included)."""
    _check_int("max_num", max_num, 1)
    return max_num + int(use_thumbnail and max_num > 1)


def max_tiles_for_budget(
    max_image_tokens: int | None,
    tokens_per_tile: int,
    use_thumbnail: bool,
    max_num: int,
    num_images: int = 1,
) -> int:
    """The `max_num` to pass to the tiler for each of `num_images` images so their tokens fit `max_image_tokens`.

    None (no budget) or no images: `max_num` unchanged. Raises ValueError when the budget is smaller than one tile
    per image (the fewest tokens an image can take).
    """
    _check_int("tokens_per_tile", tokens_per_tile, 1)
    _check_int("max_num", max_num, 1)
    _check_int("num_images", num_images, 0)
    if max_image_tokens is None or num_images == 0:
        return max_num
    _check_int("max_image_tokens", max_image_tokens, 0)
    per_image = max_image_tokens // (num_images * tokens_per_tile)  # whole tiles each image may use
    if per_image < 1:
        raise ValueError(
            f"max_image_tokens={max_image_tokens} is smaller than one tile per image: {num_images} image(s) x "
            f"{tokens_per_tile} tokens = {num_images * tokens_per_tile}; raise the budget to at least that or send "
            "fewer images"
        )
    if use_thumbnail and per_image > 1:
        per_image = max(1, per_image - 1)  # a grid of more than one tile brings its thumbnail along
    return min(max_num, per_image)


def image_token_room(context_length: int, text_tokens: int, max_new_tokens: int) -> int:
    """Image tokens the context still holds after the prompt's text tokens and the answer (may be <= 0)."""
    return context_length - text_tokens - max_new_tokens
