"""Media loading entry points against SERVING.md §5.1, §5.2, §5.4, §5.5 and §13 C (cases 19–23, 29–30).

Data URLs, file:// URLs, decoding limits and odd-but-valid images, videos (data/file/http with frame sampling), the
policy's own validation, and the error fields the HTTP layer reads. Remote fetching rules are in test_media_fetch.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import zlib

import av
import numpy as np
import pytest
from PIL import Image, ImageFile

from internvl.serve import media_fetch
from internvl.serve.media import (
    MediaError,
    MediaPolicy,
    aload_image_url,
    aload_video_url,
    describe_url,
    load_image_url,
    load_video_url,
)

from .media_stub import DialGuard, FakeResolver, StubServer, respond


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


PNG = encode(Image.new("RGB", (6, 4), (200, 30, 60)), "PNG")
DEFAULT = MediaPolicy()


def assert_media_error(call, code, reason=None) -> MediaError:
    with pytest.raises(MediaError) as info:
        call()
    assert info.value.code == code, info.value
    if reason is not None:
        assert info.value.reason == reason, info.value
    assert info.value.message and str(info.value) == info.value.message
    return info.value


@pytest.fixture
def guard(monkeypatch):
    guard = DialGuard()
    monkeypatch.setattr(media_fetch, "dial_target", guard)
    return guard


# ---------------------------------------------------------------------------------------------------------------
# data: URLs (§5.2, §13 #19–21)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, mime, save",
    [("PNG", "image/png", {}), ("JPEG", "image/jpeg", {"quality": 95}), ("JPEG", "image/jpg", {"quality": 95}),
     ("WEBP", "image/webp", {"lossless": True}), ("GIF", "image/gif", {}), ("BMP", "image/bmp", {})],
)  # fmt: skip
def test_data_url_formats(fmt, mime, save):
    colour = (255, 0, 0) if fmt == "GIF" else (200, 30, 60)  # a GIF palette holds pure red exactly
    image = load_image_url(data_url(encode(Image.new("RGB", (6, 4), colour), fmt, **save), mime), DEFAULT)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert np.abs(np.asarray(image, dtype=int) - colour).max() <= (8 if fmt == "JPEG" else 0)


def test_data_url_mime_and_encoding_are_case_insensitive():
    assert load_image_url(data_url(PNG, "IMAGE/PNG").replace(";base64", ";BASE64"), DEFAULT).size == (6, 4)


def test_data_url_label_need_not_match_the_bytes():
    """Documented: the decoder identifies the format from the bytes; a PNG labelled image/jpeg decodes as PNG."""
    assert load_image_url(data_url(PNG, "image/jpeg"), DEFAULT).getpixel((0, 0)) == (200, 30, 60)


GOOD = base64.b64encode(PNG).decode("ascii")


@pytest.mark.parametrize(
    "payload, words",
    [
        (GOOD[:40] + " " + GOOD[40:], "whitespace"),
        (GOOD[:40] + "\n" + GOOD[40:], "whitespace"),
        (GOOD[:40] + "\t" + GOOD[40:], "whitespace"),
        (GOOD[:40] + "*" + GOOD[40:], "'*'"),
        (GOOD[:40] + "-" + GOOD[40:], "'-'"),  # URL-safe alphabet
        (GOOD[:40] + "_" + GOOD[40:], "'_'"),
        (GOOD[:40] + "%2B" + GOOD[40:], "'%'"),
        (GOOD.rstrip("=")[:-1], "padding"),  # length no longer a multiple of 4
        ("QQ=", "padding"),
        ("QQ==QQ==", "'=' padding"),  # padding in the middle
        ("Q===", "'=' padding"),
        ("", "empty"),
    ],
)
def test_strict_base64_rejections_are_invalid_image(payload, words):
    error = assert_media_error(
        lambda: load_image_url(f"data:image/png;base64,{payload}", DEFAULT), "INVALID_IMAGE", "base64"
    )
    assert words in error.message


@pytest.mark.parametrize(
    "url, reason",
    [
        ("data:image/png;base64" + GOOD, "malformed"),  # no comma
        ("data:image/png," + GOOD, "malformed"),  # not declared base64
        ("data:image/png;charset=utf-8;base64," + GOOD, "malformed"),  # exactly <mime>;base64, nothing else
        ("data:;base64," + GOOD, "mime"),
        ("data:text/html;base64," + base64.b64encode(b"<h1>hi</h1>").decode(), "mime"),
        ("data:application/pdf;base64," + GOOD, "mime"),
        ("data:image/svg+xml;base64," + GOOD, "mime"),
        ("data:image/tiff;base64," + GOOD, "mime"),
        ("data:video/mp4;base64," + GOOD, "mime"),
    ],
)
def test_malformed_data_urls_are_invalid_image_url(url, reason):
    assert_media_error(lambda: load_image_url(url, DEFAULT), "INVALID_IMAGE_URL", reason)


@pytest.mark.parametrize(
    "data",
    [b"<!doctype html><html><body>hello</body></html>", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", PNG[: len(PNG) // 2],
     PNG[:8], encode(Image.new("RGB", (4, 4)), "TIFF"), b"\x00" * 64],
)  # fmt: skip
def test_valid_base64_of_non_images_is_invalid_image(data):
    assert_media_error(lambda: load_image_url(data_url(data), DEFAULT), "INVALID_IMAGE", "decode")


def test_data_url_size_cap():
    big = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "BMP")  # ~12 KB, uncompressed
    policy = MediaPolicy(max_bytes=len(big))
    assert load_image_url(data_url(big, "image/bmp"), policy).size == (64, 64)
    tight = MediaPolicy(max_bytes=len(big) - 1)
    error = assert_media_error(
        lambda: load_image_url(data_url(big, "image/bmp"), tight), "INVALID_IMAGE_URL", "too_large"
    )
    assert str(len(big) - 1) in error.message


def test_oversized_data_url_is_refused_before_decoding(monkeypatch):
    decoded = []
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: decoded.append(1) or b"")
    assert_media_error(
        lambda: load_image_url("data:image/png;base64," + "A" * 4000, MediaPolicy(max_bytes=1000)),
        "INVALID_IMAGE_URL",
        "too_large",
    )
    assert decoded == []


# ---------------------------------------------------------------------------------------------------------------
# Pixel cap and decompression bombs (§5.5, §13 #22)
# ---------------------------------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width×height, followed by a tiny (wrong-sized) IDAT: what a bomb's header says."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def load_spy(monkeypatch):
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_decompression_bomb_is_rejected_from_the_header(load_spy):
    error = assert_media_error(
        lambda: load_image_url(data_url(png_header_only(40_000, 40_000)), DEFAULT), "INVALID_IMAGE", "pixels"
    )
    assert "40000000" in error.message
    assert load_spy == []  # no pixel data was decoded


def test_image_over_the_pixel_cap_is_rejected_before_loading_pixels(load_spy):
    # 8000×8000 = 64 M: above our 40 M cap, below Pillow's own guard, so only our header check can stop it.
    error = assert_media_error(
        lambda: load_image_url(data_url(png_header_only(8000, 8000)), DEFAULT), "INVALID_IMAGE", "pixels"
    )
    assert "8000x8000" in error.message and "64000000" in error.message
    assert load_spy == []


def test_pixel_cap_boundary():
    image = encode(Image.new("RGB", (10, 10)), "PNG")
    assert load_image_url(data_url(image), MediaPolicy(max_pixels=100)).size == (10, 10)
    assert_media_error(lambda: load_image_url(data_url(image), MediaPolicy(max_pixels=99)), "INVALID_IMAGE", "pixels")


# ---------------------------------------------------------------------------------------------------------------
# Odd but valid images (§5.5, §13 #23)
# ---------------------------------------------------------------------------------------------------------------


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (3, 3), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(image, "PNG", transparency=1)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (5, 5), (255, 0, 0)), Image.new("RGB", (5, 5), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize(
    "data, size, pixel",
    [
        (encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), (1, 1), (9, 8, 7)),
        (encode(Image.new("RGB", (1, 10000), (9, 8, 7)), "PNG"), (1, 10000), (9, 8, 7)),
        (encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100), (4, 4), (255, 0, 0)),
        (encode(Image.new("I;16", (3, 2), 257 * 100), "PNG"), (3, 2), (100, 100, 100)),  # 16-bit, scaled to 8 bit
        (_palette_with_transparency(), (3, 3), (255, 0, 0)),  # alpha dropped, colour kept
        (encode(Image.new("RGBA", (2, 2), (10, 20, 30, 0)), "PNG"), (2, 2), (10, 20, 30)),  # not composited
        (encode(Image.new("LA", (2, 2), (50, 0)), "PNG"), (2, 2), (50, 50, 50)),
        (encode(Image.new("L", (2, 2), 77), "PNG"), (2, 2), (77, 77, 77)),
        (_animated_gif(), (5, 5), (255, 0, 0)),  # frame 0
    ],
    ids=["1x1", "1x10000", "cmyk-jpeg", "png-16bit", "palette-transparency", "rgba", "la", "l", "animated-gif"],
)
def test_odd_but_valid_images_become_rgb(data, size, pixel):
    image = load_image_url(data_url(data), DEFAULT)
    assert image.mode == "RGB" and image.size == size
    assert np.abs(np.asarray(image.getpixel((0, 0))) - pixel).max() <= 2


def test_exif_orientation_is_ignored_by_default_and_applied_on_request():
    image = Image.new("RGB", (8, 4), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    url = data_url(encode(image, "JPEG", exif=exif.tobytes()), "image/jpeg")
    assert load_image_url(url, DEFAULT).size == (8, 4)  # reference parity (§5.5)
    assert load_image_url(url, MediaPolicy(apply_exif_orientation=True)).size == (4, 8)


# ---------------------------------------------------------------------------------------------------------------
# Bare paths, schemes, non-strings (§5.1, §13 #29–30)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["/etc/passwd", "photo.png", "./photo.png", "C:\\photo.png", "", "   ", "//img.test/x.png"]
)
def test_bare_paths_are_never_accepted(url):
    assert_media_error(lambda: load_image_url(url, DEFAULT), "INVALID_IMAGE_URL", "scheme")


@pytest.mark.parametrize("url", [None, 5, b"data:image/png;base64,AAAA", {"url": "x"}])
def test_non_string_urls(url):
    assert_media_error(lambda: load_image_url(url, DEFAULT), "INVALID_IMAGE_URL", "malformed")


def test_param_is_attached_and_settable():
    error = assert_media_error(
        lambda: load_image_url("gopher://x/", DEFAULT, param="messages[2].content[1].image_url.url"),
        "INVALID_IMAGE_URL",
    )
    assert error.param == "messages[2].content[1].image_url.url"
    error.param = "messages[0].content[0].image_url"
    assert error.param == "messages[0].content[0].image_url" and isinstance(error, ValueError)
    assert assert_media_error(lambda: load_image_url("gopher://x/", DEFAULT), "INVALID_IMAGE_URL").param is None


def test_describe_url_never_returns_a_whole_data_url():
    url = data_url(PNG)
    text = describe_url(url)
    assert text.startswith("data:image/png;base64,") and GOOD[:20] not in text and str(len(url)) in text
    assert describe_url("https://img.test/x.png") == "https://img.test/x.png"
    assert len(describe_url("https://img.test/" + "a" * 500)) < 120


# ---------------------------------------------------------------------------------------------------------------
# file:// URLs (§5.4, §13 #29)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def media_tree(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "img.png").write_bytes(PNG)
    (allowed / "sub").mkdir()
    (allowed / "sub" / "deep.png").write_bytes(PNG)
    (allowed / "name with space#1.png").write_bytes(PNG)
    sibling = tmp_path / "media-other"  # shares the allowed directory's name as a string prefix
    sibling.mkdir()
    (sibling / "img.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", allowed / "escape.png")
    os.symlink(tmp_path, allowed / "escape-dir")
    os.symlink(allowed / "img.png", allowed / "inner-link.png")
    return tmp_path, MediaPolicy(allowed_local_media_path=allowed)


def test_file_urls_are_disabled_by_default(media_tree):
    root, _ = media_tree
    assert_media_error(lambda: load_image_url(f"file://{root}/media/img.png", DEFAULT), "INVALID_IMAGE_URL", "scheme")


def test_file_urls_inside_the_allowed_directory(media_tree):
    root, policy = media_tree
    for url in [
        f"file://{root}/media/img.png",
        f"file://localhost{root}/media/img.png",
        f"file://{root}/media/sub/deep.png",
        f"file://{root}/media/sub/../img.png",  # '..' that stays inside is fine
        f"file://{root}/media/inner-link.png",  # a symlink that stays inside is fine
        f"file://{root}/media/name%20with%20space%231.png",  # percent-decoded
    ]:
        assert load_image_url(url, policy).getpixel((0, 0)) == (200, 30, 60), url


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "{root}/secret.png",
        "{root}/media/../secret.png",  # '..' traversal
        "{root}/media/%2E%2E/secret.png",  # percent-encoded traversal
        "{root}/media/..%2Fsecret.png",
        "{root}/media/escape.png",  # symlink to a file outside
        "{root}/media/escape-dir/secret.png",  # symlinked directory leading outside
        "{root}/media-other/img.png",  # prefix sibling: compared by path components, not strings
    ],
)
def test_file_urls_outside_the_allowed_directory(media_tree, path):
    root, policy = media_tree
    error = assert_media_error(
        lambda: load_image_url("file://" + path.format(root=root), policy), "INVALID_IMAGE_URL", "file_outside"
    )
    assert str(root) not in error.message  # resolved paths are not revealed


@pytest.mark.parametrize(
    "url",
    ["file://../x.png", "file://evil.test{root}/media/img.png", "file:img.png", "file:media/img.png",
     "file://{root}/media/img.png?x=1", "file://{root}/media/img.png#frag", "file://{root}/media/img%00.png"],
)  # fmt: skip
def test_file_urls_with_hosts_relative_paths_or_extras(media_tree, url):
    root, policy = media_tree
    assert_media_error(lambda: load_image_url(url.format(root=root), policy), "INVALID_IMAGE_URL", "file")


def test_file_url_non_regular_missing_and_too_large(media_tree):
    root, policy = media_tree
    assert_media_error(lambda: load_image_url(f"file://{root}/media/sub", policy), "INVALID_IMAGE_URL", "file")
    assert_media_error(lambda: load_image_url(f"file://{root}/media/none.png", policy), "INVALID_IMAGE_URL", "file")
    os.mkfifo(root / "media" / "pipe.png")  # reading a FIFO would block forever
    assert_media_error(lambda: load_image_url(f"file://{root}/media/pipe.png", policy), "INVALID_IMAGE_URL", "file")
    small = MediaPolicy(allowed_local_media_path=root / "media", max_bytes=len(PNG) - 1)
    assert_media_error(lambda: load_image_url(f"file://{root}/media/img.png", small), "INVALID_IMAGE_URL", "too_large")


def test_file_url_with_non_image_content(media_tree):
    root, policy = media_tree
    (root / "media" / "notes.png").write_text("not an image")
    assert_media_error(lambda: load_image_url(f"file://{root}/media/notes.png", policy), "INVALID_IMAGE", "decode")


# ---------------------------------------------------------------------------------------------------------------
# Videos (data / file / http, frame sampling)
# ---------------------------------------------------------------------------------------------------------------

FPS = 10


def colour(index: int) -> tuple[int, int, int]:
    return (20 * index, 255 - 20 * index, 100)  # distinct for index < 13


def make_video(num_frames: int, container: str, codec: str, pix_fmt: str, size=(32, 24)) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        for index in range(num_frames):
            frame = np.empty((size[1], size[0], 3), np.uint8)
            frame[...] = colour(index)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mov():  # lossless PNG frames; the container stores the frame count
    return make_video(10, "mov", "png", "rgb24")


@pytest.fixture(scope="module")
def mkv():  # lossless FFV1 in Matroska: no stored frame count, so frames are counted by decoding
    return make_video(10, "matroska", "ffv1", "bgr0")


def identify(frames) -> list[int]:
    """The index whose colour each frame shows (lossless codecs keep colours exact)."""
    out = []
    for frame in frames:
        assert frame.mode == "RGB" and frame.size == (32, 24)
        mean = np.asarray(frame, dtype=float).mean(axis=(0, 1))
        distances = [np.abs(mean - colour(i)).max() for i in range(13)]
        assert min(distances) < 1.0
        out.append(int(np.argmin(distances)))
    return out


# 10 frames, 4 segments: seg = 9/4 = 2.25, centres 1.125 + round(2.25·k) = 1.125, 3.125, 5.125, 8.125 (round half
# to even: round(4.5) = 4) -> frames 1, 3, 5, 8 (INTERNVL.md §9.6).
EXPECTED_4_OF_10 = [1, 3, 5, 8]


def test_video_data_url_frame_sampling(mov, mkv):
    assert identify(load_video_url(data_url(mov, "video/quicktime"), DEFAULT, 4)) == EXPECTED_4_OF_10
    assert identify(load_video_url(data_url(mkv, "video/x-matroska"), DEFAULT, 4)) == EXPECTED_4_OF_10
    # More frames than the video has: frames repeat, as in the reference. seg = 9/12 = 0.75, centres
    # 0.375 + round(0.75·k) with round(1.5) = 2, round(4.5) = 4, round(7.5) = 8 (half to even).
    expected = [0, 1, 2, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert identify(load_video_url(data_url(mov, "video/mp4"), DEFAULT, 12)) == expected


def test_video_file_url(mov, tmp_path):
    (tmp_path / "clip.mov").write_bytes(mov)
    policy = MediaPolicy(allowed_local_media_path=tmp_path)
    assert identify(load_video_url(f"file://{tmp_path}/clip.mov", policy, 4)) == EXPECTED_4_OF_10


def test_video_over_http_and_async(mov, guard):
    stub = StubServer()
    try:
        stub.routes["/clip.mov"] = respond(200, mov, "video/quicktime")
        policy = MediaPolicy(
            allowed_media_domains=(f"videos.test:{stub.port}",),
            resolve=FakeResolver({"videos.test": ["8.8.8.8"]}),  # rerouted to the stub by the guard
            connect_timeout_s=0.5,
        )
        frames = asyncio.run(aload_video_url(f"http://videos.test:{stub.port}/clip.mov", policy, 4))
        assert identify(frames) == EXPECTED_4_OF_10 and stub.hits["/clip.mov"] == 1
        stub.routes["/page"] = respond(200, b"<html></html>", "text/html")
        assert_media_error(
            lambda: load_video_url(f"http://videos.test:{stub.port}/page", policy, 4), "INVALID_IMAGE", "content_type"
        )
    finally:
        stub.close()


def test_video_frame_count_limits(mov):
    url = data_url(mov, "video/mp4")
    error = assert_media_error(lambda: load_video_url(url, DEFAULT, 33), "TOO_MANY_IMAGES", "frames")
    assert "33" in error.message and "32" in error.message
    for bad in (0, -1, True, 2.5, "4"):
        assert_media_error(lambda bad=bad: load_video_url(url, DEFAULT, bad), "INVALID_REQUEST", "frames")


@pytest.mark.parametrize(
    "data",
    [PNG, b"hello world" * 10, b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n"],
)
def test_non_video_bytes_are_invalid_image(data):
    assert_media_error(lambda: load_video_url(data_url(data, "video/mp4"), DEFAULT, 4), "INVALID_IMAGE", "decode")


def test_playlist_videos_never_open_what_they_name(mov, tmp_path, monkeypatch, guard):
    """FFmpeg's concat and HLS demuxers open files and URLs named inside the data. Only container demuxers are
    allowed, so a concat list naming a real video in the server's working directory (which FFmpeg would otherwise
    read and decode) and an HLS playlist naming the stub are both refused, and neither target is touched."""
    (tmp_path / "secret.mov").write_bytes(mov)
    monkeypatch.chdir(tmp_path)
    concat = b"ffconcat version 1.0\nfile secret.mov\n"
    assert_media_error(lambda: load_video_url(data_url(concat, "video/mp4"), DEFAULT, 4), "INVALID_IMAGE", "decode")
    stub = StubServer()
    try:
        playlist = (
            f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:{stub.port}/segment.ts\n#EXT-X-ENDLIST\n"
        ).encode()
        assert_media_error(lambda: load_video_url(data_url(playlist, "video/mp4"), DEFAULT, 4), "INVALID_IMAGE")
        assert stub.hits["/segment.ts"] == 0
    finally:
        stub.close()


def test_video_limits(mov):
    url = data_url(mov, "video/quicktime")
    assert_media_error(
        lambda: load_video_url(url, MediaPolicy(max_video_frame_pixels=32 * 24 - 1), 4), "INVALID_IMAGE", "pixels"
    )
    assert_media_error(
        lambda: load_video_url(url, MediaPolicy(max_video_bytes=len(mov) - 1), 4), "INVALID_IMAGE_URL", "too_large"
    )
    assert_media_error(lambda: load_video_url(url, MediaPolicy(decode_timeout_s=1e-6), 4), "INVALID_IMAGE", "timeout")
    assert_media_error(lambda: load_video_url(data_url(mov, "image/png"), DEFAULT, 4), "INVALID_IMAGE_URL", "mime")
    assert_media_error(lambda: load_video_url(data_url(mov[: len(mov) // 3], "video/mp4"), DEFAULT, 4), "INVALID_IMAGE")


# ---------------------------------------------------------------------------------------------------------------
# Async API and policy validation
# ---------------------------------------------------------------------------------------------------------------


def test_async_image_loader_matches_the_sync_one():
    url = data_url(PNG)
    assert asyncio.run(aload_image_url(url, DEFAULT)).tobytes() == load_image_url(url, DEFAULT).tobytes()


def test_decode_time_limit(monkeypatch):
    import internvl.serve.media as media

    def slow_decode(data, policy):
        import time

        time.sleep(0.5)
        return Image.new("RGB", (1, 1))

    monkeypatch.setattr(media, "decode_image", slow_decode)
    assert_media_error(
        lambda: load_image_url(data_url(PNG), MediaPolicy(decode_timeout_s=0.1)), "INVALID_IMAGE", "timeout"
    )


def test_policy_defaults_are_the_safe_defaults():
    policy = MediaPolicy()
    assert policy.allowed_local_media_path is None and policy.allowed_media_domains is None
    assert policy.allow_private_networks is False
    assert (policy.connect_timeout_s, policy.image_fetch_timeout_s, policy.video_fetch_timeout_s) == (3.0, 10.0, 30.0)
    assert policy.max_bytes == 20 * 1024 * 1024 and policy.max_pixels == 40_000_000 and policy.max_redirects == 3


@pytest.mark.parametrize(
    "field, value",
    [("connect_timeout_s", 0), ("image_fetch_timeout_s", -1), ("decode_timeout_s", float("nan")),
     ("video_fetch_timeout_s", True), ("max_bytes", 0), ("max_pixels", 1.5), ("max_redirects", -1),
     ("max_video_frames", 0), ("max_pixels", 100_000_000), ("max_video_frame_pixels", 90_000_000)],
)  # fmt: skip
def test_policy_rejects_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        MediaPolicy(**{field: value})
