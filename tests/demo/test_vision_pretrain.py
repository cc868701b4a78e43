"""Dense ViT pre-training of the demo model: per-patch labels from the scene geometry, the loss, a short run."""

import random

import numpy as np
import torch

from tiny import tiny_vision

from internvl.demo.scenes import COLORS, LETTERS, SHAPES, Scene, SceneObject, make_scene
from internvl.demo.vision_pretrain import (
    HEADS,
    VisionPretrainConfig,
    dense_loss,
    init_sincos_positions_,
    make_batch,
    patch_labels,
    pretrain_vision,
)
from internvl.model.vision import InternVisionModel

BG = (250, 250, 250)


def square(color, box, shape="square"):
    return SceneObject(shape, color, "top left", box)


def test_a_patch_aligned_square_labels_exactly_its_patches():
    # pixels 28..69 x 42..83 are patches (rows 3-5, columns 2-4) of 14 px, each fully covered
    scene = Scene((square("red", (28, 42, 70, 84)),), BG)
    lab = patch_labels(scene)
    expected = np.zeros((16, 16), dtype=np.int64)
    expected[3:6, 2:5] = 1 + COLORS.index("red")
    np.testing.assert_array_equal(lab["color"], expected)
    np.testing.assert_array_equal(lab["shape"], (expected > 0) * (1 + SHAPES.index("square")))
    assert not lab["letter"].any()
    np.testing.assert_allclose(lab["box"][4, 3], [28 / 224, 42 / 224, 70 / 224, 84 / 224], rtol=1e-6)


def test_partly_covered_patches_follow_the_20_percent_rule():
    scene = Scene((square("blue", (30, 30, 60, 60)),), BG)
    color = patch_labels(scene)["color"] > 0
    assert color[2, 2]  # 12 x 12 of 14 x 14 pixels covered: 73%
    assert color[2, 4] and color[4, 2]  # a 4-pixel strip over a whole side: 4 x 12 = 48 px, 24%
    assert not color[4, 4]  # a 4 x 4 corner: 8%
    assert color.sum() == 8  # the 3 x 3 block of touched patches minus that corner


def test_two_objects_in_one_patch_take_the_larger_cover():
    # patch (0, 0) is x 0..13, y 0..13: the green square covers 10 columns of it, the yellow one 4
    scene = Scene((square("green", (0, 0, 10, 14)), square("yellow", (10, 0, 24, 14), "diamond")), BG)
    lab = patch_labels(scene)
    assert lab["color"][0, 0] == 1 + COLORS.index("green")


def test_letters_are_labelled_left_to_right_where_their_ink_is():
    rng = random.Random(7)
    scene = next(s for s in (make_scene(rng, word=True) for _ in range(50)) if len(set(s.word)) == len(s.word))
    lab = patch_labels(scene)["letter"]
    found = sorted(set(lab[lab > 0].tolist()))
    assert found == sorted(1 + LETTERS.index(c) for c in scene.word)  # every letter, nothing else
    x1, y1, x2, y2 = scene.word_bbox
    rows, cols = np.nonzero(lab)
    assert rows.min() * 14 + 14 > y1 and rows.max() * 14 < y2  # inside the word's layout box
    assert cols.min() * 14 + 14 > x1 and cols.max() * 14 < x2
    first = [np.nonzero(lab == 1 + LETTERS.index(c))[1].mean() for c in scene.word]
    assert first == sorted(first)  # mean column grows with the letter's index in the word


def test_batch_shapes_and_a_resized_input_keeps_the_patch_grid():
    px, lab = make_batch(random.Random(0), 3, 112, 14)
    assert px.shape == (3, 3, 112, 112)
    assert lab["color"].shape == (3, 8, 8) and lab["box"].shape == (3, 8, 8, 4)


def test_loss_is_zero_only_for_the_right_answer():
    _, lab = make_batch(random.Random(1), 2, 224, 14)
    n = 2 * 16 * 16
    logits = torch.full((2, 256, sum(HEADS.values())), -30.0)
    parts = dict(zip(HEADS, logits.split(list(HEADS.values()), dim=-1)))
    for name in ("color", "shape", "letter"):  # one-hot on the true class
        parts[name].view(n, -1)[torch.arange(n), lab[name].reshape(-1)] = 30.0
    parts["box"].copy_(lab["box"].reshape(2, 256, 4))
    exact = torch.cat([parts[k] for k in HEADS], dim=-1)
    loss, items = dense_loss(exact, lab)
    assert float(loss) < 1e-6
    wrong = exact.clone()
    wrong[..., : HEADS["color"]] = wrong[..., : HEADS["color"]].roll(1, dims=-1)
    assert dense_loss(wrong, lab)[1]["color"] > 10


def test_sincos_positions_distinguish_every_patch_and_keep_the_class_slot():
    vm = InternVisionModel(tiny_vision(image_size=56))
    before = vm.embeddings.position_embedding[0, 0].clone()
    init_sincos_positions_(vm)
    pos = vm.embeddings.position_embedding[0, 1:]  # (16, C) for a 4 x 4 grid
    torch.testing.assert_close(vm.embeddings.position_embedding[0, 0], before)
    dist = torch.cdist(pos, pos)
    assert float(dist[~torch.eye(16, dtype=torch.bool)].min().detach()) > 0.05
    # neighbours are closer than far patches: (0, 0)-(0, 1) vs (0, 0)-(3, 3)
    assert dist[0, 1] < dist[0, 15]


def test_a_short_run_lowers_the_loss_on_unseen_scenes():
    torch.manual_seed(0)
    vm = InternVisionModel(tiny_vision(image_size=56))
    head_dim = sum(HEADS.values())
    px, lab = make_batch(random.Random(99), 16, 56, 14)

    def held_out_loss(head: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(dense_loss(head(vm(px)[:, 1:]), lab)[0])

    lines = []
    summary = pretrain_vision(vm, VisionPretrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5,
                                                       log_steps=20), log=lines.append)
    assert len(lines) == 3 and lines[-1].startswith("vision pre-training step 60/60 | loss ")
    trained = summary.pop("head")
    untrained = torch.nn.Linear(vm.config.hidden_size, head_dim)
    torch.nn.init.zeros_(untrained.weight), torch.nn.init.zeros_(untrained.bias)  # uniform classes, zero boxes
    assert held_out_loss(trained) < 0.7 * held_out_loss(untrained)
    assert 0.0 <= summary["held_out"]["color"] <= 1.0 and summary["steps"] == 60
