"""Supervised fine-tuning data: meta file, JSONL records, validation, the map-style dataset and batch collation.

Spec: INTERNVL.md §12 (meta file, sample types, per-sample image handling, video samples, failure handling), §9.5
(multi-image tile budget), §9.6 "Training" (frame sampling), §13.5 (collation), §15 (JPEG augmentation), §20 items
29-31. Reference: OpenGVLab/InternVL `internvl_chat/internvl/train/internvl_chat_finetune.py` (`LazySupervisedDataset`)
and `dataset.py` (`get_frame_indices`, `read_frames_decord`), restated in the spec.

Flow: `load_meta` -> `validate` (every line of every annotation file checked up front; problems are `RecordError`s with
file:line) -> `SupervisedDataset[i]` (decode media, tile, tokenize with `internvl.training.labels`) -> `collate`.

Differences from the reference, on purpose:
* Validation happens before training. Bad lines raise one `ValueError` listing them, or are skipped and counted with
  `skip_bad_records=True`; the reference only finds them when it reaches them.
* Relative `root` / `annotation` paths in the meta file are resolved against the meta file's directory (the reference
  uses the working directory). `s3://` roots are not supported.
* The single-image `'<image>\\n'` auto-prefix (and the video `'<video>\\n'` one) goes on the first **human** turn, after
  the system turn is taken out; the reference prefixes the system text when a sample starts with a system turn (§12.2).
* `<image>` outside human turns, `<video>` outside the first human turn, and `<video>` without a following newline are
  validation errors (the reference leaves such text literal and usually fails the sample at load time).
* Images are opened without EXIF rotation, as the reference does (`open_image(..., exif_transpose=False)`).
* `min_dynamic_patch` is clamped to the per-image `max_num` when a multi-image budget makes `max_num` smaller.
* Runtime failures are replaced by another index drawn from an rng seeded by `(seed, epoch, index, attempt)`, so a
  run is reproducible; after `max_replacement_attempts` failed replacements a `RuntimeError` says the data is broken.
* Video frames are never JPEG-augmented (§20 item 31); the dummy white tile of text-only samples is not augmented
  either (its features are discarded).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from internvl.model.internvl import IGNORE_INDEX
from internvl.preprocessing.image import dynamic_preprocess, open_image, to_tensor
from internvl.preprocessing.video import _count_frames, _decode_frames, _open_container, _stream_fps
from internvl.templates.tokens import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN
from internvl.tokenizer import token_id
from internvl.training.augment import jpeg_recompress
from internvl.training.labels import GPT, HUMAN, SUPPORTED_TEMPLATES, SYSTEM, tokenize_conversation

logger = logging.getLogger(__name__)

VIDEO_PLACEHOLDER = "<video>"
MAX_LISTED_ERRORS = 20
_DUMMY_IMAGE_SIDE = 224  # text-only samples run a white 224x224 image through the ViT with image_flags 0 (§12.3)

# Independent random streams per sample (numpy SeedSequence entropy is (seed, epoch, index, stream, ...)).
_STREAM_FRAMES, _STREAM_AUGMENT, _STREAM_REPLACE = 1, 2, 3


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DataConfig:
    """How samples become model inputs. `num_image_token` is tokens per tile (256 for 448 tiles)."""

    template: str
    num_image_token: int
    image_size: int
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12  # global tile limit; a dataset's `max_dynamic_patch` overrides it
    use_thumbnail: bool = True
    max_seq_length: int = 8192
    min_num_frame: int = 8  # video: frames per sample drawn uniformly from [min_num_frame, max_num_frame] (§9.6)
    max_num_frame: int = 32
    frame_sampling: str = "rand"  # 'rand', 'middle' or 'fps<X>' (e.g. 'fps1.0')
    seed: int = 0

    def __post_init__(self):
        if self.template not in SUPPORTED_TEMPLATES:
            raise ValueError(
                f"template {self.template!r} has no training preprocessing; use one of {SUPPORTED_TEMPLATES}"
            )
        for name in ("num_image_token", "image_size", "min_dynamic_patch", "max_dynamic_patch", "max_seq_length",
                     "min_num_frame", "max_num_frame"):
            _positive_int(name, getattr(self, name))
        _positive_int("seed", self.seed, minimum=0)
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ValueError(f"min_dynamic_patch {self.min_dynamic_patch} > max_dynamic_patch {self.max_dynamic_patch}")
        if self.min_num_frame > self.max_num_frame:
            raise ValueError(f"min_num_frame {self.min_num_frame} > max_num_frame {self.max_num_frame}")
        _parse_sampling(self.frame_sampling)


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of the meta file (§12.1); `root` and `annotation` are resolved paths."""

    name: str
    root: str
    annotation: str
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    repeat_time: float = 1
    length: int | None = None


