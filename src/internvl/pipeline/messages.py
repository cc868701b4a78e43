"""Pipeline inputs -> conversation turns -> the InternVL prompt string. Pure functions: no model, no I/O.

Accepted prompt forms (LMDeploy's):
    "text"                                         a text-only user turn
    ("text", image) / ("text", [images])           a user turn with images (also (images, "text"))
    [{"role": ..., "content": ...}, ...]           OpenAI-style messages; content is a string or a list of parts
                                                   {"type": "text", "text": ...} and {"type": "image_url",
                                                   "image_url": {"url": ..., "max_dynamic_patch": N,
                                                                 "detail": "low" | "auto" | "high"}}
A batch is a list of such prompts. An image is whatever `Pipeline` can open (PIL image, path, URL); here it is only
carried along.

Placing the images of a user turn (SERVING.md §3.2, shared with the server):
* placeholders in the text, `IMAGE_TOKEN` (`<IMAGE_TOKEN>`, LMDeploy's) or `<image>` (the model cards'), stand for
  the turn's images in order; their number must equal the turn's image count;
* otherwise one image becomes `<image>\\n` + text (what `chat()` does), and k > 1 images become
  `Image-1: <image>\\n` ... `Image-k: <image>\\n` + text, numbered across the whole conversation (the model cards'
  "separate images" convention). LMDeploy instead puts all images of such a turn into one `<img>` block.
The prompt is then rendered with the template (`templates.render`) and every `<image>` expands to its image block
(`templates.expand_image_placeholders`), as `chat()` builds it (INTERNVL.md §8.1, §8.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from internvl.templates.conversation import expand_image_placeholders, get_template, render
from internvl.templates.tokens import IMAGE_PLACEHOLDER

IMAGE_TOKEN = "<IMAGE_TOKEN>"  # LMDeploy's placeholder (lmdeploy.vl.constants.IMAGE_TOKEN)
ROLES = ("system", "user", "assistant")
DETAIL_TILES = {"low": 1, "auto": None, "high": None}  # SERVING.md §3.4: low = one tile; else the default limit


@dataclass(frozen=True)
class ImageRef:
    """One image of a user turn: its source (not opened here) and its own tile limit (None: the default)."""

    source: Any
    max_dynamic_patch: int | None = None


@dataclass(frozen=True)
class Turn:
    """One message: role, text with one `<image>` per image (user turns), the images in placeholder order."""

    role: str
    text: str
    images: tuple = ()


# ---------------------------------------------------------------------------------------------- prompt forms
def is_single(prompts) -> bool:
    """One prompt (a string, a tuple, a message list) rather than a batch of them (LMDeploy's rule)."""
    return isinstance(prompts, (str, tuple)) or (isinstance(prompts, list) and bool(prompts)
                                                 and isinstance(prompts[0], dict))


def _looks_like_source(s: str) -> bool:
    return "\n" not in s and (s.startswith(("http://", "https://", "file://", "data:", "/", "./", "~"))
                              or s.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif",
                                                     ".tiff")))


