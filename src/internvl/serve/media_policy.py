"""What the media layer may fetch and decode (`MediaPolicy`) and how it fails (`MediaError`).

Spec: SERVING.md §2.2 (internal error codes), §5 (media safety), §14 (safe defaults). Every default below is the
§14 value; the server builds one policy from its flags at start-up and passes it to every call of `serve.media`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

# Internal error codes of SERVING.md §2.2 that this layer raises. The HTTP layer maps them to status/type/code.
INVALID_IMAGE = "INVALID_IMAGE"  # the bytes are not an acceptable image (or video): format, base64, pixel cap
INVALID_IMAGE_URL = "INVALID_IMAGE_URL"  # the URL is not acceptable: scheme, destination, upstream status, caps
TOO_MANY_IMAGES = "TOO_MANY_IMAGES"  # more video frames asked for than the policy allows
INVALID_REQUEST = "INVALID_REQUEST"  # a malformed argument that is not about the media itself (e.g. num_frames=0)

MB = 1024 * 1024

# Resolver signature: (host, port) -> every address the name resolves to, as strings ("203.0.113.7", "2001:db8::1").
Resolver = Callable[[str, int], Sequence[str]]


class MediaError(ValueError):
    """A client-caused media failure; never a server fault (SERVING.md §2.2: client mistakes are never 5xx).

    `code` is the internal code of §2.2, `message` one actionable sentence that never contains a resolved IP address,
    `param` the JSON path of the offending field (the caller may set it after the fact), and `reason` a short stable
    slug for the `media_fetch_failures_total{reason}` metric (e.g. "blocked_address", "timeout", "too_large").
    """

    def __init__(self, code: str, message: str, param: str | None = None, reason: str = "invalid"):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.reason = reason

    def __repr__(self) -> str:
        return f"MediaError(code={self.code!r}, reason={self.reason!r}, param={self.param!r}, message={self.message!r})"


@dataclass(frozen=True)
class MediaPolicy:
    """Limits and permissions for loading images and videos named by URLs in requests.

    The defaults are SERVING.md §14's safe defaults: no `file://`, any public host on the scheme's default port, no
    private/loopback/link-local/metadata destinations, 3 s connect / 10 s (image) or 30 s (video) total fetch time,
    20 MB of bytes, 40 M pixels, at most 3 redirects.
    """

    # file:// URLs are accepted only for files whose resolved path lies inside this directory (None: file:// off).
    allowed_local_media_path: Path | None = None
    # Exact host names (case-insensitive, no implicit subdomains), optionally "host:port" to admit a non-default
    # port; IPv6 literals as "[::1]:8080". None admits any public host, on the scheme's default port only.
    allowed_media_domains: tuple[str, ...] | None = None
    # SECURITY: tests and trusted deployments only. Turns off the private/loopback/link-local address check (cloud
    # metadata names and addresses stay blocked, connections stay pinned to the resolved address).
    allow_private_networks: bool = False

    connect_timeout_s: float = 3.0  # per connection attempt, also bounds name resolution
    image_fetch_timeout_s: float = 10.0  # whole remote fetch of one image, all redirect hops included
    video_fetch_timeout_s: float = 30.0  # same for one video
    decode_timeout_s: float = 10.0  # decoding one image, or sampling the frames of one video
    max_bytes: int = 20 * MB  # image bytes: remote body, decoded data URL, or local file
    max_video_bytes: int = 20 * MB  # the same cap for videos
    max_pixels: int = 40_000_000  # width·height of one image, checked from the header before pixels are decoded
    max_video_frame_pixels: int = 3840 * 2160  # width·height of one video frame (frames are kept in memory together)
    max_video_frames: int = 32  # frames one video may be sampled into (the model card's default num_segments)
    max_redirects: int = 3  # each hop is fully revalidated (§5.3 step 5)
    max_concurrent_fetches: int = 4  # per request, used by `aload_images` (§5.3 step 9)
    apply_exif_orientation: bool = False  # False = reference parity (EXIF orientation ignored), §5.5
    ca_bundle: Path | None = None  # PEM file of trusted CAs for https; None uses certifi's bundle
    # Name resolution; None uses the system resolver. Injectable so tests can map fake names without a network.
    resolve: Resolver | None = field(default=None, compare=False)
    # Derived from allowed_media_domains: {(normalized host, port or None for the default port)}; None = any host.
    allowed_hosts: frozenset[tuple[str, int | None]] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "image_fetch_timeout_s", "video_fetch_timeout_s", "decode_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"MediaPolicy.{name} must be a positive number of seconds, got {value!r}")
        for name, minimum in (
            ("max_bytes", 1),
            ("max_video_bytes", 1),
            ("max_pixels", 1),
            ("max_video_frame_pixels", 1),
            ("max_video_frames", 1),
            ("max_redirects", 0),
            ("max_concurrent_fetches", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"MediaPolicy.{name} must be an integer >= {minimum}, got {value!r}")
        # An accepted image must never reach Pillow's decompression-bomb warning: with the cap at or below Pillow's
        # threshold the warning cannot fire for anything we decode, which is how §5.5's "treat the warning as an
        # error" holds without touching the process-wide warnings filters (they are not thread-safe).
        pillow_limit = Image.MAX_IMAGE_PIXELS
        for name in ("max_pixels", "max_video_frame_pixels"):
            if pillow_limit is not None and getattr(self, name) > pillow_limit:
                raise ValueError(
                    f"MediaPolicy.{name}={getattr(self, name)} is above Pillow's decompression-bomb threshold "
                    f"({pillow_limit} pixels); use a value <= {pillow_limit}"
                )
        if self.allowed_local_media_path is not None:
            object.__setattr__(self, "allowed_local_media_path", Path(self.allowed_local_media_path))
        if self.ca_bundle is not None:
            object.__setattr__(self, "ca_bundle", Path(self.ca_bundle))
        allowed_hosts: frozenset[tuple[str, int | None]] | None = None
        if self.allowed_media_domains is not None:
            if isinstance(self.allowed_media_domains, str):
                raise ValueError(
                    "MediaPolicy.allowed_media_domains must be a tuple of host names, got a single string; "
                    "write ('example.com',)"
                )
            object.__setattr__(self, "allowed_media_domains", tuple(self.allowed_media_domains))
            # Parsed now so a bad entry fails at start-up, not on the first request.
            allowed_hosts = frozenset(parse_allowed_domain(entry) for entry in self.allowed_media_domains)
        object.__setattr__(self, "allowed_hosts", allowed_hosts)


def normalize_host(host: str) -> str:
    """The comparable form of a URL host: ASCII (IDNA) lower case, no IPv6 brackets, no trailing root dot."""
    host = host.strip("[]").lower()
    return host[:-1] if host.endswith(".") else host


def parse_allowed_domain(entry: str) -> tuple[str, int | None]:
    """'Example.COM' -> ('example.com', None); 'img.test:8080' -> ('img.test', 8080); '[::1]:81' -> ('::1', 81)."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"allowed media domain entries must be non-empty strings, got {entry!r}")
    text = entry.strip()
    usage = "a bare host name or host:port (e.g. 'images.example.com' or 'images.example.com:8443'), not a URL"
    if any(c in text for c in "/@?#\\ "):
        raise ValueError(f"allowed media domain {entry!r} must be {usage}")
    # Split the port by hand: httpx.URL folds ':80' into "default port", which would lose it for https.
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and port_text is None):
            raise ValueError(f"allowed media domain {entry!r} must be {usage}")
    else:
        host, _, port_text = text.partition(":") if text.count(":") == 1 else (text, "", None)
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"allowed media domain {entry!r} has an invalid port; use a number in 1..65535")
        port = int(port_text)
    try:
        raw_host = httpx.URL(f"http://[{host}]/" if ":" in host else f"http://{host}/").raw_host
    except httpx.InvalidURL as exc:
        raise ValueError(f"allowed media domain {entry!r} is not a valid host name: {exc}") from exc
    host = normalize_host(raw_host.decode("ascii"))
    if not host:
        raise ValueError(f"allowed media domain {entry!r} must be {usage}")
    return host, port
