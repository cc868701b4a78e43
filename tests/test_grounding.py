"""Grounding boxes (INTERNVL.md §18): parsing, 0..1000 conversion, the RefCOCO denormalization rule, IoU.

Every expected number below is worked out by hand in the comment next to it.
"""

import pytest

from internvl.grounding import (
    REFCOCO_PROMPT,
    GroundedBox,
    box_iou,
    format_boxes,
    normalize_box,
    parse_boxes,
    refcoco_box,
    to_pixels,
)


def test_refcoco_prompt_is_exact():
    assert REFCOCO_PROMPT.format("the left cat") == (
        "Please provide the bounding box coordinate of the region this sentence describes: <ref>the left cat</ref>"
    )


# ------------------------------------------------------------------------------------------------- parsing


def test_parse_refs_with_one_and_several_boxes_and_a_bare_box():
    text = (
        "There is <ref>a cat</ref><box>[[120, 340, 560, 780]]</box> and "
        "<ref>two dogs</ref><box>[[10, 20, 300, 400], [500, 600, 700, 800]]</box>; also <box>[[1, 2, 3, 4]]</box>."
    )
    assert parse_boxes(text) == [
        GroundedBox("a cat", (120.0, 340.0, 560.0, 780.0)),
        GroundedBox("two dogs", (10.0, 20.0, 300.0, 400.0)),
        GroundedBox("two dogs", (500.0, 600.0, 700.0, 800.0)),
        GroundedBox(None, (1.0, 2.0, 3.0, 4.0)),
    ]


def test_parse_tolerates_spaces_from_slow_decoding():
    assert parse_boxes("<ref> a cat </ref> <box> [[1, 2, 3, 4]] </box>") == [GroundedBox("a cat", (1.0, 2.0, 3.0, 4.0))]


def test_parse_decimal_coordinates():
    assert parse_boxes("<box>[[0.5,1.25, 3 ,4.]]</box>") == [GroundedBox(None, (0.5, 1.25, 3.0, 4.0))]


def test_ref_separated_from_box_by_text_does_not_attach():
    text = "<ref>cat</ref> sits here <box>[[1, 2, 3, 4]]</box>"
    assert parse_boxes(text) == [GroundedBox(None, (1.0, 2.0, 3.0, 4.0))]


def test_ref_without_box_and_malformed_boxes_yield_nothing():
    assert parse_boxes("<ref>a cat</ref> is cute") == []
    assert parse_boxes("<ref>a</ref><box>[[1, 2, 3]]</box>") == []
    assert parse_boxes("<ref>a</ref><box>[[1, 2, 3, 4], [5, 6]]</box>") == [GroundedBox("a", (1.0, 2.0, 3.0, 4.0))]
    assert parse_boxes("no grounding at all") == []


def test_format_and_parse_round_trip():
    text = format_boxes("a cat", [(1, 2, 3, 4), (5, 6, 7, 8)])
    assert text == "<ref>a cat</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>"
    assert format_boxes(None, [(0, 0, 1000, 1000)]) == "<box>[[0, 0, 1000, 1000]]</box>"
    assert [b.box_0_1000 for b in parse_boxes(text)] == [(1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)]


# ------------------------------------------------------------------------------------------------- coordinates


def test_to_pixels():
    # 100 * 640 / 1000 = 64, 200 * 480 / 1000 = 96, 500 * 640 / 1000 = 320, 1000 * 480 / 1000 = 480
    assert to_pixels((100, 200, 500, 1000), 640, 480) == (64.0, 96.0, 320.0, 480.0)


def test_normalize_box():
    # 64 / 640 * 1000 = 100, 96 / 480 * 1000 = 200, 320 / 640 * 1000 = 500, 480 / 480 * 1000 = 1000
    assert normalize_box((64, 96, 320, 480), 640, 480) == (100, 200, 500, 1000)
    # 33 / 640 * 1000 = 51.5625 -> 52 ; 47 / 480 * 1000 = 97.916... -> 98
    assert normalize_box((33, 47, 33, 47), 640, 480) == (52, 98, 52, 98)


def test_normalize_box_rounds_half_to_even():
    # x / 16 * 1000 is exact in binary: 1 -> 62.5 -> 62, 3 -> 187.5 -> 188, 5 -> 312.5 -> 312, 7 -> 437.5 -> 438.
    # Rounding half up would give (63, 188, 313, 438).
    assert normalize_box((1, 3, 5, 7), 16, 16) == (62, 188, 312, 438)


def test_normalize_box_rejects_boxes_outside_the_image():
    with pytest.raises(ValueError, match="outside the image"):
        normalize_box((0, 0, 700, 10), 640, 480)
    with pytest.raises(ValueError, match="four numbers"):
        normalize_box((1, 2, 3), 640, 480)
    with pytest.raises(ValueError, match="width must be a positive"):
        normalize_box((1, 2, 3, 4), 0, 480)


# ------------------------------------------------------------------------------------------------- RefCOCO rule


def test_refcoco_box_normalized_output():
    # sum 1800 >= 4 -> /1000 -> (0.1, 0.2, 0.5, 1.0) -> x * 640, y * 480
    box = refcoco_box("<ref>the cat</ref><box>[[100, 200, 500, 1000]]</box>", 640, 480)
    assert box == pytest.approx((64.0, 96.0, 320.0, 480.0))


def test_refcoco_box_fractions_are_not_divided():
    # sum 0.1 + 0.2 + 0.5 + 1.0 = 1.8 < 4 -> kept as fractions -> (64, 96, 320, 480)
    assert refcoco_box("[0.1, 0.2, 0.5, 1.0]", 640, 480) == pytest.approx((64.0, 96.0, 320.0, 480.0))


def test_refcoco_box_threshold_is_inclusive_at_four():
    # [1, 1, 1, 1]: sum == 4 -> divided -> 0.001 * 2000 = 2, 0.001 * 3000 = 3
    assert refcoco_box("[[1, 1, 1, 1]]", 2000, 3000) == pytest.approx((2.0, 3.0, 2.0, 3.0))
    # [1, 1, 1, 0.99]: sum 3.99 < 4 -> not divided -> 1 * 2000, 1 * 3000, 1 * 2000, 0.99 * 3000
    assert refcoco_box("[[1, 1, 1, 0.99]]", 2000, 3000) == pytest.approx((2000.0, 3000.0, 2000.0, 2970.0))


def test_refcoco_box_takes_first_match_and_defaults_to_zero():
    # first match [[10, 20, 30, 40]] -> /1000 -> * 1000 = (10, 20, 30, 40)
    assert refcoco_box("a [[10, 20, 30, 40]] b [[50, 60, 70, 80]]", 1000, 1000) == pytest.approx((10, 20, 30, 40))
    assert refcoco_box("I cannot find it.", 640, 480) == (0.0, 0.0, 0.0, 0.0)
    assert refcoco_box("[1, 2, 3]", 640, 480) == (0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------- IoU


def test_box_iou():
    # overlap 5x5 = 25; union 100 + 100 - 25 = 175
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # the no-match prediction never scores
    # (0, 0, 4, 2) inside (0, 0, 4, 4): 8 / 16
    assert box_iou((0, 0, 4, 2), (0, 0, 4, 4)) == pytest.approx(0.5)


def test_refcoco_end_to_end_precision_rule():
    # ground truth (64, 96, 320, 480); prediction (100, 200, 500, 1000) on 640x480 is identical -> IoU 1 >= 0.5
    predicted = refcoco_box("<box>[[100, 200, 500, 1000]]</box>", 640, 480)
    assert box_iou(predicted, (64, 96, 320, 480)) == pytest.approx(1.0)
