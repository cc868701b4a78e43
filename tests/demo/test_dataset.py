import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from internvl.demo.dataset import main, write_dataset

N_TRAIN, N_VAL = 100, 30
ALL_KINDS = {"color", "shape", "position", "count", "ocr", "grounding", "describe", "compare", "multiturn", "text"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    meta_path = write_dataset(out, N_TRAIN, N_VAL, seed=3)
    return out, meta_path


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def images_of(record):
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else image


def pixel_digest(path):
    with Image.open(path) as im:
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def check_meta(meta_path, n):
    meta = json.loads(Path(meta_path).read_text())
    assert len(meta) == 1
    (entry,) = meta.values()
    assert {"root", "annotation", "data_augment", "repeat_time", "length"} <= set(entry)
    assert entry["annotation"].endswith(".jsonl") and Path(entry["annotation"]).is_file()
    assert Path(entry["root"]).is_dir()
    assert entry["length"] == n == len(read_jsonl(entry["annotation"]))
    assert entry["repeat_time"] == 1 and entry["data_augment"] is False
    return entry


def check_record(record, root):
    images = images_of(record)
    conv = record["conversations"]
    assert isinstance(record["id"], str)
    assert len(conv) >= 2 and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    text = "".join(t["value"] for t in conv)
    assert text.count("<image>") == len(images)
    assert all("<image>" not in t["value"] for t in conv[1:])  # placeholders only in the first human turn
    if len(images) == 1:
        assert conv[0]["value"].startswith("<image>\n")
    elif len(images) == 2:
        assert conv[0]["value"].startswith("Image-1: <image>\nImage-2: <image>\n")
    for rel in images:
        path = Path(root) / rel
        assert path.is_file()
        with Image.open(path) as im:
            assert im.size == (224, 224) and im.mode == "RGB"


def test_meta_and_train_records(dataset):
    out, meta_path = dataset
    entry = check_meta(meta_path, N_TRAIN)
    records = read_jsonl(entry["annotation"])
    assert len({r["id"] for r in records}) == N_TRAIN
    for r in records:
        check_record(r, entry["root"])
    # Mixture for 100 conversations: 12 text, 14 two-image, 22 one-image single-question records.
    assert sum(len(images_of(r)) == 0 for r in records) == 12
    assert sum(len(images_of(r)) == 2 for r in records) == 14
    assert sum(len(images_of(r)) == 1 and len(r["conversations"]) == 2 for r in records) == 22
    single = [r for r in records if len(images_of(r)) == 1]
    assert all(r["width"] == 224 and r["height"] == 224 for r in single)
    assert all(not Path(images_of(r)[0]).is_absolute() for r in single)


def test_summary_counts_every_kind(dataset):
    out, _ = dataset
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["train_counts"]
    assert {k.split(":")[1] for k in counts if k.startswith("kind:")} == ALL_KINDS | {"list"}
    assert sum(v for k, v in counts.items() if k.startswith("record:")) == N_TRAIN
    assert summary["eval_images"] == sum(len(r["images"]) for r in read_jsonl(out / "eval.jsonl"))


def test_captions_come_after_the_questions_they_would_answer(dataset):
    out, _ = dataset
    caption = re.compile(r"Objects: .*|(A|An) \w+ \w+ (at|on|in) the .*")  # list / describe answers
    seen = 0
    for r in read_jsonl(out / "train.jsonl"):
        answers = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        kinds = [bool(caption.fullmatch(a)) for a in answers]
        seen += any(kinds)
        assert kinds == sorted(kinds), answers  # no question answered after a caption
    assert seen >= 5


def test_val_meta_and_records(dataset):
    out, _ = dataset
    entry = check_meta(out / "val_meta.json", N_VAL)
    for r in read_jsonl(entry["annotation"]):
        check_record(r, entry["root"])


def test_eval_records(dataset):
    out, _ = dataset
    records = read_jsonl(out / "eval.jsonl")
    assert len(records) == N_VAL
    assert {r["kind"] for r in records} == ALL_KINDS
    for r in records:
        assert {"id", "kind", "images", "questions", "answers", "meta"} <= set(r)
        assert len(r["questions"]) == len(r["answers"]) >= 1
        n_images = {"text": 0, "compare": 2}.get(r["kind"], 1)
        assert len(r["images"]) == n_images
        assert all((out / p).is_file() for p in r["images"])
        assert "".join(r["questions"]).count("<image>") == (2 if n_images == 2 else 0)
        assert (len(r["questions"]) > 1) == (r["kind"] == "multiturn")
        if r["kind"] == "grounding":
            x1, y1, x2, y2 = r["meta"]["box"]
            assert 0 <= x1 < x2 <= r["meta"]["width"] and 0 <= y1 < y2 <= r["meta"]["height"]


def test_eval_images_disjoint_from_train(dataset):
    out, meta_path = dataset
    entry = json.loads(Path(meta_path).read_text())["demo_shapes"]
    train_paths = {str((Path(entry["root"]) / p).resolve()) for r in read_jsonl(entry["annotation"])
                   for p in images_of(r)}
    eval_paths = {str((out / p).resolve()) for r in read_jsonl(out / "eval.jsonl") for p in r["images"]}
    assert train_paths and eval_paths and not train_paths & eval_paths
    assert not {pixel_digest(p) for p in train_paths} & {pixel_digest(p) for p in eval_paths}


def test_same_seed_same_files_and_cli(dataset, tmp_path):
    out, _ = dataset
    assert main([str(tmp_path / "a"), "--train", str(N_TRAIN), "--val", str(N_VAL), "--seed", "3"]) == 0
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (out / name).read_text()
    assert pixel_digest(tmp_path / "a/images/train/000005.png") == pixel_digest(out / "images/train/000005.png")
    write_dataset(tmp_path / "b", 20, 10, seed=4)
    assert read_jsonl(tmp_path / "b" / "train.jsonl")[0] != read_jsonl(out / "train.jsonl")[0]


def test_rejects_negative_sizes(tmp_path):
    with pytest.raises(ValueError):
        write_dataset(tmp_path, -1, 5, seed=0)


def test_eval_rejects_scenes_seen_in_training(tmp_path, monkeypatch):
    # Make repeats likely: half of all draws return an earlier scene, so only the guard keeps eval images new.
    import random

    import internvl.demo.dataset as dataset_module
    from internvl.demo.scenes import make_scene

    history, coin = [], random.Random(0)

    def repeating_make_scene(rng, **kwargs):
        pool = [s for s in history if kwargs.get("word") is None or (s.word is not None) == kwargs["word"]]
        if pool and coin.random() < 0.5:
            return coin.choice(pool)
        scene = make_scene(rng, **kwargs)
        history.append(scene)
        return scene

    monkeypatch.setattr(dataset_module, "make_scene", repeating_make_scene)
    write_dataset(tmp_path, 40, 30, seed=5)
    train = {pixel_digest(tmp_path / "images" / p) for r in read_jsonl(tmp_path / "train.jsonl") for p in images_of(r)}
    evaluation = {pixel_digest(tmp_path / p) for r in read_jsonl(tmp_path / "eval.jsonl") for p in r["images"]}
    assert train and evaluation and not train & evaluation
