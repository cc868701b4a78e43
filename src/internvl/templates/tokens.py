"""The nine InternVL special tokens and the image block that replaces an `<image>` placeholder.

Spec: INTERNVL.md §6.1 (token strings and their order), §8.1 step 7 (image block).
Reference: OpenGVLab/InternVL `internvl_chat/internvl/train/constants.py`.

Token ids are never hard-coded here: resolve them through the tokenizer (`internvl.tokenizer.image_context_id`,
`internvl.tokenizer.eos_id_for_template`).
"""

from __future__ import annotations

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
QUAD_START_TOKEN = "<quad>"
QUAD_END_TOKEN = "</quad>"
REF_START_TOKEN = "<ref>"
REF_END_TOKEN = "</ref>"
BOX_START_TOKEN = "<box>"
BOX_END_TOKEN = "</box>"

# Training adds exactly these nine tokens, in this order, so their ids are len(base_tokenizer) + k (§6.1).
INTERNVL_TOKENS: tuple[str, ...] = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    QUAD_START_TOKEN,
    QUAD_END_TOKEN,
    REF_START_TOKEN,
    REF_END_TOKEN,
    BOX_START_TOKEN,
    BOX_END_TOKEN,
)

# The user-facing placeholder that prompt building expands into an image block (§8.1 step 7).
IMAGE_PLACEHOLDER = "<image>"

# Image tokens per 448x448 tile after the 0.5 pixel shuffle: (448 / 14 / 2) ** 2 (§2).
DEFAULT_NUM_IMAGE_TOKEN = 256


def _check_positive_int(value: object, name: str) -> int:
    # bool is an int subclass; True would silently mean 1 tile.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def image_block(num_tiles: int, num_image_token: int = DEFAULT_NUM_IMAGE_TOKEN) -> str:
    """`<img>` + `<IMG_CONTEXT>` x (num_image_token * num_tiles) + `</img>`: the text one image becomes (§8.1)."""
    _check_positive_int(num_tiles, "num_tiles")
    _check_positive_int(num_image_token, "num_image_token")
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN
