"""Remote media fetching against SERVING.md §5.3 and §13 D (cases 27–34).

Only loopback stub servers are contacted. Host names are resolved by a fake resolver; a fake *public* address is
rerouted to the stub by `DialGuard` (which fails the test on any other off-machine dial), so the SSRF check sees a
public address while the bytes come from 127.0.0.1. "Never contacted" is shown twice: the stub's hit counter for the
path stays 0, and the guard saw no dial to the blocked address.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import time

import pytest
from PIL import Image

from internvl.serve import media_fetch
from internvl.serve.media import MediaError, MediaPolicy, aload_image_url, aload_images, load_image_url
from internvl.serve.media_fetch import blocked_reason, embedded_ipv4

from .media_stub import (
    PUBLIC_V4,
    PUBLIC_V6,
    DialGuard,
    FakeResolver,
    StubServer,
    drip,
    endless,
    redirect,
    respond,
    short_body,
    stall,
)


def png_bytes(size=(6, 4), colour=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes()


@pytest.fixture
def guard(monkeypatch):
    guard = DialGuard()
    monkeypatch.setattr(media_fetch, "dial_target", guard)
    return guard


@pytest.fixture
def stub():
    server = StubServer()
    server.routes["/img.png"] = respond(200, PNG)
    yield server
    server.close()


@pytest.fixture
def resolver(stub):
    return FakeResolver({"img.test": [PUBLIC_V4], "cdn.test": [PUBLIC_V4], "v6.test": [PUBLIC_V6]})


def make_policy(stub, resolver, extra_domains=(), **overrides) -> MediaPolicy:
    """The default policy with short test timeouts, the fake resolver, and the stub's port allowlisted for the
    public test names (a non-default port needs an allowlist entry, §5.3 step 1)."""
    domains = tuple(f"{name}:{stub.port}" for name in ("img.test", "cdn.test", "v6.test")) + tuple(extra_domains)
    settings = dict(
        allowed_media_domains=domains,
        resolve=resolver,
        connect_timeout_s=0.5,
        image_fetch_timeout_s=1.0,
    )
    settings.update(overrides)
    return MediaPolicy(**settings)


def assert_media_error(call, code="INVALID_IMAGE_URL", reason=None) -> MediaError:
    with pytest.raises(MediaError) as info:
        call()
    error = info.value
    assert error.code == code, error
    if reason is not None:
        assert error.reason == reason, error
    assert error.message and "Traceback" not in error.message
    return error


# ---------------------------------------------------------------------------------------------------------------
# The address validator (§5.3 step 3, §13 #27)
# ---------------------------------------------------------------------------------------------------------------

BLOCKED = {
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "10.0.0.1": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "100.64.0.1": "shared",
    "100.127.255.254": "shared",
    "169.254.169.254": "cloud metadata",
    "169.254.1.1": "link-local",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "unspecified",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "255.255.255.255": "broadcast",
    "240.0.0.1": "reserved",
    "192.0.2.1": "documentation",
    "198.51.100.7": "documentation",
    "203.0.113.9": "documentation",
    "198.18.0.1": "benchmarking",
    "192.0.0.8": "IETF",
    "100.100.100.200": "cloud metadata",
    "::": "unspecified",
    "::1": "loopback",
    "fe80::1": "link-local",
    "fc00::1": "unique-local",
    "fd12:3456::1": "unique-local",
    "fd00:ec2::254": "cloud metadata",
    "ff02::1": "multicast",
    "fec0::1": "reserved",
    "100::1": "reserved",
    "::127.0.0.1": "reserved",  # deprecated IPv4-compatible form
    "::ffff:127.0.0.1": "loopback (embedded",
    "::ffff:10.0.0.1": "private (embedded",
    "::ffff:169.254.169.254": "cloud metadata (embedded",
    "2002:a9fe:a9fe::1": "cloud metadata (embedded",  # 6to4 around 169.254.169.254
    "2002:7f00:1::1": "loopback (embedded",  # 6to4 around 127.0.0.1
    "64:ff9b::7f00:1": "loopback (embedded",  # NAT64 around 127.0.0.1
    "64:ff9b::a00:1": "private (embedded",  # NAT64 around 10.0.0.1
    "2001:db8::1": "documentation",
    "2001::1": "IETF",  # Teredo
    "3fff::1": "documentation",
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "11.0.0.1", "2001:4860:4860::8888",
          "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]  # fmt: skip


@pytest.mark.parametrize("address", sorted(BLOCKED))
def test_validator_blocks_every_non_global_class(address):
    reason = blocked_reason(ipaddress.ip_address(address))
    assert reason is not None and BLOCKED[address] in reason, (address, reason)


@pytest.mark.parametrize("address", PUBLIC)
def test_validator_admits_public_addresses(address):
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_embedded_ipv4_forms():
    assert str(embedded_ipv4(ipaddress.IPv6Address("::ffff:169.254.169.254"))) == "169.254.169.254"
    assert str(embedded_ipv4(ipaddress.IPv6Address("64:ff9b::a9fe:a9fe"))) == "169.254.169.254"
    assert str(embedded_ipv4(ipaddress.IPv6Address("2002:a9fe:a9fe::1"))) == "169.254.169.254"
    assert embedded_ipv4(ipaddress.IPv6Address("2001:4860::1")) is None


@pytest.mark.parametrize("address", sorted(BLOCKED))
def test_blocked_resolution_is_never_dialled(stub, resolver, guard, address):
    resolver.table["evil.test"] = [address]
    policy = make_policy(stub, resolver, extra_domains=[f"evil.test:{stub.port}"])
    error = assert_media_error(
        lambda: load_image_url(f"http://evil.test:{stub.port}/img.png", policy, "messages[0].content[0].image_url.url"),
        reason="blocked_address",
    )
    assert error.param == "messages[0].content[0].image_url.url"
    assert address not in error.message and "evil.test" not in error.message  # the address is never echoed
    assert guard.dials == [] and stub.hits["/img.png"] == 0


def test_one_private_address_among_public_ones_blocks(stub, resolver, guard):
    resolver.table["mixed.test"] = [PUBLIC_V4, "10.0.0.1"]  # §13 #34: every address must pass
    policy = make_policy(stub, resolver, extra_domains=[f"mixed.test:{stub.port}"])
    assert_media_error(
        lambda: load_image_url(f"http://mixed.test:{stub.port}/img.png", policy), reason="blocked_address"
    )
    assert guard.dials == [] and stub.hits["/img.png"] == 0


@pytest.mark.parametrize(
    "host, reason",
    [
        ("127.0.0.1", "blocked_address"),
        ("2130706433", "blocked_address"),  # decimal
        ("0x7f000001", "blocked_address"),  # hex
        ("017700000001", "blocked_address"),  # octal
        ("127.1", "blocked_address"),  # short form
        ("0x7f.0.0.1", "blocked_address"),
        ("0177.0.0.1", "malformed"),  # dotted octal: httpx's parser already refuses it as an invalid IPv4 address
    ],
)
def test_numeric_loopback_spellings_are_refused_before_connecting(stub, guard, host, reason):
    """§13 #27: the system resolver turns these spellings into 127.0.0.1, and the check runs on its answer."""
    assert socket.inet_aton(host) == b"\x7f\x00\x00\x01"  # the C library reads each spelling as 127.0.0.1
    policy = MediaPolicy(connect_timeout_s=0.5)
    error = assert_media_error(lambda: load_image_url(f"http://{host}/img.png", policy), reason=reason)
    assert "127.0.0.1" not in error.message
    assert guard.dials == []


