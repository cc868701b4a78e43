"""Grounding boxes: parsing `<ref>…</ref><box>[[…]]</box>`, the 0..1000 coordinate convention, RefCOCO scoring.

Spec: INTERNVL.md §18 (format, normalization, RefCOCO denormalization), §12.6 (training annotations), §8.6 (the tags
must survive decoding). Reference: OpenGVLab/InternVL `internvl_chat/eval/refcoco/evaluate_grounding.py`.

Boxes are `(x1, y1, x2, y2)`. "0..1000" coordinates are relative to the **original** image width and height.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

# RefCOCO evaluation prompt (§18); fill with the referring expression.
REFCOCO_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# An optional <ref>phrase</ref> (no nested ref tags) directly before a <box>…</box>, whitespace allowed in between
# (slow SentencePiece decoding puts spaces around added tokens).
_GROUNDED = re.compile(
    r"(?:<ref>(?P<phrase>(?:(?!</?ref>).)*?)</ref>\s*)?<box>(?P<boxes>(?:(?!</?box>).)*?)</box>", re.DOTALL
)
_FOUR_NUMBERS = rf"\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*"
_INNER_BOX = re.compile(r"\[" + _FOUR_NUMBERS + r"\]")
# §18 step 1: four comma-separated numbers enclosed by one or more '[' and ']'.
_REFCOCO_BOX = re.compile(r"\[+" + _FOUR_NUMBERS + r"\]+")


class GroundedBox(NamedTuple):
    """One box from model output: its phrase (None for a `<box>` without a preceding `<ref>`) and 0..1000 coords."""

    phrase: str | None
    box_0_1000: tuple[float, ...]


def parse_boxes(text: str) -> list[GroundedBox]:
    """Every box in `text`, in order. `<ref>p</ref><box>[[a], [b]]</box>` gives two boxes with phrase `p`.

    Model output is parsed leniently: inner lists that are not exactly four numbers are skipped, and a `<ref>` not
    followed by a `<box>` yields nothing.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_boxes expects a string, got {type(text).__name__}")
    found = []
    for match in _GROUNDED.finditer(text):
        phrase = match.group("phrase")
        phrase = phrase.strip() if phrase is not None else None
        for inner in _INNER_BOX.finditer(match.group("boxes")):
            found.append(GroundedBox(phrase, tuple(float(v) for v in inner.groups())))
    return found


def _check_size(width: float, height: float) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"image {name} must be a positive finite number, got {value!r}")


def _check_box(box: Sequence[float], name: str = "box") -> tuple[float, ...]:
    values = tuple(box)
    if len(values) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be four numbers (x1, y1, x2, y2), got {box!r}")
    return tuple(float(v) for v in values)


def to_pixels(box: Sequence[float], width: float, height: float) -> tuple[float, ...]:
    """0..1000 coordinates to pixels of the original image: x * W / 1000, y * H / 1000.

    Accepts any even number of values (a box, or a quad of four points)."""
    _check_size(width, height)
    values = tuple(box)
    if not values or len(values) % 2 or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"box must be an even number of coordinates (x, y pairs), got {box!r}")
    return tuple(v * (width if i % 2 == 0 else height) / 1000 for i, v in enumerate(values))


def normalize_box(box_px: Sequence[float], width: float, height: float) -> tuple[int, ...]:
    """Pixel box to integers in 0..1000 for training text: round(x / W * 1000), Python round (half to even), §18."""
    _check_size(width, height)
    values = _check_box(box_px, "box_px")
    for i, v in enumerate(values):
        limit = width if i % 2 == 0 else height
        if not 0 <= v <= limit:
            axis = "x" if i % 2 == 0 else "y"
            raise ValueError(
                f"box_px {box_px!r}: {axis} = {v} lies outside the image (0..{limit}); coordinates must be inside it"
            )
    return tuple(round(v / (width if i % 2 == 0 else height) * 1000) for i, v in enumerate(values))


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def format_boxes(phrase: str | None, boxes: Sequence[Sequence[int]]) -> str:
    """`<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>` (the `<ref>` part only when a phrase is given), §12.6."""
    if not boxes:
        raise ValueError("format_boxes needs at least one box")
    inner = ", ".join("[" + ", ".join(_format_number(v) for v in _check_box(b)) + "]" for b in boxes)
    ref = "" if phrase is None else f"<ref>{phrase}</ref>"
    return f"{ref}<box>[{inner}]</box>"


def refcoco_box(text: str, width: float, height: float) -> tuple[float, float, float, float]:
    """The predicted box in pixels exactly as RefCOCO evaluation reads it (§18 denormalization steps 1-3).

    First match of four numbers in brackets; none gives (0, 0, 0, 0). Values summing to at least 4 are treated as
    0..1000 and divided by 1000; smaller ones are taken as fractions already. Then x *= W, y *= H.
    """
    if not isinstance(text, str):
        raise ValueError(f"refcoco_box expects a string, got {type(text).__name__}")
    _check_size(width, height)
    match = _REFCOCO_BOX.search(text)
    if match is None:
        return (0.0, 0.0, 0.0, 0.0)
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if x1 + y1 + x2 + y2 >= 4:
        x1, y1, x2, y2 = x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes, continuous areas (no +1); 0.0 when the union is empty."""
    ax1, ay1, ax2, ay2 = _check_box(a, "a")
    bx1, by1, bx2, by2 = _check_box(b, "b")
    inter_w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    inter_h = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = inter_w * inter_h
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0
