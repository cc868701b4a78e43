"""Safe media loading for the server: a URL from a request -> RGB PIL image(s), or a `MediaError` (a 400).

Spec: SERVING.md §5 (accepted URL forms, data URLs, remote fetch, local files, decoding), §2.2 (error codes), §13 C–D,
§14 (safe defaults). The pieces:

    load_image_url(url, policy)      data:/http(s):/file: URL -> bytes (this file, media_fetch.py) -> RGB image
    load_video_url(url, policy, k)   the same for a video -> k RGB frames (media_decode.py)
    aload_image_url / aload_video_url / aload_images: the async forms used by the server

Accepted forms (§5.1): `data:image/{png,jpeg,webp,gif,bmp};base64,<payload>` (`data:video/...` for videos), http(s)
URLs under every SSRF rule of §5.3 (media_fetch.py), and `file://` URLs only below `allowed_local_media_path`. Bare
paths and every other scheme are refused. Errors carry the §2.2 code: `INVALID_IMAGE_URL` for the URL (scheme,
destination, upstream status, timeout, size cap), `INVALID_IMAGE` for the bytes (format, base64, pixel cap).

The async functions never block the event loop: resolution, file reads and decoding run in a bounded worker pool,
and cancelling the awaiting task (a client disconnect) abandons the fetch at once. The sync functions run the same
code on a private event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import os
import re
import stat
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from internvl.serve.media_decode import decode_image, decode_video
from internvl.serve.media_fetch import BLOCKING_POOL, check_raw_url, fetch_url
from internvl.serve.media_policy import (
    INVALID_IMAGE,
    INVALID_IMAGE_URL,
    INVALID_REQUEST,
    TOO_MANY_IMAGES,
    MediaError,
    MediaPolicy,
)
from internvl.serve.timeouts import within

__all__ = [
    "MediaError",
    "MediaPolicy",
    "aload_image_url",
    "aload_images",
    "aload_video_url",
    "describe_url",
    "load_image_url",
    "load_video_url",
]

# §5.1: data URL media types. "image/jpg" is a common misspelling of image/jpeg and is accepted as such; the decoder
# identifies the real format from the bytes, so a PNG labelled image/jpeg still decodes (as PNG).
IMAGE_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"})
VIDEO_MIME_TYPES = frozenset({"video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/x-msvideo"})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def describe_url(url: object, limit: int = 80) -> str:
    """A short form of a media URL for logs: data URLs are never logged in full (SERVING.md §8)."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    if url[:5].lower() == "data:":
        return f"{url[: min(url.find(',') + 1 or 30, 40)]}<{len(url)} chars>"
    return url if len(url) <= limit else f"{url[:limit]}...<{len(url)} chars>"


# ----------------------------------------------------------------------------------------------------------------
# data: URLs (§5.2)
# ----------------------------------------------------------------------------------------------------------------


