"""Synthetic scenes for the demo model: coloured shapes on a 3x3 layout, an optional word, and Q&A about them.

Everything is driven by a caller-supplied `random.Random`, so a seed reproduces the same scenes, pixels and
questions. Ground truth lives in frozen dataclasses (`Scene`, `SceneObject`); `render` turns a scene into pixels and
is the only place that draws. Answers are short canonical sentences ("Red.", "Top left.", "3.") so that exact match
after light normalisation (lowercase, drop the final period) is a fair score, see `internvl.demo.scoring`.

Grounding answers follow INTERNVL.md §12.6/§18: `<ref>phrase</ref><box>[[x1, y1, x2, y2]]</box>` with every
coordinate `round(v / size * 1000)` (Python round, half to even) of the pixel box.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 224  # one 224x224 tile of the demo model

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated colours, far from each other and from the light backgrounds, so a tiny ViT can separate them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 70, 190),
    "orange": (245, 135, 30),
}
COLORS = tuple(PALETTE)
# Cells of the 3x3 layout in reading order (row-major); cell k is row k // 3, column k % 3.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# How each position reads inside a caption ("a red circle at the top left").
_PLACE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
BACKGROUNDS = ((250, 250, 250), (246, 243, 236), (238, 242, 247), (243, 246, 238))
TEXT_COLOR = (25, 25, 25)
# No I, O or Q: in a 224 px image they are too easily confused with 1, 0 and each other.
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
MAX_OBJECTS = 4
MIN_SIDE, MAX_SIDE = 30, 56  # object side in pixels; a cell is 74-75 px wide
CELL_MARGIN = 5  # objects keep this many pixels from their cell's edges, so objects never touch
WORD_MARGIN = 8
WORD_FONT_SIZES = (30, 40)  # inclusive range of font sizes for the word

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) in pixels; x2 and y2 are exclusive (width = x2 - x1)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    position: str  # one of POSITIONS
    bbox: Box  # tight box of the drawn shape (every shape touches all four sides of its box)

    @property
    def ref(self) -> str:
        """Referring phrase used in grounding, e.g. `the red circle`."""
        return f"the {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order of their cells
    background: tuple[int, int, int]
    word: str | None = None
    word_bbox: Box | None = None  # layout box of the rendered text (contains all ink)
    word_center: tuple[int, int] | None = None  # text anchor ("mm") passed to Pillow
    word_font_size: int = 0
    width: int = IMAGE_SIZE
    height: int = IMAGE_SIZE


@dataclass(frozen=True)
class QA:
    """One question (plus optional referential follow-ups) with canonical answers.

    `kind` is one of KINDS. For `multiturn`, `followups` holds the later (question, answer) turns; every other kind
    has a single turn. Questions never contain the single-image `<image>` placeholder (the dataset adds it, as
    `chat()` does, INTERNVL.md §8.1); `compare` questions carry their `Image-1: <image>\\nImage-2: <image>\\n` prefix.
    """

    kind: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)
    followups: tuple[tuple[str, str], ...] = ()

    @property
    def turns(self) -> list[tuple[str, str]]:
        return [(self.question, self.answer), *self.followups]


# ------------------------------------------------------------------------------------------------ scene generation


def _cell_edges(size: int) -> list[int]:
    return [round(i * size / 3) for i in range(4)]


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font (Pillow >= 10.1)


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def make_scene(
    rng: random.Random,
    *,
    n_objects: int | None = None,
    word: bool | None = None,
    word_prob: float = 0.45,
    size: int = IMAGE_SIZE,
) -> Scene:
    """Sample a scene. `n_objects` (1-4) and `word` (present or not) are random unless given."""
    if n_objects is None:
        n_objects = rng.randint(1, MAX_OBJECTS)
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    if word is None:
        word = rng.random() < word_prob
    edges = _cell_edges(size)
    background = rng.choice(BACKGROUNDS)

    # The word, if any, takes a whole row of the layout; objects go into the other cells, so nothing overlaps.
    word_row = rng.randrange(3) if word else None
    free_cells = [c for c in range(9) if c // 3 != word_row]
    cells = sorted(rng.sample(free_cells, n_objects))
    objects = []
    for cell in cells:
        row, col = divmod(cell, 3)
        x0, x1 = edges[col], edges[col + 1]
        y0, y1 = edges[row], edges[row + 1]
        side = rng.randint(MIN_SIDE, min(MAX_SIDE, x1 - x0 - 2 * CELL_MARGIN, y1 - y0 - 2 * CELL_MARGIN))
        left = x0 + CELL_MARGIN + rng.randint(0, x1 - x0 - 2 * CELL_MARGIN - side)
        top = y0 + CELL_MARGIN + rng.randint(0, y1 - y0 - 2 * CELL_MARGIN - side)
        objects.append(SceneObject(rng.choice(SHAPES), rng.choice(COLORS), POSITIONS[cell],
                                   (left, top, left + side, top + side)))

    if not word:
        return Scene(tuple(objects), background, width=size, height=size)
    text = random_word(rng)
    font_size = rng.randint(*WORD_FONT_SIZES)
    # Layout offsets of the text around its "mm" anchor; shrink the font until it fits the row.
    while True:
        l, t, r, b = _font(font_size).getbbox(text, anchor="mm")
        if r - l <= size - 2 * WORD_MARGIN and b - t <= edges[word_row + 1] - edges[word_row] - 2 * WORD_MARGIN:
            break
        font_size -= 2
    left = WORD_MARGIN + rng.randint(0, size - 2 * WORD_MARGIN - (r - l))
    row_top, row_bottom = edges[word_row], edges[word_row + 1]
    top = row_top + WORD_MARGIN + rng.randint(0, row_bottom - row_top - 2 * WORD_MARGIN - (b - t))
    cx, cy = left - l, top - t
    return Scene(tuple(objects), background, text, (cx + l, cy + t, cx + r, cy + b), (cx, cy), font_size,
                 width=size, height=size)


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    """The one place that knows each shape's geometry (also used for the label maps of `demo.vision_pretrain`)."""
    x1, y1, x2, y2 = obj.bbox
    right, bottom = x2 - 1, y2 - 1  # Pillow's boxes are inclusive
    mid_x, mid_y = (x1 + right) / 2, (y1 + bottom) / 2
    if obj.shape == "circle":
        draw.ellipse((x1, y1, right, bottom), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, right, bottom), fill=fill)
    elif obj.shape == "triangle":  # apex up
        draw.polygon([(mid_x, y1), (right, bottom), (x1, bottom)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(mid_x, y1), (right, mid_y), (mid_x, bottom), (x1, mid_y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def draw_word(draw: ImageDraw.ImageDraw, scene: Scene, fill) -> None:
    draw.text(scene.word_center, scene.word, fill=fill, font=_font(scene.word_font_size), anchor="mm")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image. Shapes are not anti-aliased, so interior pixels carry the exact palette colour."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, PALETTE[obj.color])
    if scene.word:
        draw_word(draw, scene, TEXT_COLOR)
    return image


# ------------------------------------------------------------------------------------------------ helpers


def normalize_box(box: Box, width: int, height: int) -> list[int]:
    """Pixel box -> 0..1000 integers, INTERNVL.md §18 (Python round, half to even)."""
    x1, y1, x2, y2 = box
    return [round(x1 / width * 1000), round(y1 / height * 1000), round(x2 / width * 1000), round(y2 / height * 1000)]


def grounding_answer(ref: str, box: Box, width: int, height: int) -> str:
    x1, y1, x2, y2 = normalize_box(box, width, height)
    return f"<ref>{ref}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>"


GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"
COMPARE_PREFIX = "Image-1: <image>\nImage-2: <image>\n"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count(n: int) -> str:
    return f"{n}."  # counts are digits: "0." .. "4."


def _unique_by(scene: Scene, key: Callable[[SceneObject], object]) -> list[SceneObject]:
    """Objects whose `key` no other object shares (so a question naming that key has one referent)."""
    values = [key(o) for o in scene.objects]
    return [o for o in scene.objects if values.count(key(o)) == 1]


def describe(scene: Scene) -> str:
    """Canonical caption: objects in reading order, then the word."""
    parts = [f"{_article(o.color)} {o.color} {o.shape} {_PLACE[o.position]}" for o in scene.objects]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caption = _sentence(listing)
    if scene.word:
        caption += f" The word {scene.word} is written in the image."
    return caption


# ------------------------------------------------------------------------------------------ single-image questions
# Each asker returns None when the scene cannot support its kind of question (e.g. no unique shape to ask about).


def ask_color(scene: Scene, rng: random.Random) -> QA | None:
    candidates = _unique_by(scene, lambda o: o.shape)
    if not candidates:
        return None
    obj = rng.choice(candidates)
    template = rng.choice(("What color is the {}?", "What is the color of the {}?"))
    return QA("color", template.format(obj.shape), _sentence(obj.color), {"object": obj.position})


def ask_shape(scene: Scene, rng: random.Random) -> QA | None:
    candidates = _unique_by(scene, lambda o: o.color)
    if not candidates:
        return None
    obj = rng.choice(candidates)
    template = rng.choice(("What shape is the {} object?", "Which shape is {}?"))
    return QA("shape", template.format(obj.color), _sentence(obj.shape), {"object": obj.position})


def ask_position(scene: Scene, rng: random.Random) -> QA | None:
    candidates = _unique_by(scene, lambda o: (o.color, o.shape))
    if not candidates:
        return None
    obj = rng.choice(candidates)
    template = rng.choice(("Where is the {} {}?", "Where is the {} {} located?"))
    return QA("position", template.format(obj.color, obj.shape), _sentence(obj.position), {"object": obj.position})


def ask_count(scene: Scene, rng: random.Random) -> QA | None:
    variant = rng.choice(("objects", "shape", "shape", "color"))
    if variant == "objects":
        return QA("count", "How many objects are there?", _count(len(scene.objects)),
                  {"count": len(scene.objects), "of": "objects"})
    present = [getattr(o, variant) for o in scene.objects]
    pool = SHAPES if variant == "shape" else COLORS
    value = rng.choice(present) if rng.random() < 0.75 else rng.choice(pool)  # mostly present, sometimes zero
    n = present.count(value)
    question = f"How many {value}s are there?" if variant == "shape" else f"How many {value} objects are there?"
    return QA("count", question, _count(n), {"count": n, "of": value})


def ask_ocr(scene: Scene, rng: random.Random) -> QA | None:
    if not scene.word:
        return None
    question = rng.choice(("What word is written in the image?", "What does the text in the image say?"))
    return QA("ocr", question, scene.word + ".", {"word": scene.word, "box": list(scene.word_bbox)})


def ask_grounding(scene: Scene, rng: random.Random) -> QA | None:
    candidates = _unique_by(scene, lambda o: (o.color, o.shape))
    if not candidates:
        return None
    obj = rng.choice(candidates)
    answer = grounding_answer(obj.ref, obj.bbox, scene.width, scene.height)
    meta = {"ref": obj.ref, "box": list(obj.bbox), "width": scene.width, "height": scene.height}
    return QA("grounding", GROUNDING_PROMPT.format(obj.ref), answer, meta)


def ask_describe(scene: Scene, rng: random.Random) -> QA | None:
    question = rng.choice(("Describe the image briefly.", "What is in the image?"))
    return QA("describe", question, describe(scene), {"n_objects": len(scene.objects)})


def ask_list(scene: Scene, rng: random.Random) -> QA | None:
    """Every object as `shape colour position`, in reading order ("Objects: circle red top left, ...").

    A training-only caption that puts each attribute right after the words that pick its object out. A decoder
    trained from scratch learns "What color is the circle?" in a few hundred steps with it and not in thousands
    without: the caption supervises, at the shape word itself, a look-up of that shape's colour in the image
    tokens, the look-up the question then reuses (answering the question alone needs two attention steps composed,
    which a from-scratch model is slow to find)."""
    question = rng.choice(("List the objects.", "List every object with its color and place."))
    return QA("list", question, "Objects: " + ", ".join(f"{o.shape} {o.color} {o.position}" for o in scene.objects)
              + ".", {"n_objects": len(scene.objects)})


def ask_multiturn(scene: Scene, rng: random.Random) -> QA | None:
    """2-3 turns where later questions refer back ("it", "them") to the first answer's referent."""
    patterns = []
    by_shape = _unique_by(scene, lambda o: o.shape)
    by_color = _unique_by(scene, lambda o: o.color)
    if by_shape:
        patterns.append("color_then_where")
    if by_color:
        patterns.append("shape_then_where")
    patterns.append("count_then_subsets")
    pattern = rng.choice(patterns)
    n = len(scene.objects)
    three = rng.random() < 0.5
    if pattern == "color_then_where":
        obj = rng.choice(by_shape)
        turns = [(f"What color is the {obj.shape}?", _sentence(obj.color)),
                 ("And where is it?", _sentence(obj.position))]
        if three:
            turns.append(("How many other objects are there?", _count(n - 1)))
    elif pattern == "shape_then_where":
        obj = rng.choice(by_color)
        turns = [(f"What shape is the {obj.color} object?", _sentence(obj.shape)),
                 ("Where is it?", _sentence(obj.position))]
        if three:
            same = sum(o.shape == obj.shape for o in scene.objects) - 1
            turns.append((f"Is there another {obj.shape}?", "Yes." if same else "No."))
    else:
        color = rng.choice([o.color for o in scene.objects] + [rng.choice(COLORS)])
        shape = rng.choice([o.shape for o in scene.objects] + [rng.choice(SHAPES)])
        turns = [("How many objects are there?", _count(n)),
                 (f"How many of them are {color}?", _count(sum(o.color == color for o in scene.objects)))]
        if three:
            turns.append((f"And how many are {shape}s?", _count(sum(o.shape == shape for o in scene.objects))))
    return QA("multiturn", turns[0][0], turns[0][1], {"pattern": pattern}, tuple(turns[1:]))


SINGLE_IMAGE_ASKERS: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "color": ask_color,
    "shape": ask_shape,
    "position": ask_position,
    "count": ask_count,
    "ocr": ask_ocr,
    "grounding": ask_grounding,
    "describe": ask_describe,
    "list": ask_list,
    "multiturn": ask_multiturn,
}


def qa_pairs(scene: Scene, rng: random.Random) -> list[QA]:
    """One question of every single-image kind the scene supports, in SINGLE_IMAGE_ASKERS order."""
    out = []
    for ask in SINGLE_IMAGE_ASKERS.values():
        qa = ask(scene, rng)
        if qa is not None:
            out.append(qa)
    return out


# ------------------------------------------------------------------------------------------------ two images


def _has(scene: Scene, color: str, shape: str) -> bool:
    return any(o.color == color and o.shape == shape for o in scene.objects)


def ask_compare(first: Scene, second: Scene, rng: random.Random) -> QA | None:
    """A question about two images, answered `Image-1.` or `Image-2.`; None if the pair cannot support one."""
    n1, n2 = len(first.objects), len(second.objects)
    by_count = []
    if n1 != n2:
        by_count = [("Which image has more objects?", 1 if n1 > n2 else 2),
                    ("Which image has fewer objects?", 1 if n1 < n2 else 2)]
    # "Which image contains a red circle?" for a colour+shape present in exactly one image.
    by_content = []
    for color, shape in sorted({(o.color, o.shape) for o in first.objects + second.objects}):
        in1, in2 = _has(first, color, shape), _has(second, color, shape)
        if in1 != in2:
            by_content.append((f"Which image contains {_article(color)} {color} {shape}?", 1 if in1 else 2))
    # Pick the question family first, so the many content questions do not crowd out the counting ones.
    families = [f for f in (by_count, by_content) if f]
    if not families:
        return None
    question, which = rng.choice(rng.choice(families))
    return QA("compare", COMPARE_PREFIX + question, f"Image-{which}.", {"n_objects": [n1, n2], "answer": which})


# ------------------------------------------------------------------------------------------------ text only

_MIXES = {frozenset(("blue", "yellow")): "green", frozenset(("red", "yellow")): "orange",
          frozenset(("red", "blue")): "purple"}
_SIDES = {"triangle": 3, "square": 4, "diamond": 4}
IDENTITY_ANSWER = "I am a small InternVL demo model. I answer questions about simple pictures of shapes."


def ask_text(rng: random.Random) -> QA:
    """Pure-text Q&A: small arithmetic, colour mixing, sides of shapes, identity."""
    variant = rng.choices(("plus", "minus", "mix", "sides", "identity"), weights=(4, 3, 2, 1, 0.5))[0]
    if variant == "plus":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return QA("text", f"What is {a} plus {b}?", f"{a + b}.", {"variant": variant})
    if variant == "minus":
        a = rng.randint(0, 18)
        b = rng.randint(0, a)
        return QA("text", f"What is {a} minus {b}?", f"{a - b}.", {"variant": variant})
    if variant == "mix":
        pair, result = rng.choice(list(_MIXES.items()))
        a, b = rng.sample(sorted(pair), 2)
        return QA("text", f"What color do you get by mixing {a} and {b}?", _sentence(result), {"variant": variant})
    if variant == "sides":
        shape = rng.choice(sorted(_SIDES))
        return QA("text", f"How many sides does a {shape} have?", _count(_SIDES[shape]), {"variant": variant})
    question = rng.choice(("Who are you?", "What are you?"))
    return QA("text", question, IDENTITY_ANSWER, {"variant": variant})


KINDS = ("color", "shape", "position", "count", "ocr", "grounding", "describe", "compare", "multiturn", "text")