def test_loopback_stub_by_address_is_blocked_even_when_allowlisted(stub, guard):
    policy = MediaPolicy(allowed_media_domains=(f"127.0.0.1:{stub.port}",), connect_timeout_s=0.5)
    assert_media_error(
        lambda: load_image_url(f"http://127.0.0.1:{stub.port}/img.png", policy), reason="blocked_address"
    )
    assert guard.dials == [] and stub.hits["/img.png"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]/img.png",
        "http://[::ffff:127.0.0.1]/img.png",
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/img.png",
        "http://localhost/img.png",
        "http://10.0.0.1/img.png",
    ],
)
def test_literal_and_local_destinations_are_blocked(guard, url):
    error = assert_media_error(
        lambda: load_image_url(url, MediaPolicy(connect_timeout_s=0.5)), reason="blocked_address"
    )
    assert "169.254" not in error.message and "127.0.0.1" not in error.message and "::1" not in error.message
    assert guard.dials == []


@pytest.mark.parametrize("host", ["metadata.google.internal", "metadata", "instance-data", "METADATA.Google.Internal."])
def test_metadata_names_are_blocked_even_with_private_networks_allowed(guard, host):
    resolver = FakeResolver({host.lower().rstrip("."): ["8.8.8.8"]})  # even if it resolved somewhere public
    policy = MediaPolicy(allow_private_networks=True, resolve=resolver)
    assert_media_error(lambda: load_image_url(f"http://{host}/computeMetadata/v1/", policy), reason="blocked_address")
    assert guard.dials == [] and resolver.calls == []


