"""Paged KV cache: a fixed pool of blocks, a ref-counted allocator with prefix caching, and a per-step batch view.

Layout. Per layer, K and V live in pools of shape (num_blocks, block_size, KV, d), allocated once at start-up from a
byte budget, so memory never grows mid-flight (SERVING.md §7). A sequence owns a *block table*: token t of the
sequence is stored in block `table[t // block_size]`, slot `t % block_size`.

Prefix caching. A *full* block of prompt tokens is identified by a chained SHA-256 hash over (parent block's hash,
the block's token keys). A token key is the token id, except for `<IMG_CONTEXT>` tokens, whose key is
(image digest, feature row): identical ids with different images never share KV. The chain root carries anything
else the cached K values depend on (the RoPE regime, see `engine.py`). A block becomes findable by its hash only
after its KV has been written. Blocks whose reference count drops to zero keep their hash and sit in an LRU list;
they count as free and are evicted (oldest first) only when a fresh block is needed.

Attention over pages on CPU. There is no paged-attention kernel here: `PagedBatch.update` writes the new K/V rows
into their slots with one `index_copy_`, then gathers every sequence's slots into a padded (B, KV, T_max, d)
tensor with one advanced-indexing read, and the model's ordinary SDPA runs over it with the additive mask from
`PagedBatch.mask` (causal per sequence, padding masked). That is one copy of the live KV per layer per step: simple,
exact, and fine for CPU; a GPU build would swap in a kernel that reads the block table directly.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def hash_prompt_blocks(token_keys: Sequence, block_size: int, root: object = None) -> list[bytes]:
    """Chained hashes of the full blocks of `token_keys` (a partial last block gets none).

    token_keys: one hashable per token (an int id, or `(image_digest, row)` for image tokens); `root` is mixed into
    the first hash. `repr` of ints, strings and tuples is unambiguous, so equal digests mean equal keys.
    """
    parent = hashlib.sha256(repr(("internvl-kv", root)).encode()).digest()
    hashes = []
    for start in range(0, len(token_keys) - block_size + 1, block_size):
        block = tuple(token_keys[start : start + block_size])
        parent = hashlib.sha256(parent + repr(block).encode()).digest()
        hashes.append(parent)
    return hashes


class BlockAllocator:
    """Reference counts, a free list, and the hash -> block map of the prefix cache.

    Free blocks are of two kinds: never hashed (`_fresh`) and cached (`_evictable`, LRU order, oldest first).
    `allocate` prefers fresh blocks so cached prefixes survive as long as possible.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self._fresh: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.peak_used = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out (cached-but-unused blocks included)."""
        return len(self._fresh) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def allocate(self) -> int:
        if self._fresh:
            block = self._fresh.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)  # least recently freed
            del self._by_hash[self._hash_of.pop(block)]
            self.evictions += 1
        else:
            raise RuntimeError("KV pool exhausted: the scheduler must check num_free before allocating")
        self.refcount[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def acquire(self, block: int) -> None:
        """One more reference to an existing (possibly cached-and-free) block."""
        if self.refcount[block] == 0:
            del self._evictable[block]
        self.refcount[block] += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def release(self, block: int) -> None:
        assert self.refcount[block] > 0, f"block {block} released more often than acquired"
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None  # most recently used end
            else:
                self._fresh.append(block)

    def register(self, block: int, block_hash: bytes) -> None:
        """Make a block whose KV is complete findable by hash. First writer wins; a block has at most one hash."""
        if block_hash in self._by_hash or block in self._hash_of:
            return
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Cached blocks for the longest prefix of `hashes` (stops at the first miss)."""
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def is_free(self, block: int) -> bool:
        return self.refcount[block] == 0