@dataclass(frozen=True)
class RecordError:
    """One problem with one line of an annotation file (`line` is 1-based; 0 for the file as a whole)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Record:
    """A validated annotation line. `kind` is 'text', 'image', 'multi_image' or 'video'. `data` is never mutated."""

    file: str
    line: int
    data: Mapping[str, Any]
    dataset: DatasetSpec
    kind: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class SkippedRecords:
    """What `skip_bad_records=True` dropped: `count` bad lines and every problem found on them."""

    count: int = 0
    errors: tuple[RecordError, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Meta file (§12.1)


def load_meta(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read a meta JSON file: `{name: {root, annotation, data_augment?, max_dynamic_patch?, repeat_time?, length?}}`."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"meta file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"meta file {path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"meta file {path} must be a non-empty JSON object mapping dataset names to entries")
    return [_dataset_spec(path, name, entry) for name, entry in meta.items()]


def _dataset_spec(meta_path: Path, name: str, entry) -> DatasetSpec:
    def fail(message: str):
        raise ValueError(f"meta file {meta_path}, dataset {name!r}: {message}")

    if not isinstance(entry, dict):
        fail(f"entry must be an object, got {type(entry).__name__}")
    root, annotation = entry.get("root"), entry.get("annotation")
    if not isinstance(root, str):
        fail("'root' must be a string (directory the media paths are relative to)")
    if root.startswith("s3://"):
        fail("s3:// roots are not supported; mount or copy the data locally")
    if not isinstance(annotation, str) or not annotation.endswith(".jsonl"):
        fail(f"'annotation' must be a path to a .jsonl file, got {annotation!r}")
    base = meta_path.parent
    root_path, annotation_path = base / root, base / annotation  # absolute paths stay absolute
    if not annotation_path.is_file():
        fail(f"annotation file {annotation_path} does not exist")
    data_augment = entry.get("data_augment", False)
    if not isinstance(data_augment, bool):
        fail(f"'data_augment' must be true or false, got {data_augment!r}")
    max_patch = entry.get("max_dynamic_patch")
    if max_patch is not None and (isinstance(max_patch, bool) or not isinstance(max_patch, int) or max_patch < 1):
        fail(f"'max_dynamic_patch' must be a positive integer, got {max_patch!r}")
    repeat = entry.get("repeat_time", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not math.isfinite(repeat) or repeat <= 0:
        fail(f"'repeat_time' must be a positive number, got {repeat!r}")
    if repeat > 1 and repeat != int(repeat):
        fail(f"'repeat_time' above 1 must be an integer (the line list is repeated), got {repeat!r}")
    length = entry.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        fail(f"'length' must be a non-negative integer, got {length!r}")
    return DatasetSpec(name, str(root_path), str(annotation_path), data_augment, max_patch,
                       int(repeat) if repeat >= 1 else float(repeat), length)


# ---------------------------------------------------------------------------------------------------------------
# Records (§12.2) and their validation


def read_records(
    spec: DatasetSpec, errors: list[RecordError] | None = None, template: str | None = None
) -> list[Record]:
    """Validate every kept line of `spec.annotation` and return the good ones, `repeat_time` applied.

    Problems are appended to `errors` when a list is given; otherwise any problem raises a `ValueError` listing them.
    `template` enables the template-dependent check that only `internvl2_5` accepts a system turn.
    """
    found: list[RecordError] = []
    lines = [
        (number, text)
        for number, text in enumerate(Path(spec.annotation).read_text(encoding="utf-8").splitlines(), start=1)
        if text.strip()
    ]
    if spec.repeat_time < 1:  # keep the first floor(len * r) lines; the rest are never read (§12.1)
        lines = lines[: int(len(lines) * spec.repeat_time)]
    records = []
    for number, text in lines:
        problems, record = _check_line(spec, number, text, template)
        found += [RecordError(spec.annotation, number, message) for message in problems]
        if record is not None and not problems:
            records.append(record)
    if spec.repeat_time > 1:
        records = records * int(spec.repeat_time)
    if errors is None and found:
        raise ValueError(format_errors(found))
    if errors is not None:
        errors.extend(found)
    return records


def validate(
    meta: str | os.PathLike | Sequence[DatasetSpec], template: str | None = None
) -> tuple[list[Record], list[RecordError]]:
    """All good records of all datasets (meta file path or `load_meta` result) and every problem found."""
    specs = load_meta(meta) if isinstance(meta, (str, os.PathLike)) else list(meta)
    records: list[Record] = []
    errors: list[RecordError] = []
    for spec in specs:
        records += read_records(spec, errors, template)
    return records, errors


def format_errors(errors: Sequence[RecordError], limit: int = MAX_LISTED_ERRORS) -> str:
    lines = "\n".join(f"  {error}" for error in errors[:limit])
    more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
    bad_lines = len({(e.file, e.line) for e in errors})
    return (
        f"{len(errors)} problems in {bad_lines} annotation lines (pass skip_bad_records=True / --skip-bad-records to "
        f"train on the remaining lines):\n{lines}{more}"
    )


def _media_list(value, field_name: str, problems: list[str]) -> list[str] | None:
    """The `image` / `video` field as a list of paths ([] when absent or empty), or None when malformed."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return value
    problems.append(f"'{field_name}' must be a path string or a list of non-empty path strings, got {value!r}")
    return None


