"""Meta file, record validation, the SFT dataset, video frame sampling, JPEG augmentation and collation
(INTERNVL.md §12, §9.5, §9.6 "Training", §13.5, §15, §20 items 29-31).

Expected tile counts, frame indices and error locations are derived by hand from the spec in the comments.
"""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch
from helpers_tokenizers import make_bpe_tokenizer_dir
from PIL import Image

from internvl.preprocessing.image import IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess, to_tensor
from internvl.tokenizer import load_tokenizer
from internvl.training.augment import jpeg_recompress
from internvl.training.data import (
    DataConfig,
    SupervisedDataset,
    collate,
    load_meta,
    read_records,
    sample_frame_indices,
    validate,
)

S, TOKENS_PER_TILE = 56, 4
CFG = DataConfig("internvl2_5", num_image_token=TOKENS_PER_TILE, image_size=S, max_dynamic_patch=6)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def ids_of(tok, token):
    return tok.convert_tokens_to_ids(token)


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def human_gpt(question="What is this?", answer="A cat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_meta(directory, datasets):
    """datasets: {name: (list of JSON-able lines or raw strings, extra meta keys)} -> meta path. Media live in
    directory/media; annotation and root paths are written relative to the meta file."""
    meta = {}
    for name, (lines, extra) in datasets.items():
        text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
        (directory / f"{name}.jsonl").write_text(text + "\n", encoding="utf-8")
        meta[name] = {"root": "media", "annotation": f"{name}.jsonl", **extra}
    (directory / "media").mkdir(exist_ok=True)
    path = directory / "meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


@pytest.fixture
def media(tmp_path):
    (tmp_path / "media").mkdir()
    noise_image(112, 56, 1).save(tmp_path / "media" / "wide.png")  # 2:1
    noise_image(224, 56, 2).save(tmp_path / "media" / "long.png")  # 4:1
    noise_image(56, 56, 3).save(tmp_path / "media" / "square.png")
    (tmp_path / "media" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Meta file and repeat_time (§12.1)


def test_repeat_time_semantics(tmp_path):
    lines = [{"id": k, "conversations": human_gpt(f"q{k}")} for k in range(5)]
    path = write_meta(tmp_path, {"half": (lines, {"repeat_time": 0.5}), "triple": (lines, {"repeat_time": 3}),
                                 "once": (lines, {})})
    half, triple, once = load_meta(path)
    # 0.5: the first floor(5 * 0.5) = 2 lines; 3: the line list three times; 1 (default): unchanged
    assert [r.line for r in read_records(half)] == [1, 2]
    assert [r.line for r in read_records(triple)] == [1, 2, 3, 4, 5] * 3
    assert [r.data["id"] for r in read_records(once)] == [0, 1, 2, 3, 4]


def test_repeat_time_keeps_unread_lines_out_of_validation(tmp_path):
    lines = [{"conversations": human_gpt()}, "{broken"]
    path = write_meta(tmp_path, {"d": (lines, {"repeat_time": 0.5})})
    records, errors = validate(path)
    assert len(records) == 1 and errors == []  # line 2 is past floor(2 * 0.5) = 1 and never read


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"repeat_time": 2.5}, "must be an integer"),
        ({"repeat_time": 0}, "positive number"),
        ({"annotation": "data.json"}, r"\.jsonl"),
        ({"data_augment": "yes"}, "true or false"),
        ({"max_dynamic_patch": 0}, "positive integer"),
        ({"annotation": "missing.jsonl"}, "does not exist"),
    ],
)
def test_bad_meta_entries(tmp_path, extra, message):
    path = write_meta(tmp_path, {"d": ([{"conversations": human_gpt()}], {})})
    meta = json.loads(path.read_text())
    meta["d"].update(extra)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_meta(path)


# ---------------------------------------------------------------------------------------------------------------
# Validation: per-record errors with file:line (§12.2)


