"""Image preprocessing: open → RGB → dynamic tiling → normalized tile tensor.

Spec: INTERNVL.md §9.1 (pixel pipeline), §9.2 (dynamic tiling and its tie-break), §9.4 (use Pillow for every
resample), §20 items 11 and 14–18. Reference: the model-card functions `load_image`, `build_transform`,
`dynamic_preprocess` and `find_closest_aspect_ratio` (restated as prose in the spec; this file is written from it).

Pipeline of `load_image` (one image → `(T, 3, S, S)` float32, `T = cols·rows + [cols·rows > 1]`):

    open_image(source)            # any source → RGB PIL image (EXIF orientation applied by default)
    dynamic_preprocess(image)     # → cols·rows tiles of S×S, row-major, then the thumbnail of the original
    to_tensor(tiles)              # uint8/255, ImageNet mean/std → (T, 3, S, S)

Documented deviations from the reference, both about decoding only (tiling and numerics are exact):
* `exif_transpose=True` (our default) rotates phone photos upright; `exif_transpose=False` is the reference.
* 16-bit and float images are scaled to 8 bit instead of being clipped by `convert('RGB')`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

# INTERNVL.md §9.1, `constants.py`: every released chat model normalizes with ImageNet statistics (not CLIP).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_IMAGE_SIZE = 448  # S: one ViT tile, 256 LLM tokens after pixel shuffle (INTERNVL.md §9.2)
URL_TIMEOUT_SECONDS = 20.0
URL_MAX_BYTES = 64 * 1024 * 1024  # refuse downloads larger than this instead of filling memory

ACCEPTED_SOURCES = (
    "a file path (str or pathlib.Path), an http(s) URL, raw bytes, a base64 string, "
    "a 'data:image/...;base64,' URL, or a PIL.Image.Image"
)
ACCEPTED_FORMATS = "any format Pillow can decode (e.g. JPEG, PNG, WebP, GIF, BMP, TIFF)"

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

_BICUBIC = Image.Resampling.BICUBIC


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (anything a user can reach raises ValueError with the offending value in the message)
# ----------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    # bool is an int subclass; `max_num=True` is a bug, not a tile limit.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_tile_limits(min_num, max_num) -> tuple[int, int]:
    min_num = _check_int("min_num", min_num, 1)
    max_num = _check_int("max_num", max_num, 1)
    if max_num < min_num:
        raise ValueError(f"max_num must be >= min_num, got min_num={min_num}, max_num={max_num}")
    return min_num, max_num


def _check_size(width, height) -> tuple[int, int]:
    return _check_int("width", width, 1), _check_int("height", height, 1)


# ----------------------------------------------------------------------------------------------------------------
# Dynamic tiling (INTERNVL.md §9.2)
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _candidate_grids_cached(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # The reference inserts the tuples into a Python set in exactly this loop order (n outer, then columns, then
    # rows; duplicates re-inserted) and stable-sorts by tile count. The order *within* one tile count is CPython's
    # set iteration order, which depends on the hashes, the table size and the insertion order; the tie-break in
    # `find_closest_grid` walks this order, so it is part of the semantics (§9.2 step 2, §20 item 14). A different
    # insertion order changes the result (e.g. for max_num=18). tests/golden/tiling_orders.json pins the orders.
    grids = set(
        (cols, rows)
        for n in range(min_num, max_num + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= cols * rows <= max_num
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def candidate_grids(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols·rows <= max_num, in the reference's tie-break order (§9.2 step 2)."""
    min_num, max_num = _check_tile_limits(min_num, max_num)
    return list(_candidate_grids_cached(min_num, max_num))