def _check_line(spec: DatasetSpec, number: int, text: str, template: str | None):
    problems: list[str] = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return [f"invalid JSON: {error.msg} (column {error.colno})"], None
    if not isinstance(data, dict):
        return [f"expected a JSON object, got {type(data).__name__}"], None

    conversations = data.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return ["missing or empty 'conversations' (a list of {'from', 'value'} turns)"], None
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in (HUMAN, GPT, SYSTEM) or not isinstance(
            turn.get("value"), str
        ):
            problems.append(f"turn {k} must be {{'from': 'human'|'gpt'|'system', 'value': string}}, got {turn!r}")
    if problems:
        return problems, None
    roles = [turn["from"] for turn in conversations]
    first = 1 if roles[0] == SYSTEM else 0
    if first and template is not None and template != "internvl2_5":
        problems.append(f"a system turn is only accepted by the internvl2_5 template, not {template!r} (§12.2)")
    expected = [HUMAN if k % 2 == 0 else GPT for k in range(len(roles) - first)]
    if roles[first:] != expected:
        problems.append(f"roles {roles} must alternate human, gpt, ... (after an optional leading system turn)")
    elif roles[-1] != GPT:
        problems.append("the conversation must end with a gpt turn")
    for k, turn in enumerate(conversations):
        if turn["from"] == GPT and not turn["value"].strip():
            problems.append(f"turn {k} (gpt) has an empty value: nothing to train on")

    images = _media_list(data.get("image"), "image", problems)
    videos = _media_list(data.get("video"), "video", problems)
    if images is None or videos is None:
        return problems, None
    if len(videos) > 1 or (videos and not isinstance(data.get("video"), str)):
        problems.append(f"'video' must be one path string, got {data.get('video')!r}")
    if images and videos:
        problems.append("a record has either 'image' or 'video', not both")
    if videos:
        kind = "video"
    elif images:
        kind = "multi_image" if isinstance(data["image"], list) else "image"
    else:
        kind = "text"

    human_tags = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] == HUMAN)
    other_tags = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] != HUMAN)
    if other_tags:
        problems.append(f"{other_tags} {IMAGE_PLACEHOLDER} placeholders outside human turns (they are never expanded)")
    if kind == "image" and human_tags > 1:
        problems.append(f"{human_tags} {IMAGE_PLACEHOLDER} placeholders but 1 image (0 or 1 allowed; 0 auto-prefixes)")
    elif kind == "multi_image" and human_tags != len(images):
        problems.append(f"{human_tags} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images (must be equal)")
    elif kind in ("text", "video") and human_tags:
        problems.append(f"{human_tags} {IMAGE_PLACEHOLDER} placeholders but the record has no 'image'")

    video_tags = [k for k, t in enumerate(conversations) if VIDEO_PLACEHOLDER in t["value"]]
    total_video_tags = sum(t["value"].count(VIDEO_PLACEHOLDER) for t in conversations)
    if kind != "video" and total_video_tags:
        problems.append(f"{VIDEO_PLACEHOLDER} placeholder but the record has no 'video'")
    elif kind == "video":
        if total_video_tags > 1 or any(k != first for k in video_tags):
            problems.append(f"{VIDEO_PLACEHOLDER} may appear once, in the first human turn")
        elif video_tags and VIDEO_PLACEHOLDER + "\n" not in conversations[first]["value"]:
            problems.append(f"{VIDEO_PLACEHOLDER} must be followed by a newline ('<video>\\n' becomes the frame list)")
        clip = data.get("clip")
        if clip is not None and not (
            isinstance(clip, list)
            and len(clip) == 2
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in clip)
            and 0 <= clip[0] < clip[1]
        ):
            problems.append(f"'clip' must be [start_seconds, end_seconds] with 0 <= start < end, got {clip!r}")

    for media in images + videos:
        path = os.path.join(spec.root, media)
        if not os.path.isfile(path):
            problems.append(f"file not found: {path}")
    record = Record(spec.annotation, number, data, spec, kind)
    return problems, record


