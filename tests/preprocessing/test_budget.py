"""Token-budget tiling: the per-image tile limit against a brute-force rule, and prompts that never exceed the budget."""

import random

import pytest

from internvl.preprocessing.budget import image_token_room, max_tiles_for_budget, worst_case_tiles
from internvl.preprocessing.image import num_tiles
from internvl.templates.conversation import build_chat_prompt
from internvl.templates.tokens import IMG_CONTEXT_TOKEN


def brute_force_limit(budget, per_tile, thumbnail, max_num, images):
    """The largest limit m whose every possible grid (cols·rows <= m, plus the thumbnail of a multi-tile grid) fits
    for all images; None when not even m = 1 fits."""
    best = None
    for m in range(1, max_num + 1):
        grids = [(c, r) for c in range(1, m + 1) for r in range(1, m + 1) if c * r <= m]
        most = max(c * r + (1 if thumbnail and c * r > 1 else 0) for c, r in grids)
        if images * most * per_tile <= budget:
            best = m
    return best


@pytest.mark.parametrize("per_tile", [4, 256])
@pytest.mark.parametrize("thumbnail", [True, False])
@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("images", [1, 2, 3])
def test_limit_equals_brute_force(per_tile, thumbnail, max_num, images):
    for tiles_worth in range(0, 45):
        for budget in (tiles_worth * per_tile, tiles_worth * per_tile + per_tile // 2):
            want = brute_force_limit(budget, per_tile, thumbnail, max_num, images)
            if want is None:
                with pytest.raises(ValueError, match="smaller than one tile per image"):
                    max_tiles_for_budget(budget, per_tile, thumbnail, max_num, images)
            else:
                assert max_tiles_for_budget(budget, per_tile, thumbnail, max_num, images) == want, budget


def test_thumbnail_makes_two_tiles_per_image_worth_one():
    assert max_tiles_for_budget(512, 256, True, 12) == 1  # a 2-tile grid would cost 3 tiles
    assert max_tiles_for_budget(512, 256, False, 12) == 2
    assert max_tiles_for_budget(768, 256, True, 12) == 2
    assert max_tiles_for_budget(13 * 256, 256, True, 12) == 12
    assert max_tiles_for_budget(100 * 256, 256, True, 12) == 12  # never above the model's limit
    assert worst_case_tiles(1, True) == 1 and worst_case_tiles(6, True) == 7 and worst_case_tiles(6, False) == 6


def test_no_budget_or_no_images_keeps_the_limit():
    assert max_tiles_for_budget(None, 256, True, 12, 3) == 12
    assert max_tiles_for_budget(10, 256, True, 6, 0) == 6


@pytest.mark.parametrize("args, message", [
    ((255, 256, True, 12, 1), "smaller than one tile per image: 1 image\\(s\\) x 256 tokens = 256"),
    ((700, 256, True, 12, 3), "smaller than one tile per image: 3 image\\(s\\) x 256 tokens = 768"),
    ((-5, 256, True, 12, 1), "max_image_tokens must be an integer >= 0"),
    (("1024", 256, True, 12, 1), "max_image_tokens must be an integer"),
    ((1024, 0, True, 12, 1), "tokens_per_tile must be an integer >= 1"),
    ((1024, 256, True, 0, 1), "max_num must be an integer >= 1"),
])
def test_bad_budgets_raise_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        max_tiles_for_budget(*args)


# Sizes from the spec's golden tiling table (INTERNVL.md §9.3) plus random ones, extreme aspect ratios included.
SIZES = [(448, 448), (634, 634), (951, 951), (640, 480), (200, 150), (64, 48), (1280, 720), (1200, 300),
         (300, 1200), (100, 1000), (2480, 3508), (3000, 4000), (1, 10000), (10000, 1), (1, 1)]


def test_prompt_image_tokens_never_exceed_the_budget():
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(60)]
    checked = 0
    for budget in (256, 512, 768, 1000, 1280, 2048, 2560, 3328, 4096, 8192):
        for images in (1, 2, 3):
            if budget < images * 256:
                continue
            m = max_tiles_for_budget(budget, 256, True, 12, images)
            for _ in range(25):
                chosen = [rng.choice(sizes) for _ in range(images)]
                patches = [num_tiles(w, h, max_num=m, use_thumbnail=True) for w, h in chosen]
                question = "".join(f"Image-{i + 1}: <image>\n" for i in range(images)) + "Compare them."
                prompt, _ = build_chat_prompt("internvl2_5", question, num_patches_list=patches, num_image_token=256)
                assert prompt.count(IMG_CONTEXT_TOKEN) == 256 * sum(patches) <= budget, (budget, chosen, m)
                checked += 1
    assert checked > 500


def test_the_budget_is_used_not_wasted():
    # with the limit one higher, some image would overflow: the rule is as generous as it can be
    for budget in (768, 1280, 2048, 3328):
        m = max_tiles_for_budget(budget, 256, True, 12)
        if m < 12:
            assert 256 * num_tiles(448 * (m + 1), 448, max_num=m + 1) > budget  # a (m+1, 1) grid plus thumbnail


def test_context_room():
    assert image_token_room(4096, 100, 512) == 3484
    assert image_token_room(512, 400, 200) == -88