def find_closest_grid(
    width: int, height: int, grids: list[tuple[int, int]], image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[int, int]:
    """Pick the grid whose cols/rows is closest to width/height, with the reference tie-break (§9.2 step 3).

    An exact float tie moves to the later (larger) grid only if the image has more than half that grid's pixels.
    """
    width, height = _check_size(width, height)
    image_size = _check_int("image_size", image_size, 1)
    if len(grids) == 0:
        raise ValueError("grids must contain at least one (cols, rows) pair, got an empty list")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_grid(
    width: int, height: int, max_num: int = 12, min_num: int = 1, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[int, int]:
    """(cols, rows) that `dynamic_preprocess` uses for a width×height image."""
    return find_closest_grid(width, height, candidate_grids(min_num, max_num), image_size)


def num_tiles(
    width: int,
    height: int,
    max_num: int = 12,
    use_thumbnail: bool = True,
    *,
    min_num: int = 1,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> int:
    """Tiles (ViT inputs) for one image: cols·rows, plus the thumbnail when the grid has more than one tile."""
    cols, rows = tile_grid(width, height, max_num=max_num, min_num=min_num, image_size=image_size)
    return cols * rows + int(use_thumbnail and cols * rows > 1)


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split an image into S×S tiles on the closest grid (§9.2 steps 4–6).

    The whole image is stretched (aspect ratio not kept) to (S·cols, S·rows) with Pillow bicubic, cut row-major, and
    the thumbnail — the *original* image resized to S×S — is appended last when there is more than one tile.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}; use open_image() first")
    image_size = _check_int("image_size", image_size, 1)
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels: size {width}x{height}")
    cols, rows = tile_grid(width, height, max_num=max_num, min_num=min_num, image_size=image_size)

    # Bicubic is Pillow's default for RGB; it is passed explicitly so a non-RGB input cannot silently change it.
    resized = image.resize((image_size * cols, image_size * rows), resample=_BICUBIC)  # (width, height) order
    tiles = []
    for k in range(cols * rows):
        col, row = k % cols, k // cols  # row-major (§9.2 step 5)
        box = (col * image_size, row * image_size, (col + 1) * image_size, (row + 1) * image_size)
        tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), resample=_BICUBIC))
    return tiles


# ----------------------------------------------------------------------------------------------------------------
# Tiles → tensor (INTERNVL.md §9.1 step 3)
# ----------------------------------------------------------------------------------------------------------------