@pytest.mark.parametrize("address", ["169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"])
def test_metadata_addresses_stay_blocked_with_private_networks_allowed(guard, address):
    policy = MediaPolicy(allow_private_networks=True, resolve=FakeResolver({"meta.test": [address]}))
    assert_media_error(lambda: load_image_url("http://meta.test/x.png", policy), reason="blocked_address")
    assert guard.dials == []


# ---------------------------------------------------------------------------------------------------------------
# The public path: pinning, Host header, resolution once
# ---------------------------------------------------------------------------------------------------------------


def test_public_host_is_fetched_from_the_validated_address_with_its_own_host_header(stub, resolver, guard):
    image = load_image_url(f"http://img.test:{stub.port}/img.png", make_policy(stub, resolver))
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((0, 0)) == (200, 30, 60)
    assert guard.dials == [(PUBLIC_V4, stub.port)]
    assert stub.hits["/img.png"] == 1 and stub.hosts == [f"img.test:{stub.port}"]
    assert resolver.calls == ["img.test"]


def test_resolution_happens_once_so_rebinding_cannot_redirect_the_connection(stub, guard):
    """A resolver that answers public first and loopback afterwards (DNS rebinding) is asked exactly once."""
    answers = iter([[PUBLIC_V4], ["127.0.0.1"], ["127.0.0.1"]])
    calls = []

    def rebinding(host, port):
        calls.append(host)
        return next(answers)

    policy = MediaPolicy(allowed_media_domains=(f"img.test:{stub.port}",), resolve=rebinding, connect_timeout_s=0.5)
    load_image_url(f"http://img.test:{stub.port}/img.png", policy)
    assert calls == ["img.test"] and guard.dials == [(PUBLIC_V4, stub.port)]


def test_ipv4_mapped_public_address_is_dialled_as_ipv4(stub, resolver, guard):
    resolver.table["mapped.test"] = ["::ffff:8.8.8.8"]
    policy = make_policy(stub, resolver, extra_domains=[f"mapped.test:{stub.port}"])
    load_image_url(f"http://mapped.test:{stub.port}/img.png", policy)
    assert guard.dials == [("8.8.8.8", stub.port)]


def test_ipv6_public_address_path(stub, resolver, guard):
    load_image_url(f"http://v6.test:{stub.port}/img.png", make_policy(stub, resolver))
    assert guard.dials == [(PUBLIC_V6, stub.port)] and stub.hits["/img.png"] == 1


def test_private_networks_escape_hatch_reaches_loopback(stub, guard):
    policy = MediaPolicy(
        allow_private_networks=True,
        allowed_media_domains=(f"stub.test:{stub.port}",),
        resolve=FakeResolver({"stub.test": ["127.0.0.1"]}),
    )
    assert load_image_url(f"http://stub.test:{stub.port}/img.png", policy).size == (6, 4)
    assert guard.dials == [("127.0.0.1", stub.port)] and stub.hosts == [f"stub.test:{stub.port}"]


def test_pinned_backend_refuses_a_host_it_was_not_built_for():
    target = media_fetch.check_url("http://img.test/x", MediaPolicy())
    backend = media_fetch._PinnedBackend(target, ["127.0.0.1"])
    with pytest.raises(Exception, match="not validated"):
        asyncio.run(backend.connect_tcp("other.test", 80))