BAD_LINES = [
    {"image": "square.png", "conversations": human_gpt("<image>\nok")},  # 1 good
    {"image": "nope.png", "conversations": human_gpt()},  # 2 missing image file
    '{"conversations": [',  # 3 bad JSON
    {"image": ["square.png", "wide.png"], "conversations": human_gpt("<image><image><image> three tags")},  # 4
    {"image": "square.png", "conversations": human_gpt("<image> and <image>")},  # 5 two tags for one image
    {"conversations": []},  # 6 empty conversation
    {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},  # 7 not alternating
    "[1, 2]",  # 8 not an object
    {"conversations": human_gpt()},  # 9 good (pure text)
    {"conversations": human_gpt("<image>\nno image given")},  # 10 placeholder without image
    {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},  # 11 starts with gpt
    {"video": "clip.mp4", "conversations": human_gpt("<video> no newline")},  # 12 missing video, bad <video>
]


def test_validation_reports_each_problem_with_file_and_line(media):
    path = write_meta(media, {"d": (BAD_LINES, {})})
    records, errors = validate(path)
    annotation = str(media / "d.jsonl")
    assert [r.line for r in records] == [1, 9]
    assert all(e.file == annotation for e in errors)
    by_line = {}
    for error in errors:
        by_line.setdefault(error.line, []).append(error.message)
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    assert "file not found" in by_line[2][0] and "nope.png" in by_line[2][0]
    assert "invalid JSON" in by_line[3][0]
    assert "3 <image> placeholders but 2 images" in by_line[4][0]
    assert "2 <image> placeholders but 1 image" in by_line[5][0]
    assert "empty 'conversations'" in by_line[6][0]
    assert "alternate" in by_line[7][0]
    assert "JSON object" in by_line[8][0]
    assert "no 'image'" in by_line[10][0]
    assert "alternate" in by_line[11][0]
    assert any("followed by a newline" in m for m in by_line[12]) and any("clip.mp4" in m for m in by_line[12])
    assert str(errors[0]).startswith(f"{annotation}:2: ")


def test_system_turn_only_accepted_for_internvl2_5(tmp_path):
    line = {"conversations": [{"from": "system", "value": "S"}] + human_gpt()}
    path = write_meta(tmp_path, {"d": ([line], {})})
    assert validate(path, template="internvl2_5")[1] == []
    errors = validate(path, template="Hermes-2")[1]
    assert len(errors) == 1 and errors[0].line == 1 and "only accepted by the internvl2_5" in errors[0].message


def test_dataset_refuses_bad_records_listing_file_line(media, tok):
    path = write_meta(media, {"d": (BAD_LINES, {})})
    with pytest.raises(ValueError) as info:
        SupervisedDataset(path, tok, CFG)
    text = str(info.value)
    annotation = str(media / "d.jsonl")
    for line in (2, 3, 4, 5, 6, 7, 8, 10, 11, 12):
        assert f"{annotation}:{line}: " in text
    assert f"{annotation}:1: " not in text and f"{annotation}:9: " not in text
    assert text.startswith("11 problems in 10 annotation lines")


def test_error_list_is_capped_at_20_with_the_total(tmp_path, tok):
    path = write_meta(tmp_path, {"d": (["{bad"] * 25 + [{"conversations": human_gpt()}], {})})
    with pytest.raises(ValueError) as info:
        SupervisedDataset(path, tok, CFG)
    text = str(info.value)
    assert text.startswith("25 problems in 25 annotation lines")
    assert ":20: invalid JSON" in text and ":21: " not in text and "... and 5 more" in text


def test_skip_bad_records_keeps_going_and_counts(media, tok):
    path = write_meta(media, {"d": (BAD_LINES, {"repeat_time": 2})})
    dataset = SupervisedDataset(path, tok, CFG, skip_bad_records=True)
    assert len(dataset) == 4  # lines 1 and 9, twice
    assert dataset.skipped.count == 10
    assert sorted({e.line for e in dataset.skipped.errors}) == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    assert all(dataset[i]["input_ids"].ndim == 1 for i in range(len(dataset)))


# ---------------------------------------------------------------------------------------------------------------
# Samples: images, text, budgets (§12.3, §9.5)


def _untile(tok, item):
    """(number of <img> blocks, <IMG_CONTEXT> count)."""
    ids = item["input_ids"].tolist()
    return ids.count(ids_of(tok, "<img>")), ids.count(ids_of(tok, "<IMG_CONTEXT>"))


