"""Tests for internvl.preprocessing.video against INTERNVL.md §9.6 and §8.2.

Videos are generated in a temporary directory with PyAV using lossless codecs (PNG in MOV, FFV1 in MKV), each frame a
solid colour that encodes its index, so the frames `load_video` returns can be identified exactly.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from internvl.preprocessing.image import IMAGENET_MEAN, IMAGENET_STD
from internvl.preprocessing.video import frame_indices, load_video, video_prompt_prefix

WIDTH, HEIGHT, FPS = 64, 48, 10


def _colour(index):
    return (6 * index, 255 - 6 * index, 120)  # distinct per index for index < 43


def _make_video(path, num_frames, container, codec, pix_fmt, fps=FPS):
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for index in range(num_frames):
            frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            frame[...] = _colour(index)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def mov_video(tmp_path_factory):  # PNG codec, frame count stored in the container
    return _make_video(tmp_path_factory.mktemp("video") / "clip.mov", 40, "mov", "png", "rgb24")


@pytest.fixture(scope="module")
def mkv_video(tmp_path_factory):  # FFV1 in Matroska: no stored frame count, so frames must be counted
    return _make_video(tmp_path_factory.mktemp("video") / "clip.mkv", 40, "matroska", "ffv1", "bgr0")


def _identify(pixel_values):
    """Undo the normalization of each tile and return the index whose colour is nearest to the tile's mean colour."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (pixel_values * std + mean).mul(255).mean(dim=(2, 3))  # (K, 3)
    codes = torch.tensor([_colour(i) for i in range(43)], dtype=torch.float32)  # (43, 3)
    distances = torch.cdist(rgb, codes)
    assert distances.min(dim=1).values.max() < 1.0  # lossless codec: colours survive exactly (up to float error)
    return distances.argmin(dim=1).tolist()


# ---------------------------------------------------------------------------------------------------------------
# frame_indices (§9.6)
# ---------------------------------------------------------------------------------------------------------------


def test_frame_indices_spec_golden_values():
    assert frame_indices(300, 30.0, num_segments=8) == [18, 55, 93, 130, 168, 205, 242, 280]
    golden_100 = [3, 9, 15, 22, 28, 34, 40, 46, 53, 59, 65, 71, 77, 83, 90, 96]
    assert frame_indices(100, 25.0, num_segments=16) == golden_100
    assert frame_indices(300, 30.0, bound=(2, 4), num_segments=4) == [67, 82, 97, 112]
    assert frame_indices(5, 30.0, num_segments=8) == [0, 0, 1, 2, 2, 2, 3, 4]


def _numpy_formula(num_frames, fps, bound, num_segments):
    """§9.6 steps 1–4 written directly with numpy (independent of the package)."""
    start, end = bound if bound is not None else (-100000, 100000)
    first = int(max(0, np.round(start * fps)))  # round(x) and np.round are both half-to-even for floats
    last = int(min(np.round(end * fps), num_frames - 1))
    seg = (last - first) / num_segments
    k = np.arange(num_segments)
    return np.trunc(first + seg / 2 + np.round(seg * k)).astype(int).tolist()


@pytest.mark.parametrize(
    "num_frames,fps,bound,num_segments",
    [
        (40, 10.0, None, 8),
        (1000, 29.97, None, 32),
        (1000, 23.976, (1.5, 3.25), 7),
        (48, 24.0, None, 32),  # seg = 47/32: half-way cases in seg·k are rounded to even
        (7, 3.0, (0.0, 1.0), 3),
    ],
)
def test_frame_indices_against_independent_numpy_formula(num_frames, fps, bound, num_segments):
    assert frame_indices(num_frames, fps, bound=bound, num_segments=num_segments) == _numpy_formula(
        num_frames, fps, bound, num_segments
    )


def test_frame_indices_half_to_even():
    # 9 frames, 16 segments: seg = 0.5; seg·k = 0, 0.5, 1, 1.5, 2, 2.5 … rounds half to even to 0, 0, 1, 2, 2, 2 …
    expected = [int(0.25 + r) for r in [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 8]]
    assert frame_indices(9, 1.0, num_segments=16) == expected
    # Python's round(2.5 s · 1 fps) is 2 (half to even), not 3.
    assert frame_indices(10, 1.0, bound=(2.5, 9), num_segments=1)[0] == int(2 + 7 / 2)


