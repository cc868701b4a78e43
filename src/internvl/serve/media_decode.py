"""Decode untrusted image and video bytes within the policy's pixel and time limits.

Spec: SERVING.md §5.5 (decoding), §13 C #21–23. Images: Pillow restricted to PNG, JPEG, WEBP, GIF and BMP; the size
is read from the header and checked against `max_pixels` before any pixel is decoded; animated images give frame 0;
RGB conversion is `preprocessing.image`'s (reference `convert('RGB')`, alpha dropped; 16-bit scaled to 8 bit as the
offline path does), so the server and the offline API see identical pixels. Videos: PyAV (FFmpeg) restricted to the
MP4/MOV, Matroska/WebM and AVI demuxers, frames chosen with the model card's segment-centre formula
(`preprocessing.video.frame_indices`).

Both functions are blocking and run in a worker thread (`media.py`); the video decoder also checks its deadline after
every frame, so a video that is slow to decode stops itself instead of occupying the thread.
"""

from __future__ import annotations

import io
import time

import av
from PIL import Image

from internvl.preprocessing.image import _finish
from internvl.preprocessing.video import _stream_fps, frame_indices
from internvl.serve.media_policy import INVALID_IMAGE, MediaError, MediaPolicy

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow format ids accepted from clients (§5.5)
_IMAGE_FORMATS_TEXT = "a PNG, JPEG, WebP, GIF or BMP image"
# FFmpeg demuxer names (av_match_list semantics: "mov" admits the whole "mov,mp4,m4a,3gp,3g2,mj2" family). Playlist
# and concat demuxers (hls, concat, ...) are excluded: they open further URLs and files named inside the data.
VIDEO_DEMUXERS = "mov,matroska,webm,avi"
_VIDEO_FORMATS_TEXT = "an MP4/MOV, WebM/Matroska or AVI video"


def _image_error(message: str, reason: str = "decode") -> MediaError:
    return MediaError(INVALID_IMAGE, message, reason=reason)


def _pixel_error(what: str, width: int, height: int, limit: int) -> MediaError:
    return _image_error(
        f"The {what} is {width}x{height} = {width * height} pixels; the limit is {limit} pixels, downscale it.",
        "pixels",
    )


def decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
    """Image bytes -> a fully loaded RGB PIL image, or MediaError(INVALID_IMAGE)."""
    if not data:
        raise _image_error("The image is empty (0 bytes).")
    try:
        # Lazy: reads the header only. Pillow's own bomb guard stays on and raises DecompressionBombError here.
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise _image_error(
            f"The image declares more pixels than the limit of {policy.max_pixels}; downscale it.", "pixels"
        ) from None
    except Exception:  # UnidentifiedImageError, and plugin errors (SyntaxError, struct.error, ...) on garbage headers
        raise _image_error(f"The data is not {_IMAGE_FORMATS_TEXT}.") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise _image_error(f"The image has no pixels (size {width}x{height}).")
        if width * height > policy.max_pixels:  # before load(): a 40000x40000 PNG of a few KB is refused here
            raise _pixel_error("image", width, height, policy.max_pixels)
        try:
            image.load()  # frame 0 of an animated image
        except Exception:  # truncated or corrupt pixel data
            raise _image_error(
                f"The image data is truncated or corrupt; send {_IMAGE_FORMATS_TEXT} file whole."
            ) from None
        try:
            return _finish(image, policy.apply_exif_orientation, "<request image>")
        except ValueError:
            raise _image_error(f"The image's pixel mode {image.mode!r} cannot be converted to RGB.") from None


# ----------------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------------


def _open_video(data: bytes):
    try:
        container = av.open(io.BytesIO(data), mode="r", container_options={"format_whitelist": VIDEO_DEMUXERS})
    except Exception:  # av.FFmpegError and its subclasses (InvalidDataError, ArgumentError for other demuxers)
        raise _image_error(f"The data is not {_VIDEO_FORMATS_TEXT}.") from None
    if not container.streams.video:
        container.close()
        raise _image_error("The video has no video stream (audio only?).")
    return container


def _frames(data: bytes, policy: MediaPolicy, deadline: float):
    """Yield (index, av.VideoFrame) in decode order, enforcing the frame pixel cap and the decode deadline."""
    with _open_video(data) as container:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if frame.width * frame.height > policy.max_video_frame_pixels:
                    raise _pixel_error("video frame", frame.width, frame.height, policy.max_video_frame_pixels)
                if time.monotonic() > deadline:
                    raise _image_error(
                        f"Decoding the video took longer than the limit of {policy.decode_timeout_s:g} s; send a "
                        f"shorter or smaller video.",
                        "timeout",
                    )
                yield index, frame
        except av.FFmpegError:
            raise _image_error(
                f"The video data is truncated or corrupt; send {_VIDEO_FORMATS_TEXT} file whole."
            ) from None


def _keep(data: bytes, policy: MediaPolicy, deadline: float, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode up to the last wanted frame once; return the wanted frames as RGB images and how many were decoded."""
    kept: dict[int, Image.Image] = {}
    decoded = 0
    for index, frame in _frames(data, policy, deadline):
        decoded = index + 1
        if index in wanted:
            kept[index] = frame.to_image().convert("RGB")  # (H, W) RGB, as the reference's decord asnumpy()
        if index >= max(wanted):
            break
    return kept, decoded


def decode_video(data: bytes, num_frames: int, policy: MediaPolicy) -> list[Image.Image]:
    """Video bytes -> `num_frames` RGB frames at the centres of equal segments (INTERNVL.md §9.6)."""
    if not data:
        raise _image_error("The video is empty (0 bytes).")
    deadline = time.monotonic() + policy.decode_timeout_s
    with _open_video(data) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > policy.max_video_frame_pixels:  # header check; frames are checked again while decoding
            raise _pixel_error("video frame", width, height, policy.max_video_frame_pixels)
        try:
            fps = _stream_fps(stream, "<request video>")
        except ValueError:
            raise _image_error("The video does not declare a frame rate.") from None
        declared = int(stream.frames or 0)  # 0 when the container stores no count (e.g. Matroska)
    total = declared if declared > 0 else sum(1 for _ in _frames(data, policy, deadline))
    if total < 1:
        raise _image_error("The video contains no decodable frames.")

    indices = frame_indices(total, fps, num_segments=num_frames)
    kept, decoded = _keep(data, policy, deadline, set(indices))
    if len(kept) < len(set(indices)):  # the header over-stated the frame count: select again with the true count
        if decoded < 1:
            raise _image_error("The video contains no decodable frames.")
        indices = frame_indices(decoded, fps, num_segments=num_frames)
        kept, _ = _keep(data, policy, deadline, set(indices))
    # A video shorter than num_frames repeats frames (as the reference does); each entry is its own image object.
    return [kept[i].copy() for i in indices]