def _decode_data_url(url: str, kind: str, cap: int) -> bytes:
    accepted = IMAGE_MIME_TYPES if kind == "image" else VIDEO_MIME_TYPES
    example = "data:image/png;base64,<payload>" if kind == "image" else "data:video/mp4;base64,<payload>"
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaError(
            INVALID_IMAGE_URL, f"The data URL has no ',' before the payload; use {example}.", reason="malformed"
        )
    mime, _, encoding = header.partition(";")
    mime = mime.strip().lower()
    if encoding.strip().lower() != "base64":
        raise MediaError(
            INVALID_IMAGE_URL, f"Data URLs must be base64 encoded and nothing else; use {example}.", reason="malformed"
        )
    if mime not in accepted:
        names = ", ".join(sorted(accepted - {"image/jpg"}))
        raise MediaError(
            INVALID_IMAGE_URL, f"Data URL media type {mime[:40]!r} is not accepted; use one of {names}.", reason="mime"
        )
    if not payload:
        raise MediaError(INVALID_IMAGE, "The data URL payload is empty.", reason="base64")
    if len(payload) > 4 * ((cap + 2) // 3):  # the largest encoding of `cap` bytes: refuse before decoding anything
        raise MediaError(
            INVALID_IMAGE_URL, f"The data URL's {kind} is larger than the limit of {cap} bytes.", reason="too_large"
        )
    # Strict base64 (§5.2): standard alphabet only, no whitespace or line breaks, padding '=' only at the end and the
    # length a multiple of 4. Python's b64decode would otherwise skip stray characters.
    if not _BASE64.fullmatch(payload):
        bad = [c for c in payload if not (c.isascii() and (c.isalnum() or c in "+/="))]
        if not bad:
            what = "'=' padding before its end (or more than two '=')"
        else:
            what = "whitespace or a line break" if bad[0].isspace() else f"the character {bad[0]!r}"
        raise MediaError(
            INVALID_IMAGE,
            f"The data URL payload contains {what}; send standard base64 (A-Z a-z 0-9 + /, '=' padding) in one line.",
            reason="base64",
        )
    if len(payload) % 4:
        raise MediaError(
            INVALID_IMAGE,
            f"The data URL payload has bad base64 padding (length {len(payload)} is not a multiple of 4).",
            reason="base64",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(INVALID_IMAGE, "The data URL payload is not valid base64.", reason="base64") from None
    if len(data) > cap:
        raise MediaError(
            INVALID_IMAGE_URL,
            f"The data URL's {kind} is {len(data)} bytes; the limit is {cap} bytes.",
            reason="too_large",
        )
    return data


# ----------------------------------------------------------------------------------------------------------------
# file: URLs (§5.4)
# ----------------------------------------------------------------------------------------------------------------


def _file_error(message: str, reason: str = "file") -> MediaError:
    return MediaError(INVALID_IMAGE_URL, message, reason=reason)


def _read_local_file(url: str, policy: MediaPolicy, cap: int) -> bytes:
    """Bytes of a file:// URL whose resolved path lies inside the allowed directory (blocking)."""
    if policy.allowed_local_media_path is None:
        raise _file_error("file:// URLs are disabled on this server; send a data: or https:// URL.", "scheme")
    check_raw_url(url)
    parts = urllib.parse.urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise _file_error("file:// URLs must have an empty host or 'localhost' (file:///absolute/path).")
    if parts.query or parts.fragment:
        raise _file_error("file:// URLs must not have a query or fragment; percent-encode '?' and '#' in names.")
    path_text = urllib.parse.unquote(parts.path)
    if "\x00" in path_text or not path_text.startswith("/"):
        raise _file_error("file:// URLs must name an absolute path (file:///absolute/path).")
    # Resolve symlinks and '..' in both, then compare path components, so <DIR>/media does not admit <DIR>/media-2.
    try:
        root = policy.allowed_local_media_path.resolve()
        path = Path(path_text).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise _file_error("The file:// URL's path cannot be resolved.") from None
    if not path.is_relative_to(root):
        raise _file_error("The file:// URL points outside this server's allowed media directory.", "file_outside")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # no directories, FIFOs (a read would block) or devices
            raise _file_error("The file:// URL does not name a regular file.")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _file_error("No file exists at the file:// URL's path in the allowed media directory.") from None
    except OSError:
        raise _file_error("The file at the file:// URL cannot be read.") from None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > cap:
            raise _file_error(f"The file is {size} bytes; the limit is {cap} bytes.", "too_large")
        data = handle.read(cap + 1)
    if len(data) > cap:  # grew since fstat
        raise _file_error(f"The file is larger than the limit of {cap} bytes.", "too_large")
    return data


# ----------------------------------------------------------------------------------------------------------------
# URL -> bytes -> decoded media
# ----------------------------------------------------------------------------------------------------------------


async def _in_worker(function, *args):
    return await asyncio.get_running_loop().run_in_executor(BLOCKING_POOL, function, *args)


async def _read_url(url: object, policy: MediaPolicy, kind: str) -> bytes:
    if not isinstance(url, str):
        raise MediaError(
            INVALID_IMAGE_URL, f"The {kind} URL must be a string, got {type(url).__name__}.", reason="malformed"
        )
    url = url.strip()
    cap = policy.max_video_bytes if kind == "video" else policy.max_bytes
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme == "data":
        return await _in_worker(_decode_data_url, url, kind, cap)  # ~27 MB of text at the cap: not on the loop
    if scheme in ("http", "https"):
        return await fetch_url(url, policy, kind)
    if scheme == "file":
        return await _in_worker(_read_local_file, url, policy, cap)
    if scheme is None or len(scheme) == 1:  # "photo.png", "/etc/passwd", "C:\\x.png"
        raise MediaError(
            INVALID_IMAGE_URL,
            f"The {kind} must be given as a URL; local paths are not accepted, send a data: or https:// URL.",
            reason="scheme",
        )
    raise MediaError(
        INVALID_IMAGE_URL,
        f"URL scheme {scheme[:20]!r} is not allowed for media; use https://, http:// or a data: URL.",
        reason="scheme",
    )


async def _decode_with_limit(policy: MediaPolicy, function, *args):
    try:
        return await within(_in_worker(function, *args), policy.decode_timeout_s)
    except asyncio.TimeoutError:
        raise MediaError(
            INVALID_IMAGE, f"Decoding took longer than the limit of {policy.decode_timeout_s:g} s.", reason="timeout"
        ) from None


def _with_param(error: MediaError, param: str | None) -> MediaError:
    if param is not None and error.param is None:
        error.param = param
    return error


async def aload_image_url(url: str, policy: MediaPolicy, param: str | None = None) -> Image.Image:
    """An image URL from a request -> RGB PIL image; raises MediaError with `param` set."""
    try:
        data = await _read_url(url, policy, "image")
        return await _decode_with_limit(policy, decode_image, data, policy)
    except MediaError as error:
        raise _with_param(error, param) from None


async def aload_video_url(
    url: str, policy: MediaPolicy, num_frames: int, param: str | None = None
) -> list[Image.Image]:
    """A video URL -> `num_frames` RGB frames sampled at segment centres (INTERNVL.md §9.6); raises MediaError."""
    try:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise MediaError(
                INVALID_REQUEST, f"num_frames must be an integer >= 1, got {num_frames!r}.", reason="frames"
            )
        if num_frames > policy.max_video_frames:
            raise MediaError(
                TOO_MANY_IMAGES,
                f"Too many video frames: {num_frames} requested, the limit is {policy.max_video_frames} per video.",
                reason="frames",
            )
        data = await _read_url(url, policy, "video")
        return await _decode_with_limit(policy, decode_video, data, num_frames, policy)
    except MediaError as error:
        raise _with_param(error, param) from None


async def aload_images(
    urls: Sequence[tuple[str, str | None]], policy: MediaPolicy, limiter: asyncio.Semaphore | None = None
) -> list[Image.Image]:
    """Load the images of one request concurrently: (url, param) pairs -> images in the same order (§5.3 step 9).

    At most `policy.max_concurrent_fetches` run at once for this call, and, with `limiter` (a semaphore the server
    shares across requests, e.g. 32), at most that many across the process. The first failure cancels the rest and
    is raised; cancelling the caller cancels every fetch.
    """
    local = asyncio.Semaphore(policy.max_concurrent_fetches)

    async def one(url: str, param: str | None) -> Image.Image:
        async with local:
            if limiter is None:
                return await aload_image_url(url, policy, param)
            async with limiter:
                return await aload_image_url(url, policy, param)

    tasks = [asyncio.ensure_future(one(url, param)) for url, param in urls]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # in request order, so the reported error is the first failing image that finished
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # retrieve every outcome: no "never retrieved"


def _run_blocking(coroutine):
    """Run a coroutine to completion from synchronous code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:  # a loop is running here: use another thread
        return executor.submit(asyncio.run, coroutine).result()


def load_image_url(url: str, policy: MediaPolicy, param: str | None = None) -> Image.Image:
    """Blocking form of `aload_image_url`."""
    return _run_blocking(aload_image_url(url, policy, param))


def load_video_url(url: str, policy: MediaPolicy, num_frames: int, param: str | None = None) -> list[Image.Image]:
    """Blocking form of `aload_video_url`."""
    return _run_blocking(aload_video_url(url, policy, num_frames, param))
