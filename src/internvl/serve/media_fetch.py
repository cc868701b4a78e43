"""SSRF-safe download of http(s) media URLs: validate, resolve once, check every address, connect to that address.

Spec: SERVING.md §5.3 (steps 1–10), §13 D (cases 27–34), §14 (defaults).

How pinning works (step 4, "no DNS rebinding"). The URL is parsed once with `httpx.URL` (IDNA, percent-encoding,
IPv6 literals). Its host is resolved once, in a worker thread with the connect timeout, and every returned address
must be globally routable (`blocked_reason`). The request is then sent through httpx's own connection layer,
`httpcore.AsyncConnectionPool`, built with a custom network backend (`_PinnedBackend`) whose `connect_tcp` ignores
name resolution entirely and dials only the validated addresses. Everything above the socket is httpcore's unchanged
code path, so the `Host` header is the URL's host, TLS SNI is the URL's host, and the certificate is verified against
the URL's host (ssl `check_hostname`), never against the IP. We use httpcore directly rather than `httpx.AsyncClient`
with a custom transport because the client would add nothing here and takes things away: it reads proxy settings
from the environment (a proxy resolves the name itself, undoing the pin), follows redirects itself (each hop must be
revalidated here) and decodes gzip transparently (the byte cap must count the bytes on the wire).

Redirects are followed by hand, at most `max_redirects`, and each `Location` goes through every check again. The
whole fetch, all hops included, runs under one total timeout, so a server that stalls or drips one byte a second fails
at that deadline; the body is streamed with a byte counter and abandoned at cap + 1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import certifi
import httpcore
import httpx

from internvl.serve.media_policy import INVALID_IMAGE, INVALID_IMAGE_URL, MediaError, MediaPolicy, normalize_host
from internvl.serve.timeouts import within

logger = logging.getLogger(__name__)

# Blocking work of this layer (name resolution, file reads, decoding) runs here rather than in the event loop's
# default executor: the thread count bounds it, and a hung resolver cannot delay the shutdown of the short-lived
# event loops that the synchronous API runs.
BLOCKING_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="internvl-media")

MAX_URL_CHARS = 8192  # http(s) URLs only; data URLs are bounded by the byte caps
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024

# --------------------------------------------------------------------------------------------------------------
# Which addresses may be fetched from (§5.3 step 3)
# --------------------------------------------------------------------------------------------------------------

# Cloud instance-metadata endpoints stay blocked even with allow_private_networks: nothing legitimate serves
# images there, and reaching them from a server leaks its credentials.
METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.169.253", "100.100.100.200", "fd00:ec2::254")
)

_V4, _V6 = ipaddress.IPv4Network, ipaddress.IPv6Network
# IANA IPv4 special-purpose registry and friends; nothing in here is a public web server.
_BLOCKED_V4 = (
    (_V4("0.0.0.0/8"), "unspecified"),  # "this network"; 0.0.0.0 reaches the local host on Linux
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "shared (carrier-grade NAT)"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),  # includes 169.254.169.254, the cloud metadata address
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "IETF protocol assignments"),
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("192.88.99.0/24"), "6to4 relay anycast"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("240.0.0.0/4"), "reserved or broadcast"),  # includes 255.255.255.255
)
# IPv6: only global unicast 2000::/3 is acceptable, minus the special blocks inside it. The forms that embed an IPv4
# address are judged by the embedded address (checked before this table).
_GLOBAL_UNICAST_V6 = _V6("2000::/3")
_BLOCKED_V6 = (
    (_V6("2001::/23"), "IETF protocol assignments"),  # Teredo, benchmarking, ORCHID, ...
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
)
_NAT64_V6 = _V6("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are the IPv4 destination
_6TO4_V6 = _V6("2002::/16")  # 6to4: bits 16..47 are the IPv4 address of the tunnel end point


def _v6_class(address: ipaddress.IPv6Address) -> str:
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_multicast:
        return "multicast"
    if address.is_link_local:
        return "link-local"
    if address in _V6("fc00::/7"):
        return "unique-local"
    return "reserved"


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 (2002::/16) IPv6 address, else None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64_V6:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _6TO4_V6:
        return address.sixtofour
    return None


def blocked_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `address` must not be fetched from ("loopback", "private", "link-local", ...); None if it is public."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            reason = blocked_reason(inner)
            return None if reason is None else f"{reason} (embedded in IPv6)"
        if address not in _GLOBAL_UNICAST_V6:
            return _v6_class(address)
        table = _BLOCKED_V6
    else:
        table = _BLOCKED_V4
    for network, reason in table:
        if address in network:
            return reason
    return None


def dial_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address to open the socket to: an IPv4-mapped IPv6 address is dialled as plain IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# --------------------------------------------------------------------------------------------------------------
# URL checks (§5.3 steps 1–2)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One validated http(s) request target. `host` is ASCII (IDNA), lower case, without brackets or trailing dot."""

    url: httpx.URL
    scheme: str
    host: str
    port: int  # the effective port (80/443 when the URL has none)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def _url_error(message: str, reason: str) -> MediaError:
    return MediaError(INVALID_IMAGE_URL, message, reason=reason)


