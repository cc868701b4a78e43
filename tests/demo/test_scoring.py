import pytest
from PIL import Image

from internvl.demo.dataset import write_dataset
from internvl.demo.scoring import format_table, iou, load_eval, parse_box, score

ALL_KINDS = {"color", "shape", "position", "count", "ocr", "grounding", "describe", "compare", "multiturn", "text"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("score_data")
    write_dataset(out, 5, 20, seed=2)
    return load_eval(out / "eval.jsonl")


def replay(records, transform=lambda answers: answers):
    """An answer_fn that returns (a transform of) each record's reference answers, checking its inputs."""
    queue = iter(records)

    def answer_fn(images, questions):
        record = next(queue)
        assert questions == record["questions"]
        assert len(images) == len(record["images"])
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (224, 224) for im in images)
        return transform(list(record["answers"]))

    return answer_fn


def test_perfect_answers_score_100(records):
    results = score(records, replay(records))
    assert set(results) == ALL_KINDS | {"overall"}
    for kind in ALL_KINDS:
        assert results[kind] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert results["overall"] == {"n": 20, "correct": 20, "accuracy": 1.0}


def test_normalization_tolerates_case_whitespace_and_period(records):
    results = score(records, replay(records, lambda answers: [" " + a.upper().rstrip(".") + " \n" for a in answers]))
    # Grounding upper-cases the tags but keeps the numbers, so it stays correct too.
    assert results["overall"]["accuracy"] == 1.0


def test_wrong_answers_score_0(records):
    results = score(records, replay(records, lambda answers: ["Banana."] * len(answers)))
    assert all(results[k]["correct"] == 0 and results[k]["accuracy"] == 0.0 for k in results)
    assert results["overall"]["n"] == 20


def test_multiturn_needs_every_turn(records):
    multi = [r for r in records if r["kind"] == "multiturn"]
    results = score(multi, replay(multi, lambda answers: answers[:-1] + ["Banana."]))
    assert results["multiturn"]["correct"] == 0
    with pytest.raises(ValueError):
        score(multi, replay(multi, lambda answers: answers[:1]))


def test_extra_words_are_wrong(records):
    color = [r for r in records if r["kind"] == "color"]
    results = score(color, replay(color, lambda answers: [a.rstrip(".") + " square." for a in answers]))
    assert results["color"]["correct"] == 0


def grounding_record(tmp_path, box):
    path = tmp_path / "blank.png"
    Image.new("RGB", (200, 100), "white").save(path)
    return {"id": "g", "kind": "grounding", "images": [str(path)], "questions": ["q"], "answers": ["unused"],
            "meta": {"box": box, "width": 200, "height": 100}}


@pytest.mark.parametrize("answer, correct", [
    ("<ref>x</ref><box>[[0, 0, 500, 1000]]</box>", True),   # exactly the box (0, 0, 100, 100) px: IoU 1
    ("<box>[[0, 0, 500, 500]]</box>", True),                # (0, 0, 100, 50): IoU 5000/10000 = 0.5
    ("[[0, 0, 500, 490]]", False),                           # (0, 0, 100, 49): IoU 0.49
    ("[[0, 0, 250, 1000]]", True),                           # (0, 0, 50, 100): IoU 0.5
    ("[[250, 0, 750, 1000]]", False),                        # (50, 0, 150, 100): IoU 5000/15000
    ("[0, 0, 500, 1000]", True),                             # single brackets parse too
    ("The red circle.", False),                              # no box
])
def test_grounding_iou_threshold(tmp_path, answer, correct):
    record = grounding_record(tmp_path, [0, 0, 100, 100])
    results = score([record], lambda images, questions: [answer])
    assert results["grounding"]["correct"] == int(correct)


def test_parse_box_and_iou():
    assert parse_box("<box>[[1, 22, 333, 1000]]</box> and [[5, 5, 6, 6]]") == (1.0, 22.0, 333.0, 1000.0)
    assert parse_box("[[1.5,2,3,4]]") == (1.5, 2.0, 3.0, 4.0)
    assert parse_box("[[1, 2, 3]]") is None
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_format_table():
    results = {"color": {"n": 4, "correct": 3, "accuracy": 0.75}, "overall": {"n": 4, "correct": 3, "accuracy": 0.75}}
    lines = format_table(results).splitlines()
    assert lines[0].startswith("| kind | n | correct | accuracy |")
    assert lines[2] == "| color | 4 | 3 | 75.0% |"
    assert lines[-1] == "| overall | 4 | 3 | 75.0% |"
