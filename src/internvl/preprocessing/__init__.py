"""Preprocessing: images and videos → normalized 448×448 tiles (INTERNVL.md §9)."""

from internvl.preprocessing.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    candidate_grids,
    dynamic_preprocess,
    find_closest_grid,
    load_image,
    num_tiles,
    open_image,
    tile_grid,
    to_tensor,
)
from internvl.preprocessing.video import frame_indices, load_video, video_prompt_prefix

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "candidate_grids",
    "dynamic_preprocess",
    "find_closest_grid",
    "frame_indices",
    "load_image",
    "load_video",
    "num_tiles",
    "open_image",
    "tile_grid",
    "to_tensor",
    "video_prompt_prefix",
]
