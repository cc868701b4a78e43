"""Vision features for the engine: content digests, an LRU cache of image embeddings, and a batched ViT runner.

An image reaches the engine as its tiles (T, 3, S, S) or as ready features (T, N, D). The cache key is
(digest, tiling, tile-tensor shape): the digest names the content (SHA-256 of the tile bytes unless the caller
supplies its own, e.g. of the file), `tiling` names the preprocessing that produced the tiles (max_num, thumbnail,
...) so a caller-side digest of the *file* cannot collide across tilings. Repeated images skip the ViT, and the
digest also feeds the prefix-cache hashes of the image tokens (`kv_cache.hash_prompt_blocks`).

The ViT runs on the tiles of every cache miss of a step together, in micro-batches of at most `max_batch_tiles`
tiles (SERVING.md §7). Tiles are independent through the ViT, pixel shuffle and projector, so splitting never
changes which feature belongs to which tile.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and raw bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One image (or video frame group) of a prompt: tiles or ready vision features, plus its content digest.

    pixel_values: (T, 3, S, S) tiles; features: (T, N, D) output of `extract_feature` (skips the ViT). Exactly one.
    digest: content id; None = hash of the tensor. tiling: hashable description of the tiling parameters, mixed
    into the cache key (needed when `digest` names the source file rather than the tiles).
    """

    pixel_values: torch.Tensor | None = None
    features: torch.Tensor | None = None
    digest: str | None = None
    tiling: tuple = ()

    def __post_init__(self):
        if (self.pixel_values is None) == (self.features is None):
            raise ValueError("an image needs exactly one of pixel_values (T, 3, S, S) or features (T, N, D)")
        if self.pixel_values is not None and (self.pixel_values.ndim != 4 or self.pixel_values.shape[1] != 3):
            raise ValueError(f"pixel_values must have shape (tiles, 3, H, W), got {tuple(self.pixel_values.shape)}")
        if self.features is not None and self.features.ndim != 3:
            raise ValueError(f"visual features must have shape (tiles, tokens, dim), got {tuple(self.features.shape)}")
        if self.digest is None:
            object.__setattr__(self, "digest", tensor_digest(self.tensor))

    @property
    def tensor(self) -> torch.Tensor:
        return self.pixel_values if self.pixel_values is not None else self.features

    @property
    def num_tiles(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def key(self) -> tuple:
        kind = "px" if self.pixel_values is not None else "feat"
        return (self.digest, self.tiling, kind, tuple(self.tensor.shape))


class VisionCache:
    """LRU map key -> features (T, N, D). capacity = number of images kept; 0 disables caching."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"vision cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def get(self, key) -> torch.Tensor | None:
        feats = self._items.get(key)
        if feats is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return feats

    def put(self, key, feats: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self._items[key] = feats
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class VisionEncoder:
    """Features for many images at once: cache hits are returned, misses go through the ViT in tile micro-batches."""

    def __init__(self, model, cache: VisionCache, max_batch_tiles: int = 16):
        if max_batch_tiles < 1:
            raise ValueError(f"max_batch_tiles must be >= 1, got {max_batch_tiles}")
        self.model = model
        self.cache = cache
        self.max_batch_tiles = max_batch_tiles
        self.tiles_encoded = 0
        self.vit_calls = 0

    @torch.inference_mode()
    def encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(images)
        pending: dict[tuple, list[int]] = {}  # key -> indices of `images` waiting for it (duplicates run once)
        for i, img in enumerate(images):
            if img.features is not None:
                out[i] = img.features
                continue
            feats = self.cache.get(img.key)
            if feats is not None:
                out[i] = feats
            else:
                pending.setdefault(img.key, []).append(i)
        if pending:
            weight = self.model.vision_model.embeddings.patch_embedding.weight
            firsts = [idx[0] for idx in pending.values()]
            tiles = torch.cat([images[i].pixel_values for i in firsts]).to(device=weight.device, dtype=weight.dtype)
            parts = []
            for s in range(0, tiles.shape[0], self.max_batch_tiles):
                parts.append(self.model.extract_feature(tiles[s : s + self.max_batch_tiles]))  # (t, N, D)
                self.vit_calls += 1
            feats_all = torch.cat(parts)
            self.tiles_encoded += tiles.shape[0]
            offset = 0
            for key, idx in pending.items():
                t = images[idx[0]].num_tiles
                feats = feats_all[offset : offset + t]
                offset += t
                self.cache.put(key, feats)
                for i in idx:
                    out[i] = feats
        return out  # type: ignore[return-value]
