"""Tests for internvl.preprocessing.image against INTERNVL.md §9.1–9.3 and independent computations.

Expected values come from the spec (printed candidate orders, the §9.3 golden table), from
tests/golden/tiling_orders.json (generated once by a throwaway replay of the reference construction), or from the
brute-force/by-hand computations written in this file — never from the code under test.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl.preprocessing import image as image_mod
from internvl.preprocessing.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    candidate_grids,
    dynamic_preprocess,
    find_closest_grid,
    load_image,
    num_tiles,
    open_image,
    tile_grid,
    to_tensor,
)

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "tiling_orders.json").read_text())
GOLDEN_ORDERS = {int(k): [tuple(p) for p in v] for k, v in GOLDEN["orders"].items()}
BICUBIC = Image.Resampling.BICUBIC

# ---------------------------------------------------------------------------------------------------------------
# Candidate order (§9.2 step 2)
# ---------------------------------------------------------------------------------------------------------------

# Copied from INTERNVL.md §9.2 (the printed lists).
SPEC_ORDER_12 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3),
    (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5), (5, 2), (10, 1), (1, 10),
    (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6),
]  # fmt: skip
SPEC_ORDER_6 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2),
]  # fmt: skip


def test_candidate_order_matches_spec_lists():
    assert candidate_grids(1, 12) == SPEC_ORDER_12
    assert candidate_grids(1, 6) == SPEC_ORDER_6


@pytest.mark.parametrize("max_num", [1, 18, 24, 40])
def test_candidate_order_matches_golden_file(max_num):
    assert candidate_grids(1, max_num) == GOLDEN_ORDERS[max_num]


def test_golden_file_agrees_with_spec_and_is_complete():
    # Guards the golden file itself: the spec lists match, and each list is exactly the set of valid grids by product.
    assert GOLDEN_ORDERS[12] == SPEC_ORDER_12 and GOLDEN_ORDERS[6] == SPEC_ORDER_6
    assert "how_generated" in GOLDEN
    for max_num, order in GOLDEN_ORDERS.items():
        expected = {(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if c * r <= max_num}
        assert set(order) == expected and len(order) == len(expected)
        assert [c * r for c, r in order] == sorted(c * r for c, r in order)


def test_candidate_order_is_not_lexicographic_and_min_num_filters():
    # Within product 2 the spec order is (1,2) before (2,1); within product 3 it is (3,1) before (1,3).
    assert candidate_grids(1, 3) == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3)]
    grids = candidate_grids(4, 6)
    assert all(4 <= c * r <= 6 for c, r in grids) and (1, 1) not in grids
    assert set(grids) == {(c, r) for c in range(1, 7) for r in range(1, 7) if 4 <= c * r <= 6}


def test_candidate_grids_returns_a_fresh_list():
    first = candidate_grids(1, 12)
    first.clear()
    assert candidate_grids(1, 12) == SPEC_ORDER_12


# ---------------------------------------------------------------------------------------------------------------
# Grid choice: the §9.3 golden table (data copied from the spec)
# ---------------------------------------------------------------------------------------------------------------

# (W, H, max_num 6: (cols, rows, tiles, tokens) or None for "—", max_num 12: (cols, rows, tiles, tokens))
SPEC_TABLE = [
    (448, 448, (1, 1, 1, 256), (1, 1, 1, 256)),
    (224, 224, (1, 1, 1, 256), (1, 1, 1, 256)),
    (633, 633, None, (1, 1, 1, 256)),
    (634, 634, (2, 2, 5, 1280), (2, 2, 5, 1280)),
    (950, 950, None, (2, 2, 5, 1280)),
    (951, 951, (2, 2, 5, 1280), (3, 3, 10, 2560)),
    (1000, 1000, (2, 2, 5, 1280), (3, 3, 10, 2560)),
    (448, 224, None, (2, 1, 3, 768)),
    (640, 480, (3, 2, 7, 1792), (4, 3, 13, 3328)),
    (800, 600, (3, 2, 7, 1792), (4, 3, 13, 3328)),
    (1024, 768, (3, 2, 7, 1792), (4, 3, 13, 3328)),
    (200, 150, None, (4, 3, 13, 3328)),
    (64, 48, None, (4, 3, 13, 3328)),
    (300, 200, None, (3, 2, 7, 1792)),
    (640, 427, None, (3, 2, 7, 1792)),
    (1280, 720, (2, 1, 3, 768), (4, 2, 9, 2304)),
    (1920, 1080, (2, 1, 3, 768), (4, 2, 9, 2304)),
    (1200, 300, (4, 1, 5, 1280), (4, 1, 5, 1280)),
    (300, 1200, (1, 4, 5, 1280), (1, 4, 5, 1280)),
    (4000, 1000, (4, 1, 5, 1280), (4, 1, 5, 1280)),
    (100, 1000, (1, 6, 7, 1792), (1, 10, 11, 2816)),
    (2480, 3508, (2, 3, 7, 1792), (2, 3, 7, 1792)),
    (3000, 4000, (2, 3, 7, 1792), (3, 4, 13, 3328)),
    (1, 10000, None, (1, 12, 13, 3328)),
    (1, 1, None, (1, 1, 1, 256)),
]


@pytest.mark.parametrize("width,height,at6,at12", SPEC_TABLE, ids=[f"{w}x{h}" for w, h, *_ in SPEC_TABLE])
def test_spec_golden_table(width, height, at6, at12):
    for max_num, row in ((6, at6), (12, at12)):
        if row is None:
            continue
        cols, rows, tiles, tokens = row
        assert tile_grid(width, height, max_num=max_num) == (cols, rows)
        assert num_tiles(width, height, max_num) == tiles
        assert 256 * num_tiles(width, height, max_num) == tokens  # 256 tokens per tile, thumbnail included (§9.2)
        assert num_tiles(width, height, max_num, use_thumbnail=False) == cols * rows


def _brute_force_grid(width, height, order, image_size=448):
    """§9.2 step 3 written from the spec text, over the golden candidate order (independent of the package)."""
    chosen, chosen_diff = (1, 1), float("inf")
    for cols, rows in order:
        diff = abs(width / height - cols / rows)
        if diff < chosen_diff or (diff == chosen_diff and width * height > image_size * image_size * cols * rows / 2):
            chosen, chosen_diff = (cols, rows), min(diff, chosen_diff)
    return chosen


EXTRA_SIZES = [
    (1, 1), (1, 1000), (1000, 1), (30, 20), (448, 448), (449, 448), (448, 449), (4000, 3000), (3000, 4000),
    (500, 2000), (2000, 500), (1344, 448), (600, 200), (1400, 700), (700, 1400), (634, 634), (951, 951),
    (2000, 2000), (3000, 3000), (1000, 800), (17, 5), (2, 3), (1920, 1080), (1080, 1920), (4096, 1024),
    (5000, 5000), (12000, 1000), (999, 1000),
]  # fmt: skip


@pytest.mark.parametrize("max_num", [1, 6, 12, 24, 40])
def test_grid_matches_brute_force(max_num):
    assert len(EXTRA_SIZES) >= 20
    order = GOLDEN_ORDERS[max_num]
    for width, height in EXTRA_SIZES:
        expected = _brute_force_grid(width, height, order)
        assert tile_grid(width, height, max_num=max_num) == expected, (width, height, max_num)
        cols, rows = expected
        assert num_tiles(width, height, max_num) == cols * rows + (cols * rows > 1)


def test_some_hand_checked_grids():
    # Worked from the rule by hand (threshold for a later tie = 0.5·448²·cols·rows = 100352·cols·rows px).
    assert tile_grid(4000, 3000, max_num=1) == (1, 1)  # only one candidate
    assert tile_grid(1400, 700, max_num=12) == (4, 2)  # 2:1 ties (2,1) then (4,2); 980000 > 802816
    assert tile_grid(800, 400, max_num=12) == (2, 1)  # 320000 < 802816: the tie does not move to (4,2)
    assert tile_grid(1344, 448, max_num=40) == (3, 1)  # 3:1; 602112 < 1204224 needed for (6,2)
    assert tile_grid(1920, 640, max_num=40) == (6, 2)  # 1228800 > 1204224 but < 2709504 needed for (9,3)
    assert tile_grid(4200, 1400, max_num=40) == (9, 3)  # (12,4) would need max_num >= 48
    assert tile_grid(449, 448, max_num=12) == (1, 1)  # nearly square, too small for (2,2)


def test_find_closest_grid_tie_break_follows_given_order():
    # Equal diffs: the later grid wins only if W·H > 0.5·S²·cols·rows (§9.2 step 3), so the order matters.
    assert find_closest_grid(634, 634, [(1, 1), (2, 2)]) == (2, 2)
    assert find_closest_grid(633, 633, [(1, 1), (2, 2)]) == (1, 1)
    assert find_closest_grid(634, 634, [(2, 2), (1, 1)]) == (1, 1)  # 401956 > 100352: the later (1,1) wins
    assert find_closest_grid(100, 100, [(2, 2), (1, 1)]) == (2, 2)  # 10000 < 100352: keep the first
    # Strictly more than half: 448x896 has exactly 0.5·448²·4 = 401408 px, so the tie stays at (1,1).
    assert find_closest_grid(448, 896, [(1, 1), (2, 2)]) == (1, 1)
    assert find_closest_grid(449, 896, [(1, 1), (2, 2)]) == (2, 2)
    # image_size enters the threshold: at S=14, 1x1 vs 2x2 flips at 0.5*14²*4 = 392 px.
    assert find_closest_grid(20, 20, [(1, 1), (2, 2)], image_size=14) == (2, 2)
    assert find_closest_grid(19, 19, [(1, 1), (2, 2)], image_size=14) == (1, 1)


# ---------------------------------------------------------------------------------------------------------------
# Pixels: tiles, thumbnail and tensors against a by-hand computation
# ---------------------------------------------------------------------------------------------------------------


def _noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _expected_tensor(image, cols, rows, size, thumbnail=True):
    """Resize/crop with Pillow by hand, slice with numpy, normalize with numpy float32."""
    big = np.asarray(image.resize((size * cols, size * rows), BICUBIC))  # (rows·S, cols·S, 3)
    tiles = [big[r * size : (r + 1) * size, c * size : (c + 1) * size] for r in range(rows) for c in range(cols)]
    if thumbnail and cols * rows > 1:
        tiles.append(np.asarray(image.resize((size, size), BICUBIC)))
    x = np.stack(tiles).astype(np.float32) / np.float32(255)  # (T, S, S, 3)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # (T, 3, S, S)


@pytest.mark.parametrize("width,height,size,max_num", [(90, 60, 28, 12), (40, 120, 16, 6), (900, 700, 448, 6)])
def test_load_image_pixels_match_hand_computation(tmp_path, width, height, size, max_num):
    image = _noise_image(width, height)
    path = tmp_path / "noise.png"
    image.save(path)
    cols, rows = _brute_force_grid(width, height, GOLDEN_ORDERS[max_num], image_size=size)
    expected = _expected_tensor(image, cols, rows, size)
    got = load_image(path, input_size=size, max_num=max_num)
    assert got.dtype == torch.float32
    assert got.shape == (cols * rows + (cols * rows > 1), 3, size, size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_normalization_constants_and_values():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    tile = Image.new("RGB", (4, 4), (255, 0, 128))
    got = to_tensor([tile], image_size=4)
    want = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for channel in range(3):
        torch.testing.assert_close(got[0, channel], torch.full((4, 4), want[channel]), rtol=0, atol=1e-5)


def test_to_tensor_resizes_odd_tiles_with_pillow_bicubic():
    tile = _noise_image(10, 20, seed=3)
    expected = _expected_tensor(tile.resize((8, 8), BICUBIC), 1, 1, 8)
    torch.testing.assert_close(to_tensor([tile], image_size=8), expected, rtol=0, atol=1e-6)


def test_tiles_are_row_major_crops_of_the_stretched_image():
    # A 2x1-shaped image whose left half is red and right half blue: tile 0 is red, tile 1 blue.
    array = np.zeros((10, 20, 3), np.uint8)
    array[:, :10] = (255, 0, 0)
    array[:, 10:] = (0, 0, 255)
    tiles = dynamic_preprocess(Image.fromarray(array), max_num=2, image_size=8)
    assert [t.size for t in tiles] == [(8, 8)] * 3
    assert np.asarray(tiles[0])[:, :2].mean(axis=(0, 1)).round().tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[:, -2:].mean(axis=(0, 1)).round().tolist() == [0, 0, 255]
    # 2 rows x 3 cols: tile k sits at column k % 3, row k // 3.
    image = _noise_image(60, 40, seed=5)
    tiles = dynamic_preprocess(image, max_num=6, image_size=10, use_thumbnail=False)
    big = np.asarray(image.resize((30, 20), BICUBIC))
    assert len(tiles) == 6
    for k, tile in enumerate(tiles):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(np.asarray(tile), big[r * 10 : (r + 1) * 10, c * 10 : (c + 1) * 10])


def test_thumbnail_only_for_multi_tile_grids_and_made_from_original():
    single = _noise_image(50, 50, seed=1)
    tiles = dynamic_preprocess(single, max_num=12, image_size=50)  # 1x1 grid: no thumbnail
    assert len(tiles) == 1
    np.testing.assert_array_equal(np.asarray(tiles[0]), np.asarray(single))

    wide = _noise_image(70, 48, seed=2)  # aspect 1.458 → 3x2 (diff 0.042) at max_num 12
    tiles = dynamic_preprocess(wide, max_num=12, image_size=16)
    assert len(tiles) == 7
    thumbnail = np.asarray(tiles[-1])
    np.testing.assert_array_equal(thumbnail, np.asarray(wide.resize((16, 16), BICUBIC)))
    # Made from the original (70x48), not from the stretched 48x32 grid image.
    from_stretched = wide.resize((48, 32), BICUBIC).resize((16, 16), BICUBIC)
    assert not np.array_equal(thumbnail, np.asarray(from_stretched))
    assert len(dynamic_preprocess(wide, max_num=12, image_size=16, use_thumbnail=False)) == 6


# ---------------------------------------------------------------------------------------------------------------
# open_image: modes, orientation, sources, errors
# ---------------------------------------------------------------------------------------------------------------


def _rgb_at(image, xy=(0, 0)):
    assert image.mode == "RGB"
    return tuple(image.getpixel(xy))


def test_mode_palette():
    image = Image.new("P", (3, 3), 5)
    palette = [0] * 768
    palette[15:18] = [10, 20, 30]
    image.putpalette(palette)
    assert _rgb_at(open_image(image)) == (10, 20, 30)


def test_mode_rgba_drops_alpha_without_compositing():
    image = Image.new("RGBA", (3, 3), (10, 20, 30, 0))  # fully transparent: stored RGB survives (reference parity)
    assert _rgb_at(open_image(image)) == (10, 20, 30)


def test_mode_la_and_l_and_1():
    assert _rgb_at(open_image(Image.new("LA", (2, 2), (100, 0)))) == (100, 100, 100)
    assert _rgb_at(open_image(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    bilevel = Image.new("1", (2, 2), 0)
    bilevel.putpixel((1, 1), 1)
    out = open_image(bilevel)
    assert _rgb_at(out, (0, 0)) == (0, 0, 0) and _rgb_at(out, (1, 1)) == (255, 255, 255)


def test_mode_cmyk():
    assert _rgb_at(open_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))) == (255, 255, 255)
    assert _rgb_at(open_image(Image.new("CMYK", (2, 2), (255, 0, 0, 0)))) == (0, 255, 255)  # pure cyan
    assert _rgb_at(open_image(Image.new("CMYK", (2, 2), (0, 0, 0, 255)))) == (0, 0, 0)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 257 * 100], [32896, 65280, 65535]], dtype=np.uint16)
    expected = np.round(values / 257.0).astype(np.uint8)  # [[0, 4, 100], [128, 254, 255]]
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)  # 16-bit grayscale PNG
    for source in (path, Image.fromarray(values)):
        out = np.asarray(open_image(source))
        assert out.shape == (2, 3, 3)
        np.testing.assert_array_equal(out[..., 0], expected)
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert np.asarray(open_image(Image.fromarray(values)))[0, 1, 0] == 4  # clipping would have given 255


def test_mode_i_and_f():
    as_int = Image.fromarray(np.array([[65535, 257 * 7]], dtype=np.int32))
    assert as_int.mode == "I"
    assert np.asarray(open_image(as_int))[0, :, 0].tolist() == [255, 7]
    unit_float = Image.fromarray(np.array([[1.0, 0.2, 0.0]], dtype=np.float32))
    assert np.asarray(open_image(unit_float))[0, :, 1].tolist() == [255, 51, 0]
    byte_float = Image.fromarray(np.array([[200.0, 3.0, 300.0]], dtype=np.float32))
    assert np.asarray(open_image(byte_float))[0, :, 1].tolist() == [200, 3, 255]


def test_open_image_does_not_modify_caller_image():
    image = Image.new("RGBA", (2, 2), (1, 2, 3, 4))
    out = open_image(image)
    assert image.mode == "RGBA" and out is not image


def _jpeg_with_orientation(orientation):
    array = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_applied_by_default_and_not_in_reference_mode():
    data = _jpeg_with_orientation(6)  # 6 = display after rotating 90° clockwise
    upright = open_image(data)
    raw = open_image(data, exif_transpose=False)
    assert raw.size == (40, 20)
    assert upright.size == (20, 40)
    # Rotating clockwise puts the stored left (red) half on top.
    top, bottom = np.asarray(upright)[2, 10].astype(int), np.asarray(upright)[37, 10].astype(int)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert load_image(data, input_size=8, max_num=1).shape == (1, 3, 8, 8)


def test_all_sources_give_identical_tensors(tmp_path, monkeypatch):
    image = _noise_image(48, 30, seed=7)
    path = tmp_path / "img.png"
    image.save(path)
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()

    class _Response(io.BytesIO):
        headers = {"Content-Length": str(len(data))}

    monkeypatch.setattr(image_mod.urllib.request, "urlopen", lambda req, timeout: _Response(data))
    sources = [path, str(path), data, bytearray(data), b64, f"data:image/png;base64,{b64}", image,
               "https://example.invalid/img.png"]  # fmt: skip
    reference = load_image(image, input_size=16, max_num=6)
    assert reference.shape[0] == 7  # 48x30 → 3x2 grid + thumbnail
    for source in sources:
        torch.testing.assert_close(load_image(source, input_size=16, max_num=6), reference, rtol=0, atol=0)


def test_url_errors(monkeypatch):
    def no_network(req, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(image_mod.urllib.request, "urlopen", no_network)
    with pytest.raises(ConnectionError, match="example.invalid"):
        open_image("http://example.invalid/x.png")

    def not_found(req, timeout):
        raise urllib.error.HTTPError(req.full_url, 404, "Not Found", {}, None)

    monkeypatch.setattr(image_mod.urllib.request, "urlopen", not_found)
    with pytest.raises(ValueError, match="404"):
        open_image("https://example.invalid/x.png")

    class _Huge(io.BytesIO):
        headers = {"Content-Length": str(10**12)}

    monkeypatch.setattr(image_mod.urllib.request, "urlopen", lambda req, timeout: _Huge(b""))
    with pytest.raises(ValueError, match="limit"):
        open_image("https://example.invalid/x.png")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(missing)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(str(missing))
    with pytest.raises(FileNotFoundError, match="cat"):
        load_image("cat")


def test_corrupt_truncated_empty_files_raise_value_error(tmp_path):
    good = io.BytesIO()
    _noise_image(64, 64).save(good, format="PNG")
    jpeg = io.BytesIO()
    _noise_image(64, 64).save(jpeg, format="JPEG")
    cases = {
        "corrupt.png": b"this is not an image at all" * 10,
        "truncated.png": good.getvalue()[: len(good.getvalue()) // 2],
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "empty.png": b"",
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=name) as info:
            open_image(path)
        assert "PNG" in str(info.value) and "JPEG" in str(info.value)  # says what is accepted
    with pytest.raises(ValueError, match="bytes"):
        open_image(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="base64"):
        open_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ValueError, match="directory"):
        open_image(str(tmp_path))
    with pytest.raises(ValueError, match="directory"):
        open_image(tmp_path)


def test_decompression_bomb_guard_kept_and_reported(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    assert Image.MAX_IMAGE_PIXELS is not None  # the guard is on
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # test-local; restored by monkeypatch
    with pytest.raises(ValueError, match="10000 pixels"):
        open_image(path)


def test_unsupported_source_type():
    with pytest.raises(ValueError, match="accepted"):
        open_image(12345)


# ---------------------------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_num=0), "max_num"),
        (dict(min_num=0), "min_num"),
        (dict(min_num=5, max_num=4), "min_num=5, max_num=4"),
        (dict(max_num=2.5), "max_num"),
        (dict(max_num=True), "max_num"),
        (dict(input_size=0), "input_size"),
        (dict(input_size=-448), "input_size"),
    ],
)
def test_load_image_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_image(Image.new("RGB", (8, 8)), **kwargs)


def test_other_argument_validation():
    with pytest.raises(ValueError, match="max_num must be >= min_num"):
        candidate_grids(3, 2)
    with pytest.raises(ValueError, match="width"):
        tile_grid(0, 10)
    with pytest.raises(ValueError, match="height"):
        num_tiles(10, -1)
    with pytest.raises(ValueError, match="empty"):
        find_closest_grid(10, 10, [])
    with pytest.raises(ValueError, match="image_size"):
        dynamic_preprocess(Image.new("RGB", (8, 8)), image_size=0)
    with pytest.raises(ValueError, match="PIL"):
        dynamic_preprocess(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one tile"):
        to_tensor([])
    with pytest.raises(ValueError, match="'L'"):
        to_tensor([Image.new("L", (8, 8))], image_size=8)