# ---------------------------------------------------------------------------------------------------------------
# URL rules: schemes, userinfo, backslashes, ports, allowlist (§5.3 steps 1–2, §13 #30)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["ftp://img.test/a.png", "gopher://img.test/", "javascript:alert(1)", "blob:https://img.test/uuid",
     "ws://img.test/", "dict://img.test:11211/", "ldap://img.test/", "jar:http://img.test/!/", "sftp://img.test/x"],
)  # fmt: skip
def test_unsupported_schemes(guard, url):
    policy = MediaPolicy(resolve=FakeResolver({"img.test": [PUBLIC_V4]}))
    assert_media_error(lambda: load_image_url(url, policy), reason="scheme")
    assert guard.dials == []


@pytest.mark.parametrize(
    "url, reason",
    [
        ("https://img.test\\@evil.test/x.png", "malformed"),
        ("https://img.test/\\x.png", "malformed"),
        ("http://user@img.test/x.png", "userinfo"),
        ("http://user:pw@img.test/x.png", "userinfo"),
        ("http://@img.test/x.png", "userinfo"),
        ("http:///x.png", "malformed"),
        ("http://img.test/a b.png", "malformed"),
        ("http://img.test/a\nb.png", "malformed"),
        ("http://img.test:99999/x.png", "malformed"),
        ("http://img.test/" + "a" * 9000, "malformed"),
        ("http://img.test:8080/x.png", "port"),
        ("https://img.test:80/x.png", "port"),
    ],
)
def test_malformed_or_disallowed_urls(guard, url, reason):
    resolver = FakeResolver({"img.test": [PUBLIC_V4], "evil.test": [PUBLIC_V4]})
    assert_media_error(lambda: load_image_url(url, MediaPolicy(resolve=resolver)), reason=reason)
    assert guard.dials == [] and resolver.calls == []


def test_domain_allowlist_is_exact_and_case_insensitive(stub, resolver, guard):
    resolver.table["sub.img.test"] = [PUBLIC_V4]
    policy = make_policy(stub, resolver)
    assert load_image_url(f"http://IMG.Test:{stub.port}/img.png", policy).size == (6, 4)
    assert_media_error(lambda: load_image_url(f"http://sub.img.test:{stub.port}/img.png", policy), reason="domain")
    assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port + 1}/img.png", policy), reason="port")
    assert resolver.calls == ["img.test"]


def test_policy_rejects_bad_allowlist_entries():
    for entry in ["https://img.test", "img.test/path", "img.test:0", "img.test:http", "user@img.test", ""]:
        with pytest.raises(ValueError):
            MediaPolicy(allowed_media_domains=(entry,))
    with pytest.raises(ValueError, match="tuple"):
        MediaPolicy(allowed_media_domains="img.test")


# ---------------------------------------------------------------------------------------------------------------
# Redirects (§5.3 step 5, §13 #28)
# ---------------------------------------------------------------------------------------------------------------


def test_redirect_to_loopback_is_blocked_and_never_contacted(stub, resolver, guard):
    stub.routes["/start"] = redirect(f"http://127.0.0.1:{stub.port}/secret.png")
    policy = make_policy(stub, resolver, extra_domains=[f"127.0.0.1:{stub.port}"])
    error = assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/start", policy), reason="blocked_address"
    )
    assert "127.0.0.1" not in error.message
    assert stub.hits["/start"] == 1 and stub.hits["/secret.png"] == 0
    assert guard.dials == [(PUBLIC_V4, stub.port)]


def test_redirect_to_a_name_resolving_privately_is_blocked(stub, resolver, guard):
    resolver.table["intranet.test"] = ["192.168.0.10"]
    stub.routes["/start"] = redirect(f"http://intranet.test:{stub.port}/secret.png")
    policy = make_policy(stub, resolver, extra_domains=[f"intranet.test:{stub.port}"])
    assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port}/start", policy), reason="blocked_address")
    assert stub.hits["/secret.png"] == 0 and guard.dials == [(PUBLIC_V4, stub.port)]