def test_single_image_sample(media, tok):
    path = write_meta(media, {"d": ([{"image": "wide.png", "conversations": human_gpt()}], {})})
    item = SupervisedDataset(path, tok, CFG)[0]
    # 112x56 has aspect 2: grid (2, 1) -> 2 tiles + thumbnail = 3 tiles of 4 tokens
    assert item["num_tiles"] == [3]
    assert item["pixel_values"].shape == (3, 3, S, S) and item["pixel_values"].dtype == torch.float32
    assert item["image_flags"].tolist() == [1, 1, 1]
    assert _untile(tok, item) == (1, 12)
    expected = to_tensor(dynamic_preprocess(Image.open(media / "media" / "wide.png").convert("RGB"), 1, 6, S), S)
    torch.testing.assert_close(item["pixel_values"], expected, rtol=0, atol=0)
    # "<image>\n" was auto-prefixed to the first human turn
    text = tok.decode(item["input_ids"].tolist())
    assert "<|im_start|>user\n<img>" in text and "</img>\nWhat is this?<|im_end|>" in text


def test_auto_prefix_goes_to_the_human_turn_after_a_system_turn(media, tok):
    line = {"image": "square.png", "conversations": [{"from": "system", "value": "Sys."}] + human_gpt()}
    path = write_meta(media, {"d": ([line], {})})
    text = tok.decode(SupervisedDataset(path, tok, CFG)[0]["input_ids"].tolist())
    block = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"  # 56x56 -> one tile, no thumbnail
    assert text.startswith(f"<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\n{block}\nWhat is this?")


def test_pure_text_sample_has_one_dummy_tile_with_flag_0(media, tok):
    path = write_meta(media, {"d": ([{"conversations": human_gpt()}], {})})
    item = SupervisedDataset(path, tok, CFG)[0]
    assert item["image_flags"].tolist() == [0] and item["num_tiles"] == []
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(item["pixel_values"], white.view(1, 3, 1, 1).expand(1, 3, S, S), rtol=0, atol=1e-6)
    assert _untile(tok, item) == (0, 0)


def test_multi_image_budget_and_dataset_override(media, tok):
    two = {"image": ["long.png", "square.png"], "conversations": human_gpt("<image>\n<image>\nCompare.")}
    one = {"image": "long.png", "conversations": human_gpt()}
    path = write_meta(media, {"multi": ([two], {}), "single": ([one], {}), "small": ([one], {"max_dynamic_patch": 2})})
    dataset = SupervisedDataset(path, tok, CFG)
    # long.png is 4:1. Alone with max 6: grid (4, 1) -> 5 tiles. Two images: max(1, 6 // 2) = 3 -> grid (3, 1) ->
    # 4 tiles; square.png -> 1 tile. Dataset max_dynamic_patch 2 -> grid (2, 1) -> 3 tiles.
    assert dataset[0]["num_tiles"] == [4, 1]
    assert _untile(tok, dataset[0]) == (2, 20)
    assert dataset[1]["num_tiles"] == [5]
    assert dataset[2]["num_tiles"] == [3]


def test_corrupt_image_is_substituted_and_counted(media, tok):
    lines = [{"image": "corrupt.jpg", "conversations": human_gpt()}] + [
        {"id": k, "conversations": human_gpt(f"question {k}")} for k in range(4)
    ]
    path = write_meta(media, {"d": (lines, {})})
    dataset = SupervisedDataset(path, tok, CFG)  # the file exists, so validation passes
    items = [dataset[i] for i in range(len(dataset))]  # a whole epoch, no exception
    assert dataset.counters["load_failures"] == 1 and dataset.counters["substituted"] == 1
    assert "d.jsonl:1" in dataset.failures[0] and "cannot decode image" in dataset.failures[0]
    # the substitute is one of the good samples, and the choice is reproducible
    assert any(torch.equal(items[0]["input_ids"], items[k]["input_ids"]) for k in range(1, 5))
    assert torch.equal(dataset[0]["input_ids"], items[0]["input_ids"])
    assert dataset.counters["load_failures"] == 2


def test_image_block_cut_by_truncation_is_substituted(media, tok):
    cfg = DataConfig("internvl2_5", num_image_token=TOKENS_PER_TILE, image_size=S, max_seq_length=40)
    lines = [{"image": "long.png", "conversations": human_gpt()}, {"conversations": human_gpt()}]
    dataset = SupervisedDataset(write_meta(media, {"d": (lines, {})}), tok, cfg)
    item = dataset[0]
    assert dataset.counters["load_failures"] == 1 and "cut an image block" in dataset.failures[0]
    assert item["image_flags"].tolist() == [0]  # the text-only sample stood in