def check_raw_url(text: str) -> None:
    """Checks on the string itself, before any parser can reinterpret it (§5.3 step 1)."""
    if len(text) > MAX_URL_CHARS:
        raise _url_error(f"The media URL is {len(text)} characters long; the limit is {MAX_URL_CHARS}.", "malformed")
    if _CONTROL_OR_SPACE.search(text):
        raise _url_error("The media URL contains spaces or control characters; percent-encode them.", "malformed")
    if "\\" in text:
        # Browsers read "https://a.com\@b.com/" as host a.com, other parsers as host b.com: refuse the ambiguity.
        raise _url_error("The media URL contains a backslash; percent-encode it as %5C.", "malformed")
    authority = text.split("://", 1)[1] if "://" in text else ""
    authority = re.split(r"[/?#]", authority, maxsplit=1)[0]
    if "@" in authority:
        raise _url_error("Media URLs with credentials (user@host) are not allowed; remove the user info.", "userinfo")


def check_url(text: str, policy: MediaPolicy) -> Target:
    """Parse and validate an http(s) URL against the scheme, host, port and domain rules (§5.3 steps 1–2)."""
    check_raw_url(text)
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise _url_error(
            f"The media URL could not be parsed ({exc}); send an absolute http(s) URL.", "malformed"
        ) from None
    scheme = url.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _url_error(
            f"URL scheme {scheme!r} is not allowed for media; use https://, http:// or a data: URL.", "scheme"
        )
    if url.userinfo:
        raise _url_error("Media URLs with credentials (user@host) are not allowed; remove the user info.", "userinfo")
    host = normalize_host(url.raw_host.decode("ascii"))
    if not host:
        raise _url_error("The media URL has no host name; send an absolute http(s) URL.", "malformed")
    port = url.port if url.port is not None else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise _url_error(f"The media URL has an invalid port {port}; ports are 1..65535.", "malformed")

    allowed = policy.allowed_hosts
    if allowed is not None:
        on_default_port = port == _DEFAULT_PORTS[scheme]
        if (host, port) not in allowed and not (on_default_port and (host, None) in allowed):
            if any(h == host for h, _ in allowed):
                raise _url_error(f"Port {port} is not allowed for this media host; use the allowed port.", "port")
            raise _url_error("The media URL's host is not in this server's list of allowed media domains.", "domain")
    elif port != _DEFAULT_PORTS[scheme]:
        raise _url_error(
            f"Media URLs on non-default ports (here {port}) are not allowed; use port {_DEFAULT_PORTS[scheme]}.",
            "port",
        )
    if host in METADATA_HOSTS:
        raise _url_error(
            "URL not allowed: media URLs must point to a public host, not a cloud metadata service.", "blocked_address"
        )
    return Target(url=url, scheme=scheme, host=host, port=port)