def test_redirect_to_a_non_allowlisted_domain_is_blocked_before_resolving(stub, resolver, guard):
    resolver.table["elsewhere.test"] = [PUBLIC_V4]
    stub.routes["/start"] = redirect(f"http://elsewhere.test:{stub.port}/img.png")
    assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/start", make_policy(stub, resolver)), reason="domain"
    )
    assert "elsewhere.test" not in resolver.calls and stub.hits["/img.png"] == 0


@pytest.mark.parametrize(
    "location, reason",
    [("ftp://img.test/x.png", "scheme"), ("http://user@img.test/x.png", "userinfo"), ("http://a\\@b/x", "malformed")],
)
def test_redirect_location_is_fully_revalidated(stub, resolver, guard, location, reason):
    stub.routes["/start"] = redirect(location)
    assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/start", make_policy(stub, resolver)), reason=reason
    )


def test_relative_and_cross_host_redirects_within_the_limit_succeed(stub, resolver, guard):
    stub.routes["/a"] = redirect("/b", 301)
    stub.routes["/b"] = redirect(f"http://cdn.test:{stub.port}/c", 307)
    stub.routes["/c"] = redirect("img.png", 308)
    image = load_image_url(f"http://img.test:{stub.port}/a", make_policy(stub, resolver))  # exactly 3 redirects
    assert image.size == (6, 4)
    assert [stub.hits[p] for p in ("/a", "/b", "/c", "/img.png")] == [1, 1, 1, 1]
    assert stub.hosts == [f"img.test:{stub.port}"] * 2 + [f"cdn.test:{stub.port}"] * 2
    assert resolver.calls == ["img.test", "img.test", "cdn.test", "cdn.test"]  # every hop resolved and checked again


def test_too_many_redirects(stub, resolver, guard):
    for k in range(5):
        stub.routes[f"/r{k}"] = redirect(f"/r{k + 1}")
    assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/r0", make_policy(stub, resolver)), reason="redirects"
    )
    assert [stub.hits[f"/r{k}"] for k in range(5)] == [1, 1, 1, 1, 0]  # the initial request + 3 redirects


def test_redirect_loop_ends(stub, resolver, guard):
    stub.routes["/ping"] = redirect("/pong")
    stub.routes["/pong"] = redirect("/ping")
    policy = make_policy(stub, resolver, max_redirects=2)
    assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port}/ping", policy), reason="redirects")
    assert stub.hits["/ping"] + stub.hits["/pong"] == 3


# ---------------------------------------------------------------------------------------------------------------
# Time and size caps (§5.3 steps 6–7, §13 #31–32)
# ---------------------------------------------------------------------------------------------------------------


def test_stalled_upstream_fails_at_the_total_timeout_and_the_next_fetch_works(stub, resolver, guard):
    stub.routes["/stall"] = stall(stub, 30)
    policy = make_policy(stub, resolver, image_fetch_timeout_s=0.6)
    started = time.monotonic()
    error = assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port}/stall", policy), reason="timeout")
    assert time.monotonic() - started < 3.0 and "0.6" in error.message
    assert load_image_url(f"http://img.test:{stub.port}/img.png", policy).size == (6, 4)


def test_dripping_upstream_fails_at_the_total_timeout(stub, resolver, guard):
    """Every read gets a byte in time, so only the total deadline can stop it (§5.3 step 6)."""
    stub.routes["/drip"] = drip(stub, "/drip", total=10_000, interval=0.05)
    policy = make_policy(stub, resolver, image_fetch_timeout_s=0.6)
    started = time.monotonic()
    assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port}/drip", policy), reason="timeout")
    assert time.monotonic() - started < 3.0
    assert 0 < stub.sent["/drip"] < 100


def test_slow_name_resolution_times_out(stub, guard):
    policy = MediaPolicy(
        allowed_media_domains=(f"img.test:{stub.port}",),
        resolve=FakeResolver({"img.test": [PUBLIC_V4]}, delay=2.0),
        connect_timeout_s=0.2,
    )
    started = time.monotonic()
    assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port}/img.png", policy), reason="dns")
    assert time.monotonic() - started < 1.5 and guard.dials == []  # the 0.2 s limit, not the 2 s resolver


def test_unknown_host_is_a_clean_400(stub, resolver, guard):
    policy = make_policy(stub, resolver, extra_domains=[f"nowhere.test:{stub.port}"])
    assert_media_error(lambda: load_image_url(f"http://nowhere.test:{stub.port}/x.png", policy), reason="dns")


