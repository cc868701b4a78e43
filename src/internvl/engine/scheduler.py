"""Continuous-batching scheduler: waiting and running queues over a paged KV pool.

The unit is a `Sequence` (one choice of one request). Every step, each running sequence processes the tokens whose
KV is not yet cached: one token for a decoding sequence, a chunk of the prompt for a prefilling one. A sequence
samples a new token once all its tokens are cached. Requests join (admission) and leave (finish, abort) between
steps, so decodes never wait for a whole batch.

Per step:
1. Running sequences, in admission order. Decodes always run (one token each). Prefills share a token budget
   (`prefill_chunk_tokens`): a long prompt is prefilled over several steps while the decodes keep going.
2. Waiting sequences are admitted first-come first-served while there is budget, a batch slot
   (`max_batch_size`), and enough free blocks for the whole uncached part of the prompt. The head of the queue
   is never skipped, so nothing starves; a request that does not fit waits (it never fails for lack of memory).
   Prefix-cache hits are taken at admission: matching full blocks are shared (reference counted) and only the rest
   is prefilled. At least the last prompt token is always recomputed, because its logits are needed.

Preemption policy (recompute, newest first): when a running sequence needs a new block and none is free, the
most recently admitted running sequence is preempted: its blocks are released (full prompt blocks stay in the
prefix cache, so the recompute is usually cheap), and it goes back to the front of the waiting queue with its
generated tokens; when readmitted it prefills prompt + generated tokens and continues exactly where it stopped
(its sampler state is untouched). The oldest sequence is never preempted for a newer one, so the system always
makes progress: `Engine.add_request` refuses requests that could not run even alone in the whole pool. No
admission happens in a step that preempted, which avoids thrashing.

Bounded queue: with `max_queue`, adding a new request while that many requests wait raises `QueueFull`
(the server maps it to 429, SERVING.md §7). Preempted sequences always go back, whatever the bound.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from internvl.engine.kv_cache import PagedKVCache

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class QueueFull(RuntimeError):
    """The bounded waiting queue is full; retry later (HTTP 429 with Retry-After)."""


@dataclass(eq=False)
class Sequence:
    """One generated sequence. `token_ids` = prompt + generated; KV of the first `num_computed` is in the pool."""

    seq_id: int
    request: Any  # the engine's request object (owner of params, images, outputs)
    index: int  # choice index within the request
    token_ids: list[int]
    prompt_len: int
    block_hashes: list[bytes] = field(default_factory=list)  # full *prompt* blocks, for the prefix cache
    pending_forks: int = 0  # n - 1 for the first choice of an n > 1 request, until its prompt is prefilled
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    fork_blocks: list[int] = field(default_factory=list)  # reserved last-block copies for the forks
    num_registered: int = 0  # leading prompt blocks registered in the prefix cache by this sequence
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the first admission
    status: str = WAITING
    admit_order: int = -1
    counts_in_queue: bool = True  # a new request (counts towards max_queue) rather than a preempted sequence

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def to_compute(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class Work:
    """Process `seq.token_ids[start : start + n]` this step."""

    seq: Sequence
    start: int
    n: int

    @property
    def samples(self) -> bool:
        """After this work every token is cached, so the last position's logits give the next token."""
        return self.start + self.n == len(self.seq.token_ids)


@dataclass
class StepPlan:
    works: list[Work]
    preempted: list[Sequence]


