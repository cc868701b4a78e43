"""Video preprocessing for inference: frame selection, decoding with PyAV, per-frame tiling, prompt prefix.

Spec: INTERNVL.md §9.6 (inference frame selection, model-card `get_index` / `load_video`), §8.2 (the `Frame1: <image>`
prompt prefix), §20 items 12 and 19. The reference decodes with decord; we decode with PyAV (`av`), which uses the
same FFmpeg decoders. Training-time samplers (§9.6 "Training") are not part of this module.
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Union

import av
import numpy as np
import torch
from PIL import Image

from internvl.preprocessing.image import (
    DEFAULT_IMAGE_SIZE,
    _check_int,
    _check_tile_limits,
    dynamic_preprocess,
    to_tensor,
)

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Without a bound the reference uses (-100000 s, +100000 s), i.e. "the whole video" after clamping (§9.6 step 1).
_NO_BOUND = (-100000, 100000)


def frame_indices(
    num_frames: int,
    fps: float,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
    num_segments: int = 32,
) -> list[int]:
    """Indices of the frames the model sees: the centre of each of `num_segments` equal segments (§9.6 steps 1–4).

    Duplicates are kept, so a video shorter than `num_segments` frames repeats frames, exactly like the reference.
    """
    num_frames = _check_int("num_frames", num_frames, 1)
    num_segments = _check_int("num_segments", num_segments, 1)
    first_idx = _check_int("first_idx", first_idx, 0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating, Fraction)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    if bound is None:
        start, end = _NO_BOUND
    else:
        try:
            start, end = (float(b) for b in bound)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bound must be (start_seconds, end_seconds) or None, got {bound!r}") from exc
        if not (math.isfinite(start) and math.isfinite(end)):
            raise ValueError(f"bound must be finite seconds, got {bound!r}")

    max_frame = num_frames - 1
    # Python's round() is half-to-even, like the reference's (§9.6 step 2).
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    if end_idx < start_idx:
        raise ValueError(
            f"bound {bound!r} selects no frames: at {fps} fps it maps to frames {start_idx}..{end_idx}, but the video "
            f"has frames {first_idx}..{max_frame}"
        )
    seg = float(end_idx - start_idx) / num_segments
    # int(start + seg/2 + round_half_even(seg·k)); np.round is half-to-even, and the sum is evaluated in the
    # reference's order so float results agree exactly (§9.6 step 4).
    positions = start_idx + seg / 2 + np.round(seg * np.arange(num_segments, dtype=np.float64))
    return [int(p) for p in positions]


def video_prompt_prefix(num_frames: int) -> str:
    """Inference prompt prefix `Frame1: <image>\\n…FrameK: <image>\\n` (§8.2; no hyphen, unlike training)."""
    num_frames = _check_int("num_frames", num_frames, 1)
    return "".join(f"Frame{k}: <image>\n" for k in range(1, num_frames + 1))


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def _describe_and_open(source: VideoSource):
    """Return (something av.open accepts, description for error messages)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ValueError("video data is empty (0 bytes)")
        return io.BytesIO(data), f"<{len(data)} bytes>"
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fsdecode(os.fspath(source))).expanduser()
        if not path.is_file():
            if path.exists():
                raise ValueError(f"video source {str(path)!r} is a directory, not a video file")
            raise FileNotFoundError(f"video file not found: {str(path)!r}")
        return str(path), str(path)
    raise ValueError(
        f"unsupported video source type {type(source).__name__}; accepted: a file path (str or pathlib.Path) or bytes"
    )


def _open_container(target, description: str):
    try:
        container = av.open(target, mode="r")
    except av.FFmpegError as exc:
        raise ValueError(
            f"cannot open video {description}: {exc}. Accepted: a container/codec FFmpeg can decode (e.g. MP4, MKV, "
            f"WebM, AVI, MOV)"
        ) from exc
    if not container.streams.video:
        container.close()
        raise ValueError(f"video {description} has no video stream (audio-only or not a video file)")
    return container


def _stream_fps(stream, description: str) -> float:
    # The reference uses decord's average fps; FFmpeg's avg_frame_rate is the same quantity.
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    raise ValueError(f"video {description} does not declare a frame rate; cannot map frames to segments")


def _rewind(target) -> None:
    if isinstance(target, io.BytesIO):
        target.seek(0)


def _count_frames(target, description: str) -> int:
    _rewind(target)
    with _open_container(target, description) as container:
        try:
            return sum(1 for _ in container.decode(video=0))
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode video {description}: {exc}") from exc


def _decode_frames(target, description: str, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode sequentially once, keeping the wanted frames as RGB images; also return how many frames were decoded."""
    _rewind(target)
    kept: dict[int, Image.Image] = {}
    last = max(wanted)
    decoded = 0
    with _open_container(target, description) as container:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                decoded = index + 1
                if index in wanted:
                    kept[index] = frame.to_image().convert("RGB")  # (H, W) RGB uint8, as decord's asnumpy()
                if index >= last:
                    break
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode video {description} (frame {decoded}): {exc}") from exc
    return kept, decoded


def load_video(
    source: VideoSource,
    bound: tuple[float, float] | None = None,
    input_size: int = DEFAULT_IMAGE_SIZE,
    max_num: int = 1,
    num_segments: int = 32,
) -> tuple[torch.Tensor, list[int]]:
    """The model-card `load_video`: `num_segments` frames → (K, 3, S, S) float32 tiles and tiles-per-frame.

    Each selected frame goes through `dynamic_preprocess(max_num=max_num, use_thumbnail=True)` and `to_tensor`; with
    the default `max_num=1` that is one stretched S×S tile per frame, so `num_patches_list == [1] * num_segments`.
    """
    input_size = _check_int("input_size", input_size, 1)
    _check_tile_limits(1, max_num)
    num_segments = _check_int("num_segments", num_segments, 1)
    target, description = _describe_and_open(source)

    with _open_container(target, description) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream, description)
        declared_frames = int(stream.frames or 0)  # 0 when the container does not store a count (e.g. MKV)
    num_frames = declared_frames if declared_frames > 0 else _count_frames(target, description)
    if num_frames < 1:
        raise ValueError(f"video {description} contains no decodable frames")

    indices = frame_indices(num_frames, fps, bound=bound, num_segments=num_segments)
    kept, decoded = _decode_frames(target, description, set(indices))
    if len(kept) < len(set(indices)):
        # The header over-stated the frame count; select again with the true count (every index is now reachable).
        if decoded < 1:
            raise ValueError(f"video {description} contains no decodable frames")
        indices = frame_indices(decoded, fps, bound=bound, num_segments=num_segments)
        kept, _ = _decode_frames(target, description, set(indices))

    pixel_values, num_patches_list = [], []
    for index in indices:
        tiles = dynamic_preprocess(kept[index], max_num=max_num, image_size=input_size, use_thumbnail=True)
        pixel_values.append(to_tensor(tiles, image_size=input_size))  # (tiles, 3, S, S)
        num_patches_list.append(len(tiles))
    return torch.cat(pixel_values), num_patches_list  # (sum(num_patches_list), 3, S, S)