def test_declared_length_over_the_cap_fails_before_the_body_is_read(stub, resolver, guard):
    stub.routes["/huge"] = short_body(declared=1_000_000_000, body=b"\x89PNG")
    error = assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/huge", make_policy(stub, resolver)), reason="too_large"
    )
    assert "1000000000" in error.message and str(20 * 1024 * 1024) in error.message


def test_body_without_content_length_is_cut_at_the_cap(stub, resolver, guard):
    cap = 64 * 1024
    stub.routes["/endless"] = endless(stub, "/endless", limit=64 * 1024 * 1024)
    policy = make_policy(stub, resolver, max_bytes=cap)
    assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port}/endless", policy), reason="too_large")
    time.sleep(0.2)  # let the stub notice the hang-up
    assert stub.sent["/endless"] < 16 * 1024 * 1024  # the client stopped reading long before the 64 MB were sent


def test_body_exactly_at_the_cap_is_accepted(stub, resolver, guard):
    policy = make_policy(stub, resolver, max_bytes=len(PNG))
    assert load_image_url(f"http://img.test:{stub.port}/img.png", policy).size == (6, 4)
    smaller = make_policy(stub, resolver, max_bytes=len(PNG) - 1)
    assert_media_error(lambda: load_image_url(f"http://img.test:{stub.port}/img.png", smaller), reason="too_large")


def test_body_shorter_than_declared_is_a_broken_response(stub, resolver, guard):
    stub.routes["/short"] = short_body(declared=len(PNG) + 100, body=PNG)
    assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/short", make_policy(stub, resolver)),
        reason="upstream_protocol",
    )


# ---------------------------------------------------------------------------------------------------------------
# Upstream answers (§5.3 step 8, §13 #33)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 500, 403, 304, 302])
def test_non_2xx_upstream_is_invalid_image_url_with_the_status(stub, resolver, guard, status):
    stub.routes["/status"] = respond(status, b"nope", "text/plain")  # 302 without Location counts as an answer
    error = assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/status", make_policy(stub, resolver)),
        reason="upstream_status",
    )
    assert f"HTTP {status}" in error.message and PUBLIC_V4 not in error.message


def test_html_content_type_is_invalid_image(stub, resolver, guard):
    stub.routes["/page"] = respond(200, b"<html>hi</html>", "text/html; charset=utf-8")
    error = assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/page", make_policy(stub, resolver)),
        code="INVALID_IMAGE",
        reason="content_type",
    )
    assert "text/html" in error.message


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "binary/octet-stream", "image/jpeg"])
def test_generic_or_mislabelled_image_types_are_decoded_by_content(stub, resolver, guard, content_type):
    stub.routes["/blob"] = respond(200, PNG, content_type)
    assert load_image_url(f"http://img.test:{stub.port}/blob", make_policy(stub, resolver)).size == (6, 4)