# ---------------------------------------------------------------------------------------------------------------
# JPEG augmentation (§15)


def test_jpeg_qualities_are_drawn_from_75_to_100():
    tile = noise_image(S, S, 7)
    candidates = {}
    for quality in range(1, 101):  # every quality's re-encoding, to identify the drawn one
        buffer = io.BytesIO()
        tile.save(buffer, format="JPEG", quality=quality)
        candidates.setdefault(np.asarray(Image.open(buffer).convert("RGB")).tobytes(), []).append(quality)
    assert all(len(q) == 1 for key, q in candidates.items() if q[0] >= 75)  # qualities 75..100 are identifiable
    rng = np.random.default_rng(0)
    drawn = [candidates[np.asarray(jpeg_recompress(tile, rng)).tobytes()] for _ in range(300)]
    qualities = [q[0] for q in drawn]
    assert min(qualities) == 75 and max(qualities) == 100  # both ends reachable, nothing outside
    assert len(set(qualities)) == 26
    # seeded: the same rng state gives the same sequence
    again = np.random.default_rng(0)
    assert all(np.asarray(jpeg_recompress(tile, again)).tobytes() in candidates for _ in range(3))


def _jpeg_variants(tile):
    out = {}
    for quality in range(75, 101):
        buffer = io.BytesIO()
        tile.save(buffer, format="JPEG", quality=quality)
        out[quality] = to_tensor([Image.open(buffer).convert("RGB")], S)[0]
    return out


def test_augmentation_per_tile_only_when_enabled(media, tok):
    line = {"image": "long.png", "conversations": human_gpt()}
    path = write_meta(media, {"plain": ([line], {}), "aug": ([line], {"data_augment": True})})
    dataset = SupervisedDataset(path, tok, CFG)
    tiles = dynamic_preprocess(Image.open(media / "media" / "long.png").convert("RGB"), 1, 6, S)  # 4 + thumbnail
    torch.testing.assert_close(dataset[0]["pixel_values"], to_tensor(tiles, S), rtol=0, atol=0)

    augmented = dataset[1]["pixel_values"]
    qualities = []
    for tile, tensor in zip(tiles, augmented):  # thumbnail included
        matches = [q for q, v in _jpeg_variants(tile).items() if torch.equal(v, tensor)]
        assert matches, "each tile is a JPEG re-encoding at a quality in 75..100"
        qualities.append(matches[0])
    assert len(set(qualities)) > 1  # each tile draws its own quality
    assert torch.equal(dataset[1]["pixel_values"], augmented)  # reproducible within an epoch
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["pixel_values"], augmented)  # and re-drawn in the next


# ---------------------------------------------------------------------------------------------------------------
# Video (§9.6 "Training", §12.4)


def test_sample_frame_indices_by_hand():
    # 'middle', 4 of 20: bounds int(linspace(0, 20, 5)) = 0, 5, 10, 15, 20 -> (a + b - 1) // 2
    assert sample_frame_indices(4, 20, "middle") == [2, 7, 12, 17]
    # 8 of 5 frames: 5 one-frame intervals leave no a..b-2 choice -> sorted subset of all 5, padded with the last
    assert sample_frame_indices(8, 5, "rand", np.random.default_rng(3)) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert sample_frame_indices(8, 5, "middle") == [0, 1, 2, 3, 4, 4, 4, 4]
    # 'fps2' on 30 frames at 10 fps: slot centres 0.25, 0.75, ... 2.75 s -> 2.5, 7.5, ... 27.5 -> half to even
    assert sample_frame_indices(8, 30, "fps2", input_fps=10) == [2, 8, 12, 18, 22, 28]
    assert sample_frame_indices(8, 30, "fps2", input_fps=10, max_num_frames=4) == [2, 8, 12, 18]


def test_rand_sampling_never_picks_the_last_frame_of_an_interval():
    seen = set()
    for seed in range(200):
        indices = sample_frame_indices(4, 20, "rand", np.random.default_rng(seed))
        for k, index in enumerate(indices):
            assert 5 * k <= index <= 5 * k + 3  # interval [5k, 5k + 5): a .. b-2
        seen.update(indices)
    assert seen == {i for k in range(4) for i in range(5 * k, 5 * k + 4)}


