"""Write the synthetic demo dataset in InternVL's training format (INTERNVL.md §12) plus a held-out evaluation set.

Layout of `out_dir` after `write_dataset(out_dir, n_train, n_val, seed)`:

    meta.json         {"demo_shapes": {root, annotation, data_augment, repeat_time, length}}   (§12.1)
    train.jsonl       n_train conversations (§12.2)
    val_meta.json     the same, naming val.jsonl
    val.jsonl         the held-out items as training-format conversations (for a validation loss)
    eval.jsonl        the held-out items for `internvl.demo.scoring` (one record per item, see `_eval_record`)
    summary.json      record and question counts per type and kind
    images/train/*.png, images/eval/*.png   224x224 RGB

Paths in the meta files are absolute; image paths in the JSONL files are relative to `root` (= `out_dir/images`),
and in eval.jsonl relative to `out_dir`.

Training mixture (fraction of the n_train conversations; counts are exact up to rounding):

    packed     40%  one image, 2-4 questions of different kinds, asked as independent turns
    single     22%  one image, one question
    multiturn  12%  one image, 2-3 turns that refer back ("And where is it?")
    compare    14%  two images, `Image-1: <image>\\nImage-2: <image>\\n{question}`
    text       12%  no image, 1-3 turns of arithmetic / colour mixing / shape facts / identity

Inside packed and single records the kind of each question is drawn from KIND_WEIGHTS among the kinds the scene
supports (OCR only when a word is drawn); captions (`describe`, `list`) go last in a record. `list` is a
training-only caption (see `scenes.ask_list`): the evaluation set does not ask it. With 20k conversations every kind
gets thousands of examples; the exact numbers are written to summary.json.

The evaluation set uses a different random stream, draws its images fresh, and rejects any scene that also occurs in
the training set, so no evaluation image is a training image. Its items cycle through all ten kinds.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from internvl.demo.scenes import (
    KINDS,
    QA,
    SINGLE_IMAGE_ASKERS,
    Scene,
    ask_compare,
    ask_text,
    make_scene,
    render,
)

log = logging.getLogger(__name__)

DATASET_NAME = "demo_shapes"
MIXTURE = {"packed": 0.40, "single": 0.22, "multiturn": 0.12, "compare": 0.14, "text": 0.12}
# Relative frequency of each kind inside packed/single records; harder kinds (boxes, counting, positions) get more.
KIND_WEIGHTS = {"color": 1.0, "shape": 1.0, "position": 1.5, "count": 1.5, "ocr": 2.5, "grounding": 2.0,
                "describe": 1.0, "list": 2.0}
# Captions name every object, so a question after one in the same record could be answered from the text: they go
# last, and the questions before them are answered from the image.
CAPTION_KINDS = ("describe", "list")
PACKED_TURNS = (2, 4)  # inclusive range of questions in a packed record
TEXT_TURNS = (1, 3)
IMAGE_PREFIX = "<image>\n"  # single-image placeholder at the start of the first human turn (§12.2)


def _stream(seed: int, name: str) -> random.Random:
    """Independent, reproducible random stream per purpose (str seeds are hashed deterministically)."""
    return random.Random(f"internvl-demo/{seed}/{name}")


def _split_counts(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of `total * weight` so the counts sum exactly to `total`."""
    norm = sum(weights.values())
    raw = {k: total * w / norm for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    by_remainder = sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _conversation(turns: Sequence[tuple[str, str]], prefix: str = "") -> list[dict[str, str]]:
    conv = []
    for i, (question, answer) in enumerate(turns):
        conv.append({"from": "human", "value": (prefix if i == 0 else "") + question})
        conv.append({"from": "gpt", "value": answer})
    return conv


def _pick_kinds(scene: Scene, rng: random.Random, k: int) -> list[QA]:
    """Up to `k` questions of distinct kinds for one scene, kinds drawn by KIND_WEIGHTS without replacement."""
    available = {}
    for kind in KIND_WEIGHTS:
        qa = SINGLE_IMAGE_ASKERS[kind](scene, rng)
        if qa is not None:
            available[kind] = qa
    chosen = []
    while available and len(chosen) < k:
        kinds = list(available)
        kind = rng.choices(kinds, weights=[KIND_WEIGHTS[c] for c in kinds])[0]
        chosen.append(available.pop(kind))
    return sorted(chosen, key=lambda qa: qa.kind in CAPTION_KINDS)  # stable: the draw order otherwise


class _ImageWriter:
    """Renders scenes to `root/subdir/NNNNNN.png` and remembers the relative paths."""

    def __init__(self, root: Path, subdir: str):
        self.root, self.subdir, self.count = root, subdir, 0
        (root / subdir).mkdir(parents=True, exist_ok=True)

    def write(self, scene: Scene) -> str:
        rel = f"{self.subdir}/{self.count:06d}.png"
        self.count += 1
        render(scene).save(self.root / rel, format="PNG", compress_level=1)  # flat colours: level 1 is small enough
        return rel


def _train_records(n: int, rng: random.Random, images: _ImageWriter, seen: set[Scene], stats: Counter):
    """Yield n training records in a shuffled but reproducible order of record types."""
    counts = _split_counts(n, MIXTURE)
    order = [t for t, c in counts.items() for _ in range(c)]
    rng.shuffle(order)
    for i, rtype in enumerate(order):
        record: dict = {"id": f"{DATASET_NAME}-train-{i:06d}"}
        if rtype == "text":
            qas = [ask_text(rng) for _ in range(rng.randint(*TEXT_TURNS))]
            record["conversations"] = _conversation([qa.turns[0] for qa in qas])
        elif rtype == "compare":
            qa = None
            while qa is None:
                first, second = make_scene(rng), make_scene(rng)
                qa = ask_compare(first, second, rng)
            seen.update((first, second))
            qas = [qa]
            record["image"] = [images.write(first), images.write(second)]
            record["width_list"] = [first.width, second.width]
            record["height_list"] = [first.height, second.height]
            record["conversations"] = _conversation(qa.turns)  # the question carries its Image-k placeholders
        else:
            scene = make_scene(rng)
            seen.add(scene)
            if rtype == "multiturn":
                qas = [SINGLE_IMAGE_ASKERS["multiturn"](scene, rng)]
                turns = qas[0].turns
            else:
                k = rng.randint(*PACKED_TURNS) if rtype == "packed" else 1
                qas = _pick_kinds(scene, rng, k)
                turns = [qa.turns[0] for qa in qas]
            record["image"] = images.write(scene)
            record["width"], record["height"] = scene.width, scene.height
            record["conversations"] = _conversation(turns, IMAGE_PREFIX)
        stats["record:" + rtype] += 1
        for qa in qas:
            stats["kind:" + qa.kind] += 1
        yield record


def _fresh_scene(rng: random.Random, seen: set[Scene], **kwargs) -> Scene:
    while True:
        scene = make_scene(rng, **kwargs)
        if scene not in seen:  # keep evaluation images out of the training set
            return scene


def _eval_items(n: int, rng: random.Random, images: _ImageWriter, seen: set[Scene]):
    """Yield (eval record, training-format record) pairs, kinds cycling through KINDS."""
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        scenes: list[Scene] = []
        qa = None
        while qa is None:
            if kind == "text":
                qa = ask_text(rng)
            elif kind == "compare":
                scenes = [_fresh_scene(rng, seen), _fresh_scene(rng, seen)]
                qa = ask_compare(scenes[0], scenes[1], rng)
            else:
                scenes = [_fresh_scene(rng, seen, word=True if kind == "ocr" else None)]
                qa = SINGLE_IMAGE_ASKERS[kind](scenes[0], rng)
        paths = [images.write(s) for s in scenes]
        rid = f"{DATASET_NAME}-eval-{i:06d}"
        evaluation = {
            "id": rid,
            "kind": kind,
            "images": [f"images/{p}" for p in paths],
            "questions": [q for q, _ in qa.turns],  # exactly what one passes to chat(); <image>\n is auto-added
            "answers": [a for _, a in qa.turns],
            "meta": {**qa.meta, "sizes": [[s.width, s.height] for s in scenes]},
        }
        train_format: dict = {"id": rid}
        if len(paths) == 1:
            train_format["image"] = paths[0]
            train_format["conversations"] = _conversation(qa.turns, IMAGE_PREFIX)
        else:
            if paths:
                train_format["image"] = paths
            train_format["conversations"] = _conversation(qa.turns)
        yield evaluation, train_format


def _write_jsonl(path: Path, records) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_meta(path: Path, root: Path, annotation: Path, length: int) -> None:
    meta = {DATASET_NAME: {"root": str(root), "annotation": str(annotation), "data_augment": False,
                           "repeat_time": 1, "length": length}}
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def write_dataset(out_dir: str | Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """Write the training set, the held-out set and their meta files under `out_dir`; return the train meta path."""
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train} and {n_val}")
    out = Path(out_dir).resolve()
    root = out / "images"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    seen: set[Scene] = set()
    stats: Counter = Counter()
    train_images = _ImageWriter(root, "train")
    train_jsonl = out / "train.jsonl"
    _write_jsonl(train_jsonl, _train_records(n_train, _stream(seed, "train"), train_images, seen, stats))
    meta_path = out / "meta.json"
    _write_meta(meta_path, root, train_jsonl, n_train)

    eval_images = _ImageWriter(root, "eval")
    items = list(_eval_items(n_val, _stream(seed, "eval"), eval_images, seen))
    _write_jsonl(out / "eval.jsonl", (e for e, _ in items))
    _write_jsonl(out / "val.jsonl", (t for _, t in items))
    _write_meta(out / "val_meta.json", root, out / "val.jsonl", n_val)

    summary = {
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "train_images": train_images.count,
        "eval_images": eval_images.count,
        "mixture": MIXTURE,
        "kind_weights": KIND_WEIGHTS,
        "train_counts": dict(sorted(stats.items())),
        "eval_kinds": dict(Counter(e["kind"] for e, _ in items)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d train and %d eval records to %s in %.1fs", n_train, n_val, out, summary["seconds"])
    return meta_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internvl.demo.dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--train", type=int, default=20000, help="number of training conversations")
    parser.add_argument("--val", type=int, default=1000, help="number of held-out evaluation items")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    meta = write_dataset(args.out, args.train, args.val, args.seed)
    print(meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