@pytest.mark.parametrize("body", [b"<html>not an image</html>", b"%PDF-1.7\n", PNG[: len(PNG) // 2], b""])
def test_bytes_that_are_not_a_whole_image_are_invalid_image(stub, resolver, guard, body):
    stub.routes["/bad"] = respond(200, body, "image/png")
    assert_media_error(
        lambda: load_image_url(f"http://img.test:{stub.port}/bad", make_policy(stub, resolver)), code="INVALID_IMAGE"
    )


# ---------------------------------------------------------------------------------------------------------------
# TLS: SNI and certificate checked against the host name, not the pinned address (§5.3 step 4)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=img.test",
         "-addext", "subjectAltName=DNS:img.test"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return key, cert


@pytest.fixture
def tls_stub(certificate):
    key, cert = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = StubServer(tls=context)
    server.routes["/img.png"] = respond(200, PNG)
    yield server
    server.close()


def test_https_sends_sni_and_host_for_the_name_while_dialling_the_pinned_address(tls_stub, certificate, guard):
    resolver = FakeResolver({"img.test": [PUBLIC_V4]})
    policy = MediaPolicy(
        allowed_media_domains=(f"img.test:{tls_stub.port}",), resolve=resolver, ca_bundle=certificate[1],
        connect_timeout_s=2.0, image_fetch_timeout_s=4.0,
    )  # fmt: skip
    assert load_image_url(f"https://img.test:{tls_stub.port}/img.png", policy).size == (6, 4)
    assert tls_stub.sni == ["img.test"] and tls_stub.hosts == [f"img.test:{tls_stub.port}"]
    assert guard.dials == [(PUBLIC_V4, tls_stub.port)]


def test_https_certificate_for_another_name_is_refused(tls_stub, certificate, guard):
    """Same server and address, but the URL names other.test: verification is against the name, so it fails."""
    resolver = FakeResolver({"other.test": [PUBLIC_V4]})
    policy = MediaPolicy(
        allowed_media_domains=(f"other.test:{tls_stub.port}",), resolve=resolver, ca_bundle=certificate[1],
        connect_timeout_s=2.0, image_fetch_timeout_s=4.0,
    )  # fmt: skip
    assert_media_error(lambda: load_image_url(f"https://other.test:{tls_stub.port}/img.png", policy), reason="connect")
    assert tls_stub.hits["/img.png"] == 0


def test_https_with_the_default_trust_store_refuses_a_self_signed_certificate(tls_stub, guard):
    policy = MediaPolicy(
        allowed_media_domains=(f"img.test:{tls_stub.port}",), resolve=FakeResolver({"img.test": [PUBLIC_V4]}),
        connect_timeout_s=2.0, image_fetch_timeout_s=4.0,
    )  # fmt: skip
    assert_media_error(lambda: load_image_url(f"https://img.test:{tls_stub.port}/img.png", policy), reason="connect")
    assert tls_stub.hits["/img.png"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Async behaviour (§5.3 step 9, §6 item 4)
# ---------------------------------------------------------------------------------------------------------------


def test_cancelling_a_fetch_ends_it_at_once(stub, resolver, guard):
    stub.routes["/stall"] = stall(stub, 30)
    policy = make_policy(stub, resolver, image_fetch_timeout_s=20.0)

    async def scenario():
        task = asyncio.ensure_future(aload_image_url(f"http://img.test:{stub.port}/stall", policy))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 2.0  # far below the 20 s fetch timeout: the fetch was abandoned, not awaited
    assert stub.hits["/stall"] == 1


def test_aload_images_keeps_order_and_bounds_concurrency(stub, resolver, guard):
    stub.routes["/red.png"] = respond(200, png_bytes(colour=(255, 0, 0)))
    stub.routes["/blue.png"] = respond(200, png_bytes(colour=(0, 0, 255)))
    policy = make_policy(stub, resolver, max_concurrent_fetches=1)
    base = f"http://img.test:{stub.port}"
    items = [(f"{base}/blue.png", "a"), (f"{base}/red.png", "b"), (f"{base}/blue.png", "c")]
    images = asyncio.run(aload_images(items, policy, limiter=asyncio.Semaphore(32)))
    assert [im.getpixel((0, 0)) for im in images] == [(0, 0, 255), (255, 0, 0), (0, 0, 255)]
    assert asyncio.run(aload_images([], policy)) == []


def test_aload_images_raises_the_failing_image_with_its_param_and_cancels_the_rest(stub, resolver, guard):
    stub.routes["/stall"] = stall(stub, 30)
    policy = make_policy(stub, resolver, image_fetch_timeout_s=20.0)
    base = f"http://img.test:{stub.port}"
    items = [(f"{base}/stall", "messages[0].content[0].image_url.url"),
             ("ftp://img.test/x.png", "messages[0].content[1].image_url.url")]  # fmt: skip
    started = time.monotonic()
    with pytest.raises(MediaError) as info:
        asyncio.run(aload_images(items, policy))
    assert info.value.param == "messages[0].content[1].image_url.url" and info.value.reason == "scheme"
    assert time.monotonic() - started < 2.0  # the stalled sibling was cancelled, not waited for


def test_sync_loader_works_inside_a_running_event_loop(stub, resolver, guard):
    async def inside():
        return load_image_url(f"http://img.test:{stub.port}/img.png", make_policy(stub, resolver))

    assert asyncio.run(inside()).size == (6, 4)