VIDEO_FRAMES, VIDEO_FPS = 20, 10


def _colour(index):
    return (10 * index, 255 - 10 * index, 90)


def _identify(pixel_values):
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (pixel_values * std + mean).mul(255).mean(dim=(2, 3))
    codes = torch.tensor([_colour(i) for i in range(VIDEO_FRAMES)], dtype=torch.float32)
    return torch.cdist(rgb, codes).argmin(dim=1).tolist()


@pytest.fixture
def video_media(media):
    with av.open(str(media / "media" / "clip.mov"), "w", format="mov") as out:
        stream = out.add_stream("png", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "rgb24"
        for index in range(VIDEO_FRAMES):
            frame = np.empty((24, 32, 3), np.uint8)
            frame[...] = _colour(index)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return media


def test_video_sample_middle(video_media, tok):
    cfg = DataConfig("internvl2_5", TOKENS_PER_TILE, S, min_num_frame=4, max_num_frame=4, frame_sampling="middle")
    line = {"video": "clip.mov", "conversations": human_gpt("<video>\nWhat happens?")}
    clip = {"video": "clip.mov", "clip": [1.0, 2.0], "conversations": human_gpt("Describe.")}  # no tag: prefixed
    dataset = SupervisedDataset(write_meta(video_media, {"d": ([line, clip], {"data_augment": True})}), tok, cfg)
    item = dataset[0]
    assert _identify(item["pixel_values"]) == [2, 7, 12, 17]
    assert item["num_tiles"] == [1, 1, 1, 1] and item["image_flags"].tolist() == [1] * 4
    block = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    text = tok.decode(item["input_ids"].tolist())
    frames = "\n".join(f"Frame-{k}: {block}" for k in range(1, 5))
    assert f"<|im_start|>user\n{frames}\nWhat happens?<|im_end|>" in text
    # clip [1 s, 2 s] at 10 fps: frames 10..19 (vlen 10) -> bounds 0, 2, 5, 7, 10 -> middles 0, 3, 5, 8, + 10
    assert _identify(dataset[1]["pixel_values"]) == [10, 13, 15, 18]
    # video frames are never JPEG-augmented (§20 item 31): colours are exact
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (item["pixel_values"] * std + mean).mul(255)
    assert torch.allclose(rgb[0, :, 0, 0], torch.tensor(_colour(2), dtype=torch.float32), atol=1e-3)


def test_video_rand_sampling_is_reproducible_per_epoch(video_media, tok):
    cfg = DataConfig("internvl2_5", TOKENS_PER_TILE, S, min_num_frame=2, max_num_frame=6, seed=5)
    line = {"video": "clip.mov", "conversations": human_gpt("<video>\nWhat happens?")}
    dataset = SupervisedDataset(write_meta(video_media, {"d": ([line], {})}), tok, cfg)
    per_epoch = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        first, second = _identify(dataset[0]["pixel_values"]), _identify(dataset[0]["pixel_values"])
        assert first == second
        assert 2 <= len(first) <= 6 and first == sorted(first)
        per_epoch.append(tuple(first))
    assert len(set(per_epoch)) > 1


# ---------------------------------------------------------------------------------------------------------------
# Collation (§13.5)


def test_collate_pads_right_and_masks_by_length():
    a = {"input_ids": torch.tensor([5, 0, 6]), "labels": torch.tensor([-100, 0, 6]),
         "pixel_values": torch.zeros(1, 3, S, S), "image_flags": torch.tensor([0])}
    b = {"input_ids": torch.tensor([0, 8, 9, 10, 11]), "labels": torch.tensor([-100, -100, 9, 10, 11]),
         "pixel_values": torch.ones(2, 3, S, S), "image_flags": torch.tensor([1, 1])}
    batch = collate([a, b], pad_token_id=7)
    assert batch["input_ids"].tolist() == [[5, 0, 6, 7, 7], [0, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[-100, 0, 6, -100, -100], [-100, -100, 9, 10, 11]]
    # id 0 is a real token (Qwen's "!"), so the mask comes from the lengths, not from ids != 0
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1, 1], [0, 1, 2, 3, 4]]
    assert batch["pixel_values"].shape == (3, 3, S, S) and batch["image_flags"].tolist() == [0, 1, 1]
