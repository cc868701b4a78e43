"""Score answers on the demo evaluation set (`eval.jsonl` from `internvl.demo.dataset`).

Rules per kind:
* grounding: the first `[x1, y1, x2, y2]` (one or more brackets) in the answer, read as 0..1000 normalized
  coordinates, is scaled to pixels with the image size; correct when IoU with the ground-truth pixel box >= 0.5
  (INTERNVL.md §18; unlike the RefCOCO script, values are always taken as normalized, which is what the demo model
  is trained to emit). No box in the answer counts as wrong.
* multiturn: correct only when every turn matches.
* every other kind: exact match after normalization (lowercase, surrounding whitespace and trailing periods removed).

Self-contained on purpose (own box regex), so it does not depend on the project's grounding module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

AnswerFn = Callable[[list[Image.Image], list[str]], list[str]]

IOU_THRESHOLD = 0.5
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(r"\[+" + ",".join([_NUM] * 4) + r"\]+")


def normalize(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four comma-separated numbers enclosed in brackets, e.g. `[[12, 40, 300, 410]]`; None if absent."""
    match = _BOX_RE.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    return x1, y1, x2, y2


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_correct(answer: str, gt_box: Sequence[float], width: int, height: int) -> bool:
    box = parse_box(answer)
    if box is None:
        return False
    x1, y1, x2, y2 = box
    pixels = (x1 / 1000 * width, y1 / 1000 * height, x2 / 1000 * width, y2 / 1000 * height)
    return iou(pixels, gt_box) >= IOU_THRESHOLD


def is_correct(record: dict, answers: Sequence[str]) -> bool:
    """Judge one evaluation record given one answer per question."""
    expected = record["answers"]
    if len(answers) != len(expected):
        raise ValueError(f"record {record.get('id')!r} has {len(expected)} questions but got {len(answers)} answers")
    if record["kind"] == "grounding":
        meta = record["meta"]
        return grounding_correct(answers[0], meta["box"], meta["width"], meta["height"])
    return all(normalize(a) == normalize(e) for a, e in zip(answers, expected))


def load_eval(path: str | Path) -> list[dict]:
    """Read eval.jsonl and make its image paths absolute (they are stored relative to the file's directory)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                record["images"] = [str((path.parent / p).resolve()) for p in record["images"]]
                records.append(record)
    return records


def score(eval_records: Sequence[dict], answer_fn: AnswerFn, root: str | Path | None = None) -> dict:
    """Run `answer_fn(images, questions) -> answers` on every record and return per-kind and overall accuracy.

    Image paths are used as stored, or joined to `root` when given. The result maps each kind (in order of first
    appearance) and "overall" to `{"n", "correct", "accuracy"}`.
    """
    results: dict[str, dict] = {}
    for record in eval_records:
        images = []
        for p in record["images"]:
            with Image.open(Path(root) / p if root is not None else p) as im:
                images.append(im.convert("RGB"))
        answers = list(answer_fn(images, list(record["questions"])))
        entry = results.setdefault(record["kind"], {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(is_correct(record, answers))
    n = sum(e["n"] for e in results.values())
    results["overall"] = {"n": n, "correct": sum(e["correct"] for e in results.values())}
    for entry in results.values():
        entry["accuracy"] = entry["correct"] / entry["n"] if entry["n"] else 0.0
    return results


def format_table(results: dict) -> str:
    """Markdown table of `score` results, one row per kind, overall last."""
    lines = ["| kind | n | correct | accuracy |", "|---|---:|---:|---:|"]
    kinds = [k for k in results if k != "overall"] + (["overall"] if "overall" in results else [])
    for kind in kinds:
        e = results[kind]
        lines.append(f"| {kind} | {e['n']} | {e['correct']} | {100 * e['accuracy']:.1f}% |")
    return "\n".join(lines)
