import random
import re
from itertools import combinations

import numpy as np
import pytest

from internvl.demo.scenes import (
    COMPARE_PREFIX,
    KINDS,
    QA,
    SINGLE_IMAGE_ASKERS,
    ask_compare,
    ask_text,
    make_scene,
    qa_pairs,
    render,
)

from demo.reference import POSITION_NAMES, REFERENCE_RGB, nearest_name

SIZE = 224


def scenes(seed, n):
    rng = random.Random(seed)
    return [make_scene(rng) for _ in range(n)]


def cell_of(obj):
    x1, y1, x2, y2 = obj.bbox
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return int(cy // (SIZE / 3)), int(cx // (SIZE / 3))


def overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_same_seed_same_scenes_and_pixels():
    a, b = scenes(7, 20), scenes(7, 20)
    assert a == b
    assert all(render(x).tobytes() == render(y).tobytes() for x, y in zip(a, b))
    assert scenes(8, 20) != a


def test_scene_statistics_cover_the_space():
    sample = scenes(1, 400)
    assert {len(s.objects) for s in sample} == {1, 2, 3, 4}
    assert {o.shape for s in sample for o in s.objects} == {"circle", "square", "triangle", "diamond"}
    assert {o.color for s in sample for o in s.objects} == set(REFERENCE_RGB)
    assert {o.position for s in sample for o in s.objects} == {p for row in POSITION_NAMES for p in row}
    assert 0.2 < sum(s.word is not None for s in sample) / len(sample) < 0.8


def test_ground_truth_matches_pixels():
    for scene in scenes(2, 150):
        px = np.asarray(render(scene))
        assert px.shape == (SIZE, SIZE, 3)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.bbox
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            center = px[(y1 + y2) // 2, (x1 + x2) // 2]
            assert nearest_name(tuple(int(v) for v in center)) == obj.color
            # The shape's pixels (its exact colour, inside its layout cell) span its box.
            row, col = cell_of(obj)
            assert POSITION_NAMES[row][col] == obj.position
            c0, c1 = round(col * SIZE / 3), round((col + 1) * SIZE / 3)
            r0, r1 = round(row * SIZE / 3), round((row + 1) * SIZE / 3)
            cell = px[r0:r1, c0:c1]
            ys, xs = np.nonzero((cell == center).all(-1))
            assert abs(xs.min() + c0 - x1) <= 1 and abs(xs.max() + c0 - (x2 - 1)) <= 1
            assert abs(ys.min() + r0 - y1) <= 1 and abs(ys.max() + r0 - (y2 - 1)) <= 1
        for a, b in combinations(scene.objects, 2):
            assert not overlaps(a.bbox, b.bbox)
        dark = np.nonzero(px.max(-1) < 100)  # text ink; no palette colour or background is this dark
        if scene.word is None:
            assert dark[0].size == 0
        else:
            assert re.fullmatch(r"[A-Z]{3,5}", scene.word)
            wx1, wy1, wx2, wy2 = scene.word_bbox
            assert 0 <= wx1 < wx2 <= SIZE and 0 <= wy1 < wy2 <= SIZE
            assert dark[0].size > 50
            assert wx1 <= dark[1].min() and dark[1].max() < wx2 and wy1 <= dark[0].min() and dark[0].max() < wy2
            assert all(not overlaps(scene.word_bbox, o.bbox) for o in scene.objects)


def test_forced_options():
    rng = random.Random(0)
    assert all(make_scene(rng, word=True).word for _ in range(20))
    assert all(make_scene(rng, word=False).word is None for _ in range(20))
    assert all(len(make_scene(rng, n_objects=3).objects) == 3 for _ in range(20))
    with pytest.raises(ValueError):
        make_scene(rng, n_objects=5)


def _count_in(scene, question):
    objs = scene.objects
    if question == "How many objects are there?":
        return len(objs)
    m = re.fullmatch(r"How many (\w+)s are there\?", question)
    if m:
        return sum(o.shape == m.group(1) for o in objs)
    m = re.fullmatch(r"How many (\w+) objects are there\?", question)
    return sum(o.color == m.group(1) for o in objs)


def _only(objs):
    assert len(objs) == 1, objs  # a question must have exactly one referent
    return objs[0]


def check_single(scene, qa: QA):
    objs = scene.objects
    q, a = qa.question, qa.answer
    if qa.kind == "color":
        shape = re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?", q).group(1)
        assert a == _only([o for o in objs if o.shape == shape]).color.capitalize() + "."
    elif qa.kind == "shape":
        color = re.fullmatch(r"(?:What shape is the (\w+) object|Which shape is (\w+))\?", q)
        color = color.group(1) or color.group(2)
        assert a == _only([o for o in objs if o.color == color]).shape.capitalize() + "."
    elif qa.kind == "position":
        color, shape = re.fullmatch(r"Where is the (\w+) (\w+)(?: located)?\?", q).groups()
        obj = _only([o for o in objs if (o.color, o.shape) == (color, shape)])
        assert a == obj.position.capitalize() + "."
    elif qa.kind == "count":
        assert a == f"{_count_in(scene, q)}."
    elif qa.kind == "ocr":
        assert a == scene.word + "."
    elif qa.kind == "grounding":
        ref = re.fullmatch(r"Please provide the bounding box coordinate of the region this sentence describes: "
                           r"<ref>(the (\w+) (\w+))</ref>", q)
        obj = _only([o for o in objs if (o.color, o.shape) == (ref.group(2), ref.group(3))])
        x1, y1, x2, y2 = obj.bbox
        expected = [round(x1 / SIZE * 1000), round(y1 / SIZE * 1000), round(x2 / SIZE * 1000),
                    round(y2 / SIZE * 1000)]
        assert a == f"<ref>{ref.group(1)}</ref><box>[[{', '.join(map(str, expected))}]]</box>"
    elif qa.kind == "describe":
        place = r"((?:top|bottom)(?: left| right)?|left|right|center)"
        said = re.findall(r"\b(?:a|an) (\w+) (\w+) (?:at|on|in) the " + place + r"\b", a.lower())
        assert said == [(o.color, o.shape, o.position) for o in objs]
        assert (scene.word is not None) == ("word" in a)
        if scene.word:
            assert scene.word in a
    elif qa.kind == "list":
        assert qa.question in ("List the objects.", "List every object with its color and place.")
        m = re.fullmatch(r"Objects: (.*)\.", a)
        listed = [tuple(part.split(" ", 2)) for part in m.group(1).split(", ")]
        assert listed == [(o.shape, o.color, o.position) for o in objs]  # reading order, shape first
        assert [cell_of(o) for o in objs] == sorted(cell_of(o) for o in objs)
    elif qa.kind == "multiturn":
        turns = qa.turns
        assert 2 <= len(turns) <= 3
        first_q = turns[0][0]
        if first_q.startswith("What color is the"):
            obj = _only([o for o in objs if o.shape == first_q.split()[-1].rstrip("?")])
            assert turns[0][1] == obj.color.capitalize() + "."
            assert turns[1] == ("And where is it?", obj.position.capitalize() + ".")
            if len(turns) == 3:
                assert turns[2][1] == f"{len(objs) - 1}."
        elif first_q.startswith("What shape is the"):
            obj = _only([o for o in objs if o.color == first_q.split()[4]])
            assert turns[0][1] == obj.shape.capitalize() + "."
            assert turns[1] == ("Where is it?", obj.position.capitalize() + ".")
            if len(turns) == 3:
                others = [o for o in objs if o.shape == obj.shape and o is not obj]
                assert turns[2] == (f"Is there another {obj.shape}?", "Yes." if others else "No.")
        else:
            assert turns[0] == ("How many objects are there?", f"{len(objs)}.")
            color = re.fullmatch(r"How many of them are (\w+)\?", turns[1][0]).group(1)
            assert turns[1][1] == f"{sum(o.color == color for o in objs)}."
            if len(turns) == 3:
                shape = re.fullmatch(r"And how many are (\w+)s\?", turns[2][0]).group(1)
                assert turns[2][1] == f"{sum(o.shape == shape for o in objs)}."
    else:
        raise AssertionError(qa.kind)


def test_single_image_answers_agree_with_ground_truth():
    rng = random.Random(3)
    seen = set()
    for scene in scenes(4, 300):
        qas = qa_pairs(scene, rng)
        assert [qa.kind for qa in qas] == [k for k in SINGLE_IMAGE_ASKERS if k in {qa.kind for qa in qas}]
        for qa in qas:
            assert "<image>" not in qa.question
            check_single(scene, qa)
            seen.add(qa.kind)
            if qa.kind == "count":
                seen.add("count:" + qa.answer)
    assert set(SINGLE_IMAGE_ASKERS) <= seen
    assert {"count:0.", "count:1.", "count:2.", "count:3.", "count:4."} <= seen


def test_compare_answers():
    rng = random.Random(5)
    questions = set()
    for first, second in zip(scenes(6, 200), scenes(60, 200)):
        qa = ask_compare(first, second, rng)
        if qa is None:
            continue
        assert qa.kind == "compare" and qa.question.startswith("Image-1: <image>\nImage-2: <image>\n")
        assert qa.question.startswith(COMPARE_PREFIX)
        q = qa.question[len(COMPARE_PREFIX):]
        n1, n2 = len(first.objects), len(second.objects)
        if q == "Which image has more objects?":
            assert n1 != n2 and qa.answer == ("Image-1." if n1 > n2 else "Image-2.")
        elif q == "Which image has fewer objects?":
            assert n1 != n2 and qa.answer == ("Image-1." if n1 < n2 else "Image-2.")
        else:
            color, shape = re.fullmatch(r"Which image contains an? (\w+) (\w+)\?", q).groups()
            has = [any((o.color, o.shape) == (color, shape) for o in s.objects) for s in (first, second)]
            assert has in ([True, False], [False, True])
            assert qa.answer == ("Image-1." if has[0] else "Image-2.")
        questions.add(q.split()[3])
    assert {"more", "fewer"} <= questions and questions & {"a", "an"}


def test_text_answers():
    rng = random.Random(9)
    mixes = {("blue", "yellow"): "Green.", ("red", "yellow"): "Orange.", ("blue", "red"): "Purple."}
    variants = set()
    for _ in range(300):
        qa = ask_text(rng)
        assert qa.kind == "text"
        q = qa.question
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", q):
            assert qa.answer == f"{int(m.group(1)) + int(m.group(2))}."
            variants.add("plus")
        elif m := re.fullmatch(r"What is (\d+) minus (\d+)\?", q):
            assert int(m.group(1)) >= int(m.group(2))
            assert qa.answer == f"{int(m.group(1)) - int(m.group(2))}."
            variants.add("minus")
        elif m := re.fullmatch(r"What color do you get by mixing (\w+) and (\w+)\?", q):
            assert qa.answer == mixes[tuple(sorted(m.groups()))]
            variants.add("mix")
        elif m := re.fullmatch(r"How many sides does a (\w+) have\?", q):
            assert qa.answer == {"triangle": "3.", "square": "4.", "diamond": "4."}[m.group(1)]
            variants.add("sides")
        else:
            assert q in ("Who are you?", "What are you?") and "InternVL" in qa.answer
            variants.add("identity")
    assert variants == {"plus", "minus", "mix", "sides", "identity"}


def test_kinds_list():
    assert set(KINDS) | {"list"} == set(SINGLE_IMAGE_ASKERS) | {"compare", "text"}  # list: training only
    assert len(KINDS) == 10