# ---------------------------------------------------------------------------------------------------------------
# Training frame sampling (§9.6 "Training")


def _parse_sampling(method: str) -> tuple[str, float | None]:
    if method in ("rand", "middle"):
        return method, None
    if isinstance(method, str) and method.startswith("fps"):
        try:
            fps = float(method[3:])
        except ValueError:
            fps = -1.0
        if math.isfinite(fps) and fps > 0:
            return "fps", fps
    raise ValueError(f"frame_sampling must be 'rand', 'middle' or 'fps<X>' with X > 0 (e.g. 'fps1'), got {method!r}")


def sample_frame_indices(
    num_frames: int,
    vlen: int,
    sample: str = "rand",
    rng: np.random.Generator | None = None,
    input_fps: float = 1.0,
    max_num_frames: int = -1,
) -> list[int]:
    """Frame indices for training (reference `get_frame_indices`, §9.6).

    'rand' / 'middle': split [0, vlen) into min(num_frames, vlen) intervals at int(linspace(0, vlen, n + 1)); pick a
    uniform index in a .. b-2 of each [a, b) (the last frame of an interval is never chosen, a reference quirk; if an
    interval has no such index, a sorted random subset of the frames instead) or the midpoint (a + b - 1) // 2; pad
    with the last index up to `num_frames`. 'fps<X>': one frame at the centre of every 1/X-second slot, rounded half to
    even, cut to `max_num_frames` when positive (no padding, as in the reference).
    """
    num_frames = _positive_int("num_frames", num_frames)
    vlen = _positive_int("vlen", vlen)
    method, output_fps = _parse_sampling(sample)
    if method == "fps":
        delta = 1.0 / output_fps
        duration = vlen / float(input_fps)
        seconds = np.arange(delta / 2, duration + delta / 2, delta)
        indices = [int(i) for i in np.around(seconds * input_fps).astype(int) if i < vlen]
        if max_num_frames > 0:
            indices = indices[:max_num_frames]
        if not indices:
            raise ValueError(f"fps sampling at {output_fps} fps selects no frame of a {vlen}-frame video")
        return indices
    count = min(num_frames, vlen)
    bounds = np.linspace(0, vlen, count + 1).astype(int)
    intervals = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if method == "middle":
        indices = [(a + b - 1) // 2 for a, b in intervals]
    else:
        if rng is None:
            raise ValueError("'rand' frame sampling needs an rng (numpy Generator)")
        if all(b - 1 > a for a, b in intervals):
            indices = [int(rng.integers(a, b - 1)) for a, b in intervals]  # a .. b-2
        else:
            indices = sorted(int(i) for i in rng.permutation(vlen)[:count])
    return indices + [indices[-1]] * (num_frames - len(indices))


def read_training_frames(
    path: str | os.PathLike, cfg: DataConfig, rng: np.random.Generator, clip: Sequence[float] | None = None
) -> list[Image.Image]:
    """Decode the frames of one training video: t ~ U[min_num_frame, max_num_frame], indices per `cfg.frame_sampling`,
    restricted to `clip` seconds when given (§9.6). Frames are RGB at their original size."""
    description = str(path)
    with _open_container(str(path), description) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream, description)
        total = int(stream.frames or 0)
    if total < 1:
        total = _count_frames(str(path), description)
    num_frames = int(rng.integers(cfg.min_num_frame, cfg.max_num_frame + 1))
    for _ in range(2):  # a second pass when the container over-states its frame count
        start, vlen = 0, total
        if clip is not None:
            start = int(clip[0] * fps)
            vlen = min(int((clip[1] - clip[0]) * fps), total - start)
        if vlen < 1:
            raise ValueError(f"video {description}: clip {list(clip)} selects no frame of {total} at {fps:g} fps")
        indices = sample_frame_indices(
            num_frames, vlen, cfg.frame_sampling, rng, input_fps=fps, max_num_frames=cfg.max_num_frame
        )
        indices = [start + i for i in indices]
        kept, decoded = _decode_frames(str(path), description, set(indices))
        if len(kept) == len(set(indices)):
            return [kept[i] for i in indices]
        if decoded < 1 or decoded >= total:
            break
        total = decoded
    raise ValueError(f"video {description}: could not decode frames {sorted(set(indices) - set(kept))}")