# --------------------------------------------------------------------------------------------------------------
# Resolution (§5.3 step 3)
# --------------------------------------------------------------------------------------------------------------


def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver returns for host (numeric spellings like 2130706433 included)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


_NOT_PUBLIC = "URL not allowed: media URLs must point to a public internet host, not a private or local network."


async def resolve_and_check(target: Target, policy: MediaPolicy) -> list[str]:
    """Resolve the host once and check every address; returns the addresses to dial, in resolver order."""
    try:
        addresses = [ipaddress.ip_address(target.host)]  # an IP literal needs no resolution
    except ValueError:
        resolve = policy.resolve or system_resolve
        loop = asyncio.get_running_loop()
        try:
            raw = await within(
                loop.run_in_executor(BLOCKING_POOL, resolve, target.host, target.port), policy.connect_timeout_s
            )
        except asyncio.TimeoutError:
            raise _url_error("The media URL's host name did not resolve in time; check the URL.", "dns") from None
        except (OSError, UnicodeError) as exc:
            logger.debug("resolving media host %r failed: %s", target.host, exc)
            raise _url_error("The media URL's host name could not be resolved; check the URL.", "dns") from None
        try:
            # A scope id ("fe80::1%eth0") names an interface, not a different address.
            addresses = [ipaddress.ip_address(str(a).split("%", 1)[0]) for a in raw]
        except ValueError:
            raise _url_error(_NOT_PUBLIC, "blocked_address") from None
    if not addresses:
        raise _url_error("The media URL's host name could not be resolved; check the URL.", "dns")
    for address in addresses:
        # Every address must pass (§13 #34): a name with one public and one private address is refused, since the
        # client could not tell which one a later connection would use.
        reason = blocked_reason(address)
        always_blocked = reason is not None and reason.startswith("cloud metadata")
        if always_blocked or (reason is not None and not policy.allow_private_networks):
            logger.warning("blocked media fetch: host %r resolves to %s (%s)", target.host, address, reason)
            raise _url_error(_NOT_PUBLIC, "blocked_address")
    return list(dict.fromkeys(dial_address(a) for a in addresses))


# --------------------------------------------------------------------------------------------------------------
# The pinned connection (§5.3 step 4)
# --------------------------------------------------------------------------------------------------------------