def to_tensor(tiles: list[Image.Image], image_size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """RGB tiles → (T, 3, S, S) float32: bicubic resize to S×S if needed, uint8/255, ImageNet mean/std."""
    image_size = _check_int("image_size", image_size, 1)
    if isinstance(tiles, Image.Image):
        tiles = [tiles]
    if len(tiles) == 0:
        raise ValueError("to_tensor needs at least one tile, got an empty list")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty(len(tiles), 3, image_size, image_size, dtype=torch.float32)
    for t, tile in enumerate(tiles):
        if not isinstance(tile, Image.Image):
            raise ValueError(f"tile {t} must be a PIL.Image.Image, got {type(tile).__name__}")
        if tile.mode != "RGB":
            raise ValueError(f"tile {t} has mode {tile.mode!r}; expected 'RGB' (open images with open_image())")
        if tile.size != (image_size, image_size):
            # Pillow on uint8, never tensor interpolation (INTERNVL.md §9.4).
            tile = tile.resize((image_size, image_size), resample=_BICUBIC)
        hwc = torch.from_numpy(np.array(tile, dtype=np.uint8))  # (S, S, 3) uint8
        chw = hwc.permute(2, 0, 1).to(torch.float32).div(255.0)  # (3, S, S) in [0, 1]
        out[t] = chw.sub(mean).div(std)  # same op order as ToTensor + Normalize, so float32 results match bit for bit
    return out


# ----------------------------------------------------------------------------------------------------------------
# Opening images from any source
# ----------------------------------------------------------------------------------------------------------------


def _fetch_url(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "internvl-preprocessing"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_SECONDS) as response:
            declared = response.headers.get("Content-Length") if response.headers else None
            if declared is not None and declared.isdigit() and int(declared) > URL_MAX_BYTES:
                raise ValueError(
                    f"image at {url} is {int(declared)} bytes; the limit is {URL_MAX_BYTES} bytes (URL_MAX_BYTES)"
                )
            data = response.read(URL_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:  # the server answered: the URL itself is bad
        raise ValueError(f"could not fetch image {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:  # no network, DNS failure, refused, timed out
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"could not fetch image {url}: {reason} (is there network access? a local path, bytes or base64 work "
            f"offline)"
        ) from exc
    if len(data) > URL_MAX_BYTES:
        raise ValueError(f"image at {url} is larger than the limit of {URL_MAX_BYTES} bytes (URL_MAX_BYTES)")
    return data


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError("malformed data URL: no ',' after the header; expected 'data:image/<type>;base64,<data>'")
    media = header[len("data:") :].split(";")
    if media[0] and not media[0].lower().startswith("image/"):
        raise ValueError(f"data URL has media type {media[0]!r}; expected an image/* type")
    if "base64" in (p.strip().lower() for p in media[1:]):
        data = _strict_b64decode(payload)
        if data is None:
            raise ValueError("data URL payload is not valid base64")
        return data
    return urllib.parse.unquote_to_bytes(payload)


_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _strict_b64decode(text: str) -> bytes | None:
    """Standard-alphabet base64 (whitespace and missing padding tolerated) → bytes, or None if it is not base64."""
    compact = "".join(text.split())
    if not compact or not _BASE64_RE.fullmatch(compact):
        return None
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None

# A path-like string that does not exist is reported as a missing file; only longer strings that are valid base64
# are decoded, so a typo such as "cat" is not mistaken for 2 bytes of image data.
_MIN_BASE64_CHARS = 32


def _existing_path(text: str) -> Path | None:
    """The path if `text` names something on disk; None also when it cannot be a path (too long, NUL byte)."""
    try:
        path = Path(text).expanduser()
        return path if path.exists() else None
    except (OSError, ValueError):  # e.g. ENAMETOOLONG for a long base64 string
        return None


def _read_source(source) -> tuple[Image.Image | bytes | Path, str]:
    """Normalize a source to an already-open image, bytes, or an existing path, plus a short description."""
    if isinstance(source, Image.Image):
        return source, f"<PIL.Image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data, f"<{len(data)} bytes>"
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
        if isinstance(source, bytes):
            source = os.fsdecode(source)
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"image source {str(path)!r} is a directory, not an image file")
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {str(path)!r}")
        return path, str(path)
    if isinstance(source, str):
        stripped = source.strip()
        lower = stripped[:8].lower()
        if lower.startswith(("http://", "https://")):
            return _fetch_url(stripped), stripped
        if lower.startswith("data:"):
            return _decode_data_url(stripped), f"<data URL, {len(stripped)} chars>"
        path = _existing_path(source)
        if path is not None:
            if not path.is_file():
                raise ValueError(f"image source {source!r} is a directory, not an image file")
            return path, str(path)
        decoded = _strict_b64decode(stripped) if len(stripped) >= _MIN_BASE64_CHARS else None
        if decoded is not None:
            description = f"<base64 string, {len(stripped)} chars>"
            if "/" in stripped:  # base64 and POSIX paths share an alphabet; say both readings in any error
                description += f" (if {stripped[:80]!r} was meant as a file path: no such file)"
            return decoded, description
        raise FileNotFoundError(
            f"image file not found: {source!r} (the string is neither an existing file, an http(s) URL, a data URL "
            f"nor valid base64)"
        )
    raise ValueError(f"unsupported image source type {type(source).__name__}; accepted: {ACCEPTED_SOURCES}")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grayscale → 8-bit 'L', scaled (convert('RGB') would clip at 255)."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # Floats are either normalized [0, 1] data or Pillow's 0..255 convention; the maximum decides which.
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        eight_bit = np.clip(values, 0.0, 255.0)
    else:
        # 'I;16*' is 0..65535; 'I' is read as 16-bit too (what Pillow gives for 16-bit PNG/TIFF), clipped to range.
        # Dividing by 257 maps 65535 → 255 and 257·k → k exactly.
        eight_bit = np.clip(values.astype(np.float64), 0.0, 65535.0) / 257.0
    return Image.fromarray(np.rint(eight_bit).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    # Reference parity (INTERNVL.md §9.1 step 1, §20 item 17): RGBA/LA/PA/P-with-transparency go through a plain
    # convert('RGB'), which DROPS alpha without compositing onto a background — fully transparent pixels keep
    # whatever RGB they store (often black). Compositing on white would look nicer but changes the model's input.
    # P, L, 1, CMYK, YCbCr and the rest also use Pillow's own conversion, exactly as the reference does.
    return image.convert("RGB")


_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


def open_image(source: ImageSource, exif_transpose: bool = True) -> Image.Image:
    """Open any supported source as a fully loaded RGB PIL image.

    `exif_transpose=True` applies the EXIF orientation tag (a documented deviation: photos come out upright);
    `exif_transpose=False` reproduces the reference, which ignores it (INTERNVL.md §9.1 step 1).
    Raises FileNotFoundError for a missing file and ValueError for undecodable data, naming the source.
    """
    loaded, description = _read_source(source)
    if isinstance(loaded, Image.Image):
        try:
            loaded.load()  # a lazily opened PIL image may still fail to decode
        except Exception as exc:
            raise _decode_error(exc, description) from exc
        return _finish(loaded, exif_transpose, description)

    try:
        # Pillow's decompression-bomb guard stays on (never disabled globally); its error becomes a ValueError.
        image = Image.open(io.BytesIO(loaded) if isinstance(loaded, bytes) else loaded)
    except Exception as exc:
        raise _decode_error(exc, description) from exc
    try:
        try:
            image.load()  # Image.open is lazy: truncated data only fails here
        except Exception as exc:
            raise _decode_error(exc, description) from exc
        return _finish(image, exif_transpose, description)
    finally:
        image.close()  # _finish returned an independent copy


def _decode_error(exc: Exception, description: str) -> Exception:
    if isinstance(exc, Image.DecompressionBombError):
        match = _PIXELS_RE.search(str(exc))
        pixels = f"{int(match.group(1))} pixels" if match else "too many pixels"
        return ValueError(
            f"refusing to decode image {description}: {pixels} exceeds Pillow's decompression-bomb limit of "
            f"{2 * Image.MAX_IMAGE_PIXELS} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS); downscale the image first"
        )
    return ValueError(f"cannot decode image {description}: {exc}. Accepted: a complete image in {ACCEPTED_FORMATS}")


def _finish(image: Image.Image, exif_transpose: bool, description: str) -> Image.Image:
    try:
        if exif_transpose:
            image = ImageOps.exif_transpose(image)  # returns a copy; the caller's image is never modified
        rgb = _to_rgb(image)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot convert image {description} of mode {image.mode!r} to RGB: {exc}") from exc
    if rgb.width < 1 or rgb.height < 1:
        raise ValueError(f"image {description} has no pixels (size {rgb.width}x{rgb.height})")
    return rgb


def load_image(
    source: ImageSource,
    input_size: int = DEFAULT_IMAGE_SIZE,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    exif_transpose: bool = True,
) -> torch.Tensor:
    """The model-card `load_image`: any source → (T, 3, S, S) float32 tiles (thumbnail last when T > 1)."""
    input_size = _check_int("input_size", input_size, 1)
    _check_tile_limits(min_num, max_num)  # fail before any I/O
    image = open_image(source, exif_transpose=exif_transpose)
    tiles = dynamic_preprocess(
        image, min_num=min_num, max_num=max_num, image_size=input_size, use_thumbnail=use_thumbnail
    )
    return to_tensor(tiles, image_size=input_size)