# ---------------------------------------------------------------------------------------------------------------
# Dataset


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style SFT dataset over every dataset of a meta file.

    `dataset[i]` -> dict(input_ids (L,) long, labels (L,) long, pixel_values (T, 3, S, S) float32, image_flags (T,)
    long, num_tiles list[int] per image block). A sample that fails at load time (corrupt image, undecodable video,
    an image block cut by truncation, ...) is counted in `counters["load_failures"]`, logged in `failures`, and
    replaced by another index (`counters["substituted"]`), §12.5. Counters live in each DataLoader worker's copy.
    """

    def __init__(
        self,
        meta_path: str | os.PathLike,
        tokenizer,
        cfg: DataConfig,
        skip_bad_records: bool = False,
        max_replacement_attempts: int = 10,
    ):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_replacement_attempts = _positive_int("max_replacement_attempts", max_replacement_attempts)
        records, errors = validate(load_meta(meta_path), template=cfg.template)
        if errors and not skip_bad_records:
            raise ValueError(format_errors(errors))
        for error in errors:
            logger.warning("skipping bad record %s", error)
        self.skipped = SkippedRecords(len({(e.file, e.line) for e in errors}), tuple(errors))
        if not records:
            raise ValueError(f"meta file {meta_path} has no usable records")
        self.records = records
        # Resolve once: a tokenizer without the InternVL tokens cannot train on images (§6.1).
        for token in (IMG_CONTEXT_TOKEN, IMG_END_TOKEN):
            token_id(tokenizer, token)
        self.epoch = 0
        self.counters: Counter[str] = Counter()
        self.failures: list[str] = []  # "index i (file:line): Error: message", the first 1000

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Random choices (frames, JPEG qualities, replacements) depend on (seed, epoch, index) only."""
        self.epoch = _positive_int("epoch", epoch, minimum=0)

    def _rng(self, index: int, stream: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, self.epoch, index, stream, *extra])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        candidate = index
        for attempt in range(self.max_replacement_attempts + 1):
            try:
                item = self.load(candidate)
            except Exception as error:  # any per-sample failure; the epoch goes on (§12.5)
                self._note_failure(candidate, error)
                candidate = self._replacement(index, attempt)
                continue
            if candidate != index:
                self.counters["substituted"] += 1
            return item
        raise RuntimeError(
            f"sample {index} and {self.max_replacement_attempts} replacements all failed to load; the data is broken "
            f"(last failures: {self.failures[-3:]})"
        )

    def _replacement(self, index: int, attempt: int) -> int:
        if len(self) == 1:
            return index
        other = int(self._rng(index, _STREAM_REPLACE, attempt).integers(len(self) - 1))
        return other + (other >= index)  # any index but `index`

    def _note_failure(self, index: int, error: Exception) -> None:
        self.counters["load_failures"] += 1
        message = f"index {index} ({self.records[index].where}): {type(error).__name__}: {error}"
        logger.warning("failed to load sample, substituting another: %s", message)
        if len(self.failures) < 1000:
            self.failures.append(message)

    # ---------------------------------------------------------------------------------------------- one sample
    def load(self, index: int) -> dict[str, Any]:
        """Build sample `index` without substitution (errors propagate)."""
        record = self.records[index]
        cfg, spec = self.cfg, record.dataset
        turns = [{"from": t["from"], "value": t["value"]} for t in record.data["conversations"]]
        first_human = 1 if turns[0]["from"] == SYSTEM else 0
        augment = self._rng(index, _STREAM_AUGMENT) if spec.data_augment else None
        max_patch = spec.max_dynamic_patch or cfg.max_dynamic_patch

        if record.kind == "text":
            dummy = Image.new("RGB", (_DUMMY_IMAGE_SIDE, _DUMMY_IMAGE_SIDE), (255, 255, 255))
            tiles = dynamic_preprocess(dummy, 1, 1, cfg.image_size, cfg.use_thumbnail)
            pixel_values = to_tensor(tiles, cfg.image_size)  # (1, 3, S, S)
            image_flags = torch.zeros(1, dtype=torch.long)
            num_tiles: list[int] = []
        elif record.kind == "video":
            value = turns[first_human]["value"]
            if VIDEO_PLACEHOLDER not in value:
                value = VIDEO_PLACEHOLDER + "\n" + value
            frames = read_training_frames(
                os.path.join(spec.root, record.data["video"]), cfg, self._rng(index, _STREAM_FRAMES),
                record.data.get("clip"),
            )
            frame_lines = "\n".join(f"Frame-{k}: {IMAGE_PLACEHOLDER}" for k in range(1, len(frames) + 1))
            turns[first_human]["value"] = value.replace(VIDEO_PLACEHOLDER + "\n", frame_lines + "\n")  # §12.4
            pixel_values = to_tensor(frames, cfg.image_size)  # each frame stretched to one S x S tile
            image_flags = torch.ones(len(frames), dtype=torch.long)
            num_tiles = [1] * len(frames)
        else:
            paths = record.data["image"] if record.kind == "multi_image" else [record.data["image"]]
            if record.kind == "image" and IMAGE_PLACEHOLDER not in turns[first_human]["value"]:
                turns[first_human]["value"] = IMAGE_PLACEHOLDER + "\n" + turns[first_human]["value"]
            max_num = max(1, max_patch // len(paths)) if record.kind == "multi_image" else max_patch  # §9.5
            min_num = min(cfg.min_dynamic_patch, max_num)
            tensors, num_tiles = [], []
            for relative in paths:
                image = open_image(Path(spec.root) / relative, exif_transpose=False)
                tiles = dynamic_preprocess(image, min_num, max_num, cfg.image_size, cfg.use_thumbnail)
                if augment is not None:
                    tiles = [jpeg_recompress(tile, augment) for tile in tiles]  # each tile its own quality (§15)
                tensors.append(to_tensor(tiles, cfg.image_size))
                num_tiles.append(len(tiles))
            pixel_values = torch.cat(tensors)  # (sum(num_tiles), 3, S, S)
            image_flags = torch.ones(pixel_values.shape[0], dtype=torch.long)

        input_ids, labels = tokenize_conversation(
            turns,
            self.tokenizer,
            cfg.template,
            [cfg.num_image_token * n for n in num_tiles],
            cfg.max_seq_length,
            stats=self.counters,
        )
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "image_flags": image_flags,
            "num_tiles": num_tiles,
        }


# ---------------------------------------------------------------------------------------------------------------
# Collation (§13.5, without the pad-id-0 attention-mask quirk)


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch.

    input_ids (B, L) padded with `pad_token_id`; labels (B, L) padded with IGNORE; attention_mask (B, L) from the
    sample lengths (the reference's `input_ids != 0` would mask Qwen's real token `!`, §13.5); position_ids
    cumsum(mask) - 1 with padding set to 1 (§12.3); pixel_values (sum T, 3, S, S) and image_flags (sum T,)
    concatenated across the batch.
    """
    if not batch:
        raise ValueError("collate needs at least one sample")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an integer token id, got {pad_token_id!r}")
    lengths = [int(sample["input_ids"].shape[0]) for sample in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (sample, length) in enumerate(zip(batch, lengths)):
        input_ids[row, :length] = sample["input_ids"]
        labels[row, :length] = sample["labels"]
        attention_mask[row, :length] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pixel_values": torch.cat([sample["pixel_values"] for sample in batch]),
        "image_flags": torch.cat([sample["image_flags"] for sample in batch]),
    }