def dial_target(address: str, port: int) -> tuple[str, int]:
    """Where the socket for a validated (address, port) is opened: exactly there.

    A seam for tests only: they replace it to route a fake public address to a loopback stub server and to fail on
    any other dial, so no test ever sends a packet off the machine.
    """
    return address, port


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that can reach one (host, port) and only through the addresses validated for it."""

    def __init__(self, target: Target, addresses: list[str]):
        self._target = target
        self._addresses = addresses
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        # httpcore asks for the URL's host; anything else means a parser disagreement, so fail closed.
        if normalize_host(host) != self._target.host or port != self._target.port:
            raise httpcore.ConnectError("refusing to connect to a destination that was not validated")
        last_error: Exception | None = None
        for address in self._addresses:  # the resolver's order; the next address only if a connect fails
            dial_host, dial_port = dial_target(address, port)
            try:
                return await self._inner.connect_tcp(dial_host, dial_port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None  # _addresses is never empty
        raise last_error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are never used for media fetches")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@lru_cache(maxsize=4)
def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    # create_default_context: certificate verification and hostname checking on, modern protocol floor.
    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle is not None else certifi.where())


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _acceptable_content_type(value: str | None, kind: str) -> bool:
    # Missing or generic binary types are common for images on object stores; the decoder has the final word.
    if value is None:
        return True
    mime = value.split(";", 1)[0].strip().lower()
    return mime in ("", "application/octet-stream", "binary/octet-stream") or mime.startswith(f"{kind}/")


async def _fetch_once(target: Target, addresses: list[str], policy: MediaPolicy, kind: str, cap: int, timeout: float):
    """One GET on the pinned connection: ('redirect', location) or ('body', bytes). Raises MediaError otherwise."""
    headers = [
        (b"Host", target.host_header.encode("ascii")),
        (b"User-Agent", b"internvl-media-fetch"),
        (b"Accept", f"{kind}/*".encode("ascii")),
        (b"Accept-Encoding", b"identity"),  # never decompress: the cap counts wire bytes, no gzip bombs
    ]
    url = httpcore.URL(
        scheme=target.scheme.encode("ascii"), host=target.host.encode("ascii"), port=target.port,
        target=target.url.raw_path,
    )  # fmt: skip
    extensions = {"timeout": {"connect": policy.connect_timeout_s, "read": timeout, "write": timeout, "pool": timeout}}
    backend = _PinnedBackend(target, addresses)
    async with httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(policy.ca_bundle), network_backend=backend, http1=True, http2=False, retries=0
    ) as pool:
        async with pool.stream("GET", url, headers=headers, extensions=extensions) as response:
            status = response.status
            if status in _REDIRECT_STATUSES:
                location = _header(response.headers, b"location")
                if location:
                    return "redirect", location
            if not 200 <= status < 300:
                raise _url_error(
                    f"The media URL returned HTTP {status}; it must answer 2xx with the {kind} bytes.",
                    "upstream_status",
                )
            content_type = _header(response.headers, b"content-type")
            if not _acceptable_content_type(content_type, kind):
                raise MediaError(
                    INVALID_IMAGE,
                    f"The media URL returned Content-Type {content_type.split(';')[0]!r}, which is not {kind} data.",
                    reason="content_type",
                )
            declared = _header(response.headers, b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise _url_error(
                    f"The {kind} at the media URL is {int(declared)} bytes; the limit is {cap} bytes.", "too_large"
                )
            body = bytearray()
            async for chunk in response.aiter_stream():
                body += chunk
                if len(body) > cap:  # a missing or false Content-Length: stop reading at cap + 1
                    raise _url_error(
                        f"The {kind} at the media URL is larger than the limit of {cap} bytes.", "too_large"
                    )
            return "body", bytes(body)


async def _follow(url: str, policy: MediaPolicy, kind: str, cap: int, timeout: float) -> bytes:
    current = url
    for _hop in range(policy.max_redirects + 1):
        target = check_url(current, policy)
        addresses = await resolve_and_check(target, policy)
        try:
            what, value = await _fetch_once(target, addresses, policy, kind, cap, timeout)
        except httpcore.TimeoutException:
            raise _url_error(f"The media URL did not answer in time (limit {timeout:g} s).", "timeout") from None
        except httpcore.ConnectError:
            raise _url_error(
                "Could not connect to the media URL's host (connection or TLS certificate failed).", "connect"
            ) from None
        except (httpcore.NetworkError, httpcore.ProtocolError):
            raise _url_error("The media URL's server sent a broken HTTP response.", "upstream_protocol") from None
        if what == "body":
            return value
        check_raw_url(value)  # the raw Location, before joining can normalize anything away
        try:
            current = str(target.url.join(value))
        except (httpx.InvalidURL, ValueError):
            raise _url_error("The media URL redirected to an invalid location.", "malformed") from None
    raise _url_error(
        f"The media URL redirected more than {policy.max_redirects} times; send the final URL.", "redirects"
    )


async def fetch_url(url: str, policy: MediaPolicy, kind: str = "image") -> bytes:
    """Download an http(s) media URL under every rule of SERVING.md §5.3; `kind` is "image" or "video"."""
    cap = policy.max_video_bytes if kind == "video" else policy.max_bytes
    timeout = policy.video_fetch_timeout_s if kind == "video" else policy.image_fetch_timeout_s
    try:
        return await within(_follow(url, policy, kind, cap, timeout), timeout)
    except asyncio.TimeoutError:
        raise _url_error(
            f"Fetching the {kind} URL took longer than the limit of {timeout:g} s; use a faster or smaller source.",
            "timeout",
        ) from None