def test_frame_indices_validation():
    with pytest.raises(ValueError, match="num_frames"):
        frame_indices(0, 30.0)
    with pytest.raises(ValueError, match="fps"):
        frame_indices(10, 0.0)
    with pytest.raises(ValueError, match="fps"):
        frame_indices(10, float("nan"))
    with pytest.raises(ValueError, match="num_segments"):
        frame_indices(10, 30.0, num_segments=0)
    with pytest.raises(ValueError, match="bound"):
        frame_indices(10, 30.0, bound=(1,))
    with pytest.raises(ValueError, match="selects no frames"):
        frame_indices(10, 1.0, bound=(20, 30))  # starts after the last frame


def test_video_prompt_prefix():
    assert video_prompt_prefix(1) == "Frame1: <image>\n"
    assert video_prompt_prefix(3) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\n"
    assert "Frame-" not in video_prompt_prefix(8)  # the training form has a hyphen; inference does not (§8.2)
    with pytest.raises(ValueError, match="num_frames"):
        video_prompt_prefix(0)


# ---------------------------------------------------------------------------------------------------------------
# load_video
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mov_video", "mkv_video"])
def test_load_video_returns_the_selected_frames(request, which):
    path = request.getfixturevalue(which)
    pixel_values, num_patches_list = load_video(path, input_size=16, num_segments=8)
    assert pixel_values.shape == (8, 3, 16, 16) and pixel_values.dtype == torch.float32
    assert num_patches_list == [1] * 8
    assert _identify(pixel_values) == frame_indices(40, FPS, num_segments=8)


def test_load_video_with_bound(mov_video):
    pixel_values, num_patches_list = load_video(mov_video, bound=(1.0, 2.5), input_size=8, num_segments=5)
    expected = frame_indices(40, FPS, bound=(1.0, 2.5), num_segments=5)
    assert all(10 <= i <= 25 for i in expected)
    assert _identify(pixel_values) == expected and num_patches_list == [1] * 5


def test_load_video_short_clip_repeats_frames(tmp_path):
    path = _make_video(tmp_path / "short.mkv", 5, "matroska", "ffv1", "bgr0")
    pixel_values, _ = load_video(path, input_size=8, num_segments=8)
    assert _identify(pixel_values) == [0, 0, 1, 2, 2, 2, 3, 4]  # spec golden value (§9.6)


def test_load_video_pixels_and_default_size(mov_video):
    pixel_values, num_patches_list = load_video(mov_video, num_segments=2)  # default input_size 448
    assert pixel_values.shape == (2, 3, 448, 448) and num_patches_list == [1, 1]
    index = frame_indices(40, FPS, num_segments=2)[0]
    expected = (np.float32(_colour(index)) / np.float32(255) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    torch.testing.assert_close(
        pixel_values[0], torch.from_numpy(expected).view(3, 1, 1).expand(3, 448, 448), rtol=0, atol=1e-6
    )


def test_load_video_max_num_tiles_each_frame(mov_video):
    # 64x48 frames → 4x3 grid at max_num 12, plus the thumbnail (the model card passes use_thumbnail=True).
    pixel_values, num_patches_list = load_video(mov_video, input_size=8, max_num=12, num_segments=2)
    assert num_patches_list == [13, 13] and pixel_values.shape == (26, 3, 8, 8)
    indices = frame_indices(40, FPS, num_segments=2)
    assert _identify(pixel_values) == [indices[0]] * 13 + [indices[1]] * 13


def test_load_video_from_bytes_matches_path(mkv_video):
    from_path = load_video(mkv_video, input_size=8, num_segments=4)
    from_bytes = load_video(mkv_video.read_bytes(), input_size=8, num_segments=4)
    torch.testing.assert_close(from_bytes[0], from_path[0], rtol=0, atol=0)
    assert from_bytes[1] == from_path[1]


def test_load_video_errors(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(missing)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"definitely not a video" * 50)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        load_video(corrupt)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        load_video(empty)
    with pytest.raises(ValueError, match="directory"):
        load_video(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        load_video(b"")
    with pytest.raises(ValueError, match="accepted"):
        load_video(42)


def test_load_video_audio_only_file(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(ValueError, match="no video stream"):
        load_video(path)


def test_load_video_argument_validation(mov_video):
    with pytest.raises(ValueError, match="input_size"):
        load_video(mov_video, input_size=0)
    with pytest.raises(ValueError, match="max_num"):
        load_video(mov_video, max_num=0)
    with pytest.raises(ValueError, match="num_segments"):
        load_video(mov_video, num_segments=0)
    with pytest.raises(ValueError, match="selects no frames"):
        load_video(mov_video, bound=(100, 200), input_size=8)