class PagedKVCache:
    """The block pool of every layer plus its allocator.

    Size it with `num_blocks` or with `budget_bytes` (the pool takes the largest whole number of blocks that fits;
    `nbytes` never exceeds the budget).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layer_devices: Sequence[torch.device | str] | None = None,
    ):
        """layer_devices: where each layer's pool lives when the layers are spread over devices
        (`internvl.parallel.placement`); default all on `device`, which also holds the batch masks."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        per_block = block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype)
        if (num_blocks is None) == (budget_bytes is None):
            raise ValueError("give exactly one of num_blocks or budget_bytes to size the KV pool")
        if num_blocks is None:
            num_blocks = int(budget_bytes) // per_block
            if num_blocks < 1:
                raise ValueError(
                    f"KV budget of {budget_bytes} bytes is smaller than one block ({per_block} bytes = 2 x "
                    f"{num_layers} layers x {block_size} tokens x {num_kv_heads} kv heads x {head_dim} x {dtype})"
                )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.num_blocks, self.block_nbytes = block_size, num_blocks, per_block
        self.dtype, self.device = dtype, torch.device(device)
        layer_devices = [device] * num_layers if layer_devices is None else list(layer_devices)
        if len(layer_devices) != num_layers:
            raise ValueError(f"layer_devices has {len(layer_devices)} entries for {num_layers} layers")
        # zeros, not empty: masked (padding) key/value slots are read by the gather and must be finite
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.allocator = BlockAllocator(num_blocks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write for forked sequences: the KV of block `src` into block `dst`, every layer."""
        for pool in self.k + self.v:
            pool[dst].copy_(pool[src])

    def batch(self, tables: Sequence[Sequence[int]], starts: Sequence[int], new_lens: Sequence[int]) -> "PagedBatch":
        return PagedBatch(self, tables, starts, new_lens)


class PagedBatch:
    """The `update(layer, k, v) -> (k_all, v_all)` protocol of `CausalLM` for one forward over B sequences.

    Sequence i has `starts[i]` tokens already cached and `new_lens[i]` new tokens in rows 0..new_lens[i]-1 of the
    right-padded (B, KV, n, d) inputs; its block table must already cover `starts[i] + new_lens[i]` tokens. The
    gathered outputs are (B, KV, T_max, d) in position order, padded past each sequence's length; `mask` gives the
    matching additive attention mask.
    """

    def __init__(self, pool: PagedKVCache, tables, starts, new_lens):
        if not (len(tables) == len(starts) == len(new_lens)) or not tables:
            raise ValueError("tables, starts and new_lens must be non-empty and of equal length")
        self.pool = pool
        bs = pool.block_size
        self.starts = torch.tensor(list(starts), dtype=torch.long)
        self.new_lens = torch.tensor(list(new_lens), dtype=torch.long)
        self.totals = self.starts + self.new_lens
        b, n, t_max = len(tables), int(self.new_lens.max()), int(self.totals.max())
        self.n, self.t_max = n, t_max
        gather = torch.zeros(b, t_max, dtype=torch.long)  # padding reads slot 0 (finite, masked)
        write_slots, write_rows = [], []
        for i, table in enumerate(tables):
            total, start = int(self.totals[i]), int(starts[i])
            if len(table) * bs < total:
                raise ValueError(f"sequence {i} needs {total} KV slots but its block table has {len(table)} blocks")
            pos = torch.arange(total)
            slots = torch.tensor(list(table), dtype=torch.long)[pos // bs] * bs + pos % bs  # (total,)
            gather[i, :total] = slots
            write_slots.append(slots[start:])
            write_rows.append(i * n + torch.arange(total - start))
        self._indices = {None: (gather, torch.cat(write_slots), torch.cat(write_rows))}  # per device, on first use
        self.length = int(self.starts.max())  # CausalLM reads `cache.length`; the engine passes positions itself

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, kv, n, d = k.shape  # (B, KV, n, d), rows past new_lens[i] are padding
        k_pool = self.pool.k[layer].view(-1, kv, d)  # (num_blocks * block_size, KV, d)
        v_pool = self.pool.v[layer].view(-1, kv, d)
        gather, write_slots, write_rows = self._indices_on(k_pool.device)
        k_pool.index_copy_(0, write_slots, k.transpose(1, 2).reshape(b * n, kv, d)[write_rows])
        v_pool.index_copy_(0, write_slots, v.transpose(1, 2).reshape(b * n, kv, d)[write_rows])
        shape = (*gather.shape, kv, d)  # (B, T_max, KV, d) -> (B, KV, T_max, d)
        k_all = k_pool.index_select(0, gather.reshape(-1)).view(shape).permute(0, 2, 1, 3)
        v_all = v_pool.index_select(0, gather.reshape(-1)).view(shape).permute(0, 2, 1, 3)
        return k_all, v_all

    def _indices_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gather, write slots, write rows) on `device`, copied there once per batch."""
        if device not in self._indices:
            self._indices[device] = tuple(t.to(device) for t in self._indices[None])
        return self._indices[device]

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, 1, n, T_max): query j of sequence i (position starts[i] + j) sees keys 0..its position.

        Padding queries see the whole sequence (their outputs are ignored; this keeps every row finite).
        """
        q_pos = self.starts[:, None] + torch.arange(self.n)[None, :]  # (B, n)
        keys = torch.arange(self.t_max)
        allowed = (keys[None, None, :] <= q_pos[:, :, None]) & (keys[None, None, :] < self.totals[:, None, None])
        out = torch.zeros(allowed.shape, dtype=dtype)
        out = out.masked_fill(~allowed, torch.finfo(dtype).min)
        return out[:, None].to(self.pool.device)