class Scheduler:
    def __init__(
        self,
        pool: PagedKVCache,
        *,
        max_batch_size: int = 32,
        prefill_chunk_tokens: int = 2048,
        max_queue: int | None = None,
        enable_prefix_caching: bool = True,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None (unbounded), got {max_queue}")
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_queue = max_queue
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admit_counter = itertools.count()
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first admissions)

    # ------------------------------------------------------------------------------------------ queues
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_requests(self) -> int:
        return sum(1 for s in self.waiting if s.counts_in_queue)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (raises QueueFull when the bounded queue is full)."""
        if self.max_queue is not None and self.num_waiting_requests >= self.max_queue:
            raise QueueFull(f"{self.num_waiting_requests} requests are waiting (max_queue={self.max_queue})")
        seq.status = WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its blocks (finish or abort)."""
        if seq.status == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq.status == RUNNING:
            self.running.remove(seq)
        self._release(seq)
        seq.status = FINISHED

    def _release(self, seq: Sequence) -> None:
        alloc = self.pool.allocator
        for block in seq.block_table + seq.fork_blocks:
            alloc.release(block)
        seq.block_table, seq.fork_blocks = [], []
        seq.num_computed = 0
        seq.num_registered = 0

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it at the front for recompute."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = WAITING
        seq.counts_in_queue = False
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------------------------------ blocks
    def _grow(self, seq: Sequence, upto: int, preempted: list[Sequence]) -> bool:
        """Give `seq` blocks for `upto` tokens, preempting newer sequences while the pool is full.
        False if `seq` itself had to be preempted."""
        alloc = self.pool.allocator
        need = self.pool.blocks_for(upto) - len(seq.block_table)
        while alloc.num_free < need:
            victim = self.running[-1]  # the most recently admitted
            self.preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        while len(seq.block_table) < self.pool.blocks_for(upto):
            seq.block_table.append(alloc.allocate())
        return True

    def _try_admit(self, seq: Sequence) -> bool:
        alloc, bs = self.pool.allocator, self.pool.block_size
        hits = alloc.match(seq.block_hashes) if self.enable_prefix_caching else []
        hits = hits[: (len(seq.token_ids) - 1) // bs]  # the last token is always recomputed (its logits)
        reactivated = sum(1 for b in hits if alloc.is_free(b))  # cached-free blocks leave the free pool
        new_blocks = self.pool.blocks_for(len(seq.token_ids)) - len(hits)
        fork_copies = seq.pending_forks if seq.prompt_len % bs else 0
        if alloc.num_free - reactivated < new_blocks + fork_copies:
            return False
        for b in hits:
            alloc.acquire(b)
        seq.block_table = hits + [alloc.allocate() for _ in range(new_blocks)]
        seq.fork_blocks = [alloc.allocate() for _ in range(fork_copies)]
        seq.num_computed = len(hits) * bs
        seq.num_registered = len(hits)
        if seq.counts_in_queue:  # first admission: report the prefix-cache hit
            seq.num_cached_tokens = len(hits) * bs
            self.num_cached_tokens += seq.num_cached_tokens
        return True

    # ------------------------------------------------------------------------------------------ the step
    def schedule(self) -> StepPlan:
        works: list[Work] = []
        preempted: list[Sequence] = []
        budget = self.prefill_chunk_tokens
        for seq in list(self.running):
            if seq.status != RUNNING:  # preempted earlier in this loop
                continue
            remaining = seq.to_compute
            if remaining == 1:
                n = 1
            else:
                if budget <= 0:
                    continue
                n = min(remaining, budget)
                budget -= n
            if not self._grow(seq, seq.num_computed + n, preempted):
                continue
            works.append(Work(seq, seq.num_computed, n))
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.pending_forks > self.max_batch_size:
                break
            if not self._try_admit(seq):
                break
            self.waiting.popleft()
            seq.status = RUNNING
            seq.admit_order = next(self._admit_counter)
            self.running.append(seq)
            n = min(seq.to_compute, budget)
            budget -= n
            works.append(Work(seq, seq.num_computed, n))
        return StepPlan(works, preempted)

    # ------------------------------------------------------------------------------------------ after the step
    def advance(self, work: Work) -> None:
        """Record that a work's tokens are now cached and register newly completed prompt blocks."""
        seq = work.seq
        seq.num_computed = work.start + work.n
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed // self.pool.block_size, len(seq.block_hashes))
        for i in range(seq.num_registered, full):
            self.pool.allocator.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered = max(seq.num_registered, full)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` from `parent`'s fully prefilled prompt: full blocks shared, a partial last block copied."""
        alloc, bs = self.pool.allocator, self.pool.block_size
        full = parent.num_computed // bs
        for b in parent.block_table[:full]:
            alloc.acquire(b)
        child.block_table = parent.block_table[:full]
        if parent.num_computed % bs:
            copy = parent.fork_blocks.pop()
            self.pool.copy_block(parent.block_table[full], copy)
            child.block_table = child.block_table + [copy]
        child.num_computed = parent.num_computed
        child.num_registered = parent.num_registered
        child.status = RUNNING
        child.admit_order = parent.admit_order
        self.running.insert(self.running.index(parent) + 1, child)
        parent.pending_forks -= 1