def to_messages(prompt, where: str = "prompt") -> list[dict]:
    """One prompt in any accepted form -> an OpenAI-style message list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, tuple):
        if len(prompt) != 2:
            raise ValueError(f"{where}: a tuple prompt must be (text, image or [images]); got {len(prompt)} items")
        first, second = prompt
        if isinstance(first, str) and not isinstance(second, str):
            text, images = first, second
        elif isinstance(second, str) and not isinstance(first, str):
            images, text = first, second
        elif not isinstance(first, str) or not isinstance(second, str):
            raise ValueError(f"{where}: a tuple prompt needs a text string, got {type(first).__name__} and "
                             f"{type(second).__name__}")
        elif _looks_like_source(second) and not _looks_like_source(first):
            text, images = first, second  # two strings: the one that names an image file or URL is the image
        elif _looks_like_source(first) and not _looks_like_source(second):
            images, text = first, second
        else:
            raise ValueError(f"{where}: a tuple prompt must be (text, image or [images]) with exactly one string "
                             "text; give an image path inside a list if the text is ambiguous")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": i}} for i in images]
        return [{"role": "user", "content": parts}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise ValueError(f"{where}: expected a string, a (text, image or [images]) tuple or a list of OpenAI-style "
                     f"message dicts; got {type(prompt).__name__}" + (" (empty list)" if prompt == [] else ""))


# ---------------------------------------------------------------------------------------------- messages -> turns
def _image_ref(part: dict, where: str) -> ImageRef:
    spec = part.get("image_url")
    if not isinstance(spec, dict):
        spec = {"url": spec}
    url = spec.get("url")
    if url is None or (isinstance(url, str) and not url.strip()):
        raise ValueError(f"{where}.image_url: needs a 'url' (a path, an http(s)/data/file URL or a PIL image)")
    unknown = sorted(set(spec) - {"url", "max_dynamic_patch", "detail"})
    if unknown:
        raise ValueError(f"{where}.image_url: unknown field(s) {unknown}; accepted: url, max_dynamic_patch, detail")
    limit = spec.get("max_dynamic_patch")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where}.image_url.max_dynamic_patch={limit!r}: must be an integer >= 1")
    detail = spec.get("detail")
    if detail is not None:
        if detail not in DETAIL_TILES:
            raise ValueError(f"{where}.image_url.detail={detail!r}: must be one of {sorted(DETAIL_TILES)}")
        if limit is None:
            limit = DETAIL_TILES[detail]
    return ImageRef(url, limit)


def _content(message: dict, where: str) -> tuple[str, list[ImageRef]]:
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    texts, images = [], []
    for j, part in enumerate(content):
        w = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            got = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{w}: a part must be a dict with type 'text' or 'image_url', got {got!r}")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{w}.text must be a string")
            texts.append(part["text"])
        else:
            images.append(_image_ref(part, w))
    return "\n".join(texts), images


def parse_messages(messages: list[dict], first_image_number: int = 1,
                   where: str = "messages") -> tuple[str | None, list[Turn]]:
    """Validate a message list -> (system message or None, turns). The last message must be a user turn.
    `first_image_number`: how many images earlier turns of the conversation had, plus one (Image-N numbering)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of message dicts")
    system, turns, number = None, [], first_image_number
    for i, message in enumerate(messages):
        w = f"{where}[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"{w}: role must be one of {ROLES}, got {got!r}")
        role = message["role"]
        text, images = _content(message, w)
        if role != "user" and (images or IMAGE_PLACEHOLDER in text or IMAGE_TOKEN in text):
            raise ValueError(f"{w}: images (and image placeholders) are only accepted in user messages")
        if role == "system":
            if i != 0:
                raise ValueError(f"{w}: a system message is only accepted as the first message")
            system = text
            continue
        if role == "assistant":
            if not text:
                raise ValueError(f"{w}: an assistant message needs text")
            turns.append(Turn("assistant", text))
            continue
        text = text.replace(IMAGE_TOKEN, IMAGE_PLACEHOLDER)
        placeholders = text.count(IMAGE_PLACEHOLDER)
        if placeholders and placeholders != len(images):
            raise ValueError(f"{w}: the text has {placeholders} image placeholder(s) ({IMAGE_TOKEN} or "
                             f"{IMAGE_PLACEHOLDER}) but the message has {len(images)} image(s); give one per image")
        if not placeholders and len(images) == 1:
            text = IMAGE_PLACEHOLDER + "\n" + text
        elif not placeholders and images:
            text = "".join(f"Image-{number + k}: {IMAGE_PLACEHOLDER}\n" for k in range(len(images))) + text
        if not text:
            raise ValueError(f"{w}: a user message needs text or an image")
        number += len(images)
        turns.append(Turn("user", text, tuple(images)))
    if not turns or turns[-1].role != "user":
        raise ValueError(f"{where}: the last message must be a user message (assistant prefill is not supported)")
    return system, turns


# ---------------------------------------------------------------------------------------------- turns -> prompt
def render_prompt(template_name: str, system_message: str | None, turns: list[Turn], num_patches_list: list[int],
                  num_image_token: int) -> str:
    """The prompt string, with an open assistant turn; `num_patches_list`: tiles of every image, in turn order."""
    template = get_template(template_name)
    if system_message is not None and IMAGE_PLACEHOLDER in system_message:
        raise ValueError(f"the system message must not contain {IMAGE_PLACEHOLDER}")
    tags = {"user": template.user_tag, "assistant": template.assistant_tag}
    prompt = render(template, system_message, [(tags[t.role], t.text) for t in turns] + [(template.assistant_tag,
                                                                                           None)])
    return expand_image_placeholders(prompt, num_patches_list, num_image_token)
