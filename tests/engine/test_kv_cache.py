"""Paged KV pool: sizing from a byte budget, ref-counted allocation with an LRU prefix cache, the batch view."""

import pytest
import torch

from internvl.engine.kv_cache import BlockAllocator, PagedKVCache, block_bytes, hash_prompt_blocks
from internvl.model.llm import KVCache


def test_budget_sizes_the_pool_and_is_never_exceeded():
    per_block = block_bytes(num_layers=2, num_kv_heads=2, head_dim=12, block_size=4, dtype=torch.float32)
    assert per_block == 2 * 2 * 4 * 2 * 12 * 4
    budget = 10 * per_block + per_block // 2  # 10.5 blocks
    pool = PagedKVCache(2, 2, 12, block_size=4, budget_bytes=budget)
    assert pool.num_blocks == 10
    assert pool.nbytes == 10 * per_block <= budget
    assert PagedKVCache(2, 2, 12, block_size=4, budget_bytes=budget, dtype=torch.bfloat16).num_blocks == 21
    with pytest.raises(ValueError, match="smaller than one block"):
        PagedKVCache(2, 2, 12, block_size=4, budget_bytes=per_block - 1)
    with pytest.raises(ValueError, match="exactly one of"):
        PagedKVCache(2, 2, 12, block_size=4, budget_bytes=budget, num_blocks=3)


def test_allocator_refcounts_prefix_cache_and_lru_eviction():
    a = BlockAllocator(4)
    blocks = [a.allocate() for _ in range(4)]
    assert a.num_free == 0 and a.num_used == 4 and a.peak_used == 4
    with pytest.raises(RuntimeError, match="exhausted"):
        a.allocate()
    a.register(blocks[0], b"h0")
    a.register(blocks[1], b"h1")
    a.acquire(blocks[0])  # a second sequence shares block 0
    a.release(blocks[0])
    assert a.refcount[blocks[0]] == 1 and a.num_free == 0
    for b in (blocks[1], blocks[0], blocks[2]):  # cached blocks freed in the order h1, h0; block 2 was never hashed
        a.release(b)
    assert a.num_free == 3 and a.num_cached == 2
    assert a.match([b"h0", b"h1", b"h2"]) == [blocks[0], blocks[1]]
    assert a.match([b"h1"]) == [blocks[1]] and a.match([b"zz", b"h1"]) == []
    assert a.allocate() == blocks[2]  # a never-hashed block first: cached prefixes live as long as possible
    assert a.allocate() == blocks[1]  # then the least recently freed cached block is evicted
    assert a.match([b"h1"]) == [] and a.evictions == 1
    a.acquire(blocks[0])  # reusing a cached free block takes it out of the free list
    assert a.num_free == 0 and a.refcount[blocks[0]] == 1 and a.match([b"h0"]) == [blocks[0]]


def test_block_hashes_chain_and_separate_images():
    bs = 4
    text = list(range(10, 22))  # 3 full blocks
    base = hash_prompt_blocks(text, bs)
    assert len(base) == 3 and len(hash_prompt_blocks(text + [1, 2], bs)) == 3  # a partial block has no hash
    changed = hash_prompt_blocks([99] + text[1:], bs)
    assert all(x != y for x, y in zip(base, changed))  # block 0 differs -> every later hash differs (chained)
    assert hash_prompt_blocks(text[:4] + [0] + text[5:], bs)[0] == base[0]
    img_a = text[:4] + [("imgA", r) for r in range(4)] + text[8:]
    img_b = text[:4] + [("imgB", r) for r in range(4)] + text[8:]
    ha, hb = hash_prompt_blocks(img_a, bs), hash_prompt_blocks(img_b, bs)
    assert ha[0] == hb[0] and ha[1] != hb[1] and ha[2] != hb[2]  # same ids, different image: no sharing
    assert hash_prompt_blocks(text, bs, root="long")[0] != base[0]


def test_paged_batch_equals_a_plain_growing_cache():
    torch.manual_seed(0)
    layers, kv, d, bs = 2, 2, 6, 4
    pool = PagedKVCache(layers, kv, d, block_size=bs, num_blocks=16)
    alloc = pool.allocator
    lens = [7, 1, 10]
    # interleave allocations so block tables are not contiguous
    tables = [[], [], []]
    for i in range(3):
        for s in range(3):
            if len(tables[s]) < pool.blocks_for(lens[s] + 2):
                tables[s].append(alloc.allocate())
    plain = [KVCache(layers) for _ in lens]

    def run(starts, new):
        n = max(new)
        batch = pool.batch(tables, starts, new)
        for layer in range(layers):
            k = torch.randn(3, kv, n, d)
            v = torch.randn(3, kv, n, d)
            k_all, v_all = batch.update(layer, k, v)
            assert k_all.shape == (3, kv, max(s + m for s, m in zip(starts, new)), d)
            for i in range(3):
                ref_k, ref_v = plain[i].update(layer, k[i : i + 1, :, : new[i]], v[i : i + 1, :, : new[i]])
                t = starts[i] + new[i]
                assert torch.equal(k_all[i, :, :t], ref_k[0]) and torch.equal(v_all[i, :, :t], ref_v[0])
        return batch

    batch = run([0, 0, 0], lens)  # prefill of different lengths (right padded)
    m = batch.mask(torch.float32)[:, 0]  # (B, n, T)
    assert m.shape == (3, 10, 10)
    allowed = m == 0
    assert allowed[0, 3].tolist() == [True] * 4 + [False] * 6  # causal
    assert allowed[1, 0].tolist() == [True] + [False] * 9  # keys past the sequence are masked
    assert allowed[1, 5].tolist() == [True] + [False] * 9  # a padding query stays finite
    batch = run([7, 1, 10], [1, 1, 1])  # one decode step each
    assert (batch.mask(torch.float32)[:, 0, 0] == 0).sum(-1).tolist() == [8, 2, 11]
    with pytest.raises(ValueError, match="block table"):
        pool.batch([tables[0][:1]], [0], [5])


def test_copy_block_copies_every_layer():
    pool = PagedKVCache(2, 1, 3, block_size=2, num_blocks=3)
    for t in pool.k + pool.v:
        t[0].normal_()
    pool.copy_block(0, 2)
    assert all(torch.equal(t[0], t[2]) for t in pool.k + pool.v)
