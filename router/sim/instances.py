"""Simulated workers: a prefill instance (queue, chunked prefill, prefix cache) and a decode
instance (continuous batching priced step by step, KV admission).

Owns: each instance's own state and its timing arithmetic. Must not: schedule events, talk
to the router, or decide placements (``simulator`` drives them).

Decode timing: a step over a batch of ``n`` requests holding ``K`` KV tokens costs
``a + s * n + b * K`` (``CostModel.decode_step_time``), and every step adds ``n`` tokens, so
``k`` steps from a boundary take ``k * (a + s * n) + b * (k * K + n * k * (k - 1) / 2)``. The instance keeps
the time and step count of its last boundary and jumps straight to the next finish instead
of simulating each step; a request that joins mid-step joins the step in progress
(optimistic by less than one step).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.router.sim.cost_model import CostModel


@dataclass(slots=True)
class Progress:
    """A started prefill: tokens still to compute and context already in its KV."""

    request_id: str
    remaining: int
    context: int
    compute_s: float = 0.0
    """Its share of the compute time so far (for the planner's prefill-seconds figure)."""


def touch_tail_first(cache: OrderedDict[int, None], block_hashes: Sequence[int]) -> None:
    """Mark a prompt's blocks most recently used, its first block last: the engine frees a
    request's blocks tail first (``KVCacheManager.free``, as vLLM does), so among blocks used
    together a prompt's tail is evicted before its head, and an evicted block never leaves
    its own descendants cached behind a missing parent's place in the prefix."""
    for block_hash in reversed(block_hashes):
        cache[block_hash] = None
        cache.move_to_end(block_hash)


class PrefillInstance:
    """FIFO queue, chunked prefill iterations, LRU cache of prompt blocks."""

    def __init__(self, instance_id: str, capacity_blocks: int) -> None:
        self.instance_id = instance_id
        self.capacity_blocks = capacity_blocks
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.queue: OrderedDict[str, object] = OrderedDict()
        self.active: list[Progress] = []
        self.busy = False
        self.busy_time_s = 0.0
        self.draining = False

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue and not self.active

    def cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        n = 0
        for block_hash in block_hashes:
            if block_hash not in self.cache:
                break
            n += 1
        touch_tail_first(self.cache, block_hashes[:n])
        return n

    def store(self, block_hashes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Insert a prompt's blocks; returns (newly stored, evicted) for the KV events."""
        stored = [block_hash for block_hash in block_hashes if block_hash not in self.cache]
        touch_tail_first(self.cache, block_hashes)
        evicted = []
        while len(self.cache) > self.capacity_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        return stored, evicted


def iteration_time(cost: CostModel, pieces: Sequence[tuple[Progress, int]]) -> float:
    """One prefill iteration computing ``n`` tokens of each piece after its context."""
    total = sum(n for _, n in pieces)
    pairs = sum(n * (p.context + n / 2) for p, n in pieces)
    return (
        cost.prefill_overhead_s
        + cost.prefill_s_per_token * total
        + (cost.prefill_s_per_token_pair * pairs)
    )


@dataclass(slots=True)
class Decoding:
    request_id: str
    context: int
    """KV tokens it holds now (prompt + tokens generated)."""
    reserved: int
    """KV tokens reserved at admission (prompt + output)."""
    finish_step: int


class DecodeInstance:
    """Continuous batching over the requests admitted here, priced in closed form."""

    def __init__(self, instance_id: str, cost: CostModel, max_batch: int) -> None:
        self.instance_id = instance_id
        self.cost = cost
        self.capacity_tokens = cost.kv_capacity_tokens
        self.max_batch = max_batch
        self.running: dict[str, Decoding] = {}
        self._finishes: list[tuple[int, str]] = []
        self.waiting: deque[str] = deque()
        """Prefilled requests waiting for KV space here (FIFO)."""
        self.reserved_tokens = 0
        self.num_admitted = 0
        """Admitted: transferring or running."""
        self.kv_tokens = 0
        """KV tokens of the running batch at the last boundary."""
        self.step = 0
        self.boundary_s = 0.0
        self.version = 0
        """Bumped at every change; a scheduled finish with an older version is stale."""
        self.draining = False

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.num_admitted == 0

    def steps_time(self, k: int) -> float:
        """Seconds for ``k`` steps from the last boundary with the current batch."""
        n, b = len(self.running), self.cost.decode_s_per_kv_token
        a = self.cost.decode_step_overhead_s + self.cost.decode_s_per_seq * n
        return k * a + b * (k * self.kv_tokens + n * k * (k - 1) / 2)

    def steps_within(self, dt: float) -> int:
        """Most whole steps that fit in ``dt`` seconds from the last boundary."""
        n = len(self.running)
        if n == 0 or dt <= 0:
            return 0
        a = self.cost.decode_step_overhead_s + self.cost.decode_s_per_seq * n
        b = self.cost.decode_s_per_kv_token
        qa, qb = b * n / 2, a + b * self.kv_tokens - b * n / 2
        if qa > 0:
            k = int((-qb + math.sqrt(qb * qb + 4 * qa * dt)) / (2 * qa))
        else:
            k = int(dt / qb) if qb > 0 else 0
        while k > 0 and self.steps_time(k) > dt:
            k -= 1
        while self.steps_time(k + 1) <= dt:
            k += 1
        return k

    def advance(self, now: float) -> None:
        """Move the boundary to the last step boundary at or before ``now``."""
        if not self.running:
            self.boundary_s = now
            return
        self._advance_steps(self.steps_within(now - self.boundary_s))

    def _advance_steps(self, k: int) -> None:
        if k <= 0:
            return
        self.boundary_s += self.steps_time(k)
        self.kv_tokens += len(self.running) * k
        for r in self.running.values():
            r.context += k
        self.step += k

    def can_admit(self, tokens: int) -> bool:
        if self.num_admitted >= self.max_batch:
            return False
        # An empty instance admits anything (a prompt larger than its KV would never run).
        return self.num_admitted == 0 or self.reserved_tokens + tokens <= self.capacity_tokens

    def admit(self, tokens: int) -> None:
        self.reserved_tokens += tokens
        self.num_admitted += 1

    def join(self, request_id: str, context: int, reserved: int, steps: int, now: float) -> None:
        """A transferred request joins the batch for ``steps`` more steps (``steps`` >= 1)."""
        self.advance(now)
        self.running[request_id] = Decoding(request_id, context, reserved, self.step + steps)
        self.kv_tokens += context
        heapq.heappush(self._finishes, (self.step + steps, request_id))
        self.version += 1

    def release(self, reserved: int) -> None:
        """A request admitted here left (finished, or finished without decode steps)."""
        self.reserved_tokens -= reserved
        self.num_admitted -= 1

    def next_finish_time(self) -> float | None:
        if not self._finishes:
            return None
        return self.boundary_s + self.steps_time(self._finishes[0][0] - self.step)

    def pop_finished(self) -> list[Decoding]:
        """Advance to the earliest finish step and remove every request finishing there."""
        target = self._finishes[0][0]
        self._advance_steps(target - self.step)
        done = []
        while self._finishes and self._finishes[0][0] <= self.step:
            _, request_id = heapq.heappop(self._finishes)
            decoding = self.running.pop(request_id)
            self.kv_tokens -= decoding.context
            done.append(decoding)
        self.version += 1
        return done
