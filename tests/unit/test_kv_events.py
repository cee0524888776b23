"""KV events as a sequence-numbered log read through cursors; gaps resync from a snapshot.

Drives a real BlockPool (random allocate / cache / free / evict) and real Routers; the only
stand-in is the Ray actor call (a coroutine over the same log), so that a reply can be lost
after the worker answered: the fault the old take-and-empty queue turned into lost events.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from splitserve.cluster.kv_sync import KvSync
from splitserve.roles.engine.block_pool import BlockPool
from splitserve.roles.engine.kv_events import KVEventLog
from splitserve.router.router import Router
from splitserve.router.schema import RouterConfig


def _churn(pool: BlockPool, rng: random.Random, steps: int) -> None:
    """Allocate, cache under fresh or repeated hashes, and free blocks at random."""
    held = []
    for _ in range(steps):
        if held and rng.random() < 0.45:
            pool.free_blocks([held.pop(rng.randrange(len(held)))])
            continue
        blocks = pool.get_new_blocks(1)
        if blocks is None:
            continue
        pool.cache_block(blocks[0], rng.randrange(200))
        held.append(blocks[0])
    pool.free_blocks(held)


def _replay(log: KVEventLog, cursor: tuple[str | None, int], view: set[int]) -> tuple[str, int]:
    batch = log.read(*cursor)
    if batch.snapshot is not None:
        view.clear()
        view.update(batch.snapshot)
    for kind, hashes in batch.events:
        (view.update if kind == "stored" else view.difference_update)(hashes)
    return batch.epoch, batch.next_seq


def test_sequence_numbers_and_independent_cursors() -> None:
    log = KVEventLog(capacity=10, epoch="e")
    for h in range(4):
        log.append("stored", (h,))
    a = log.read("e", 0)
    b = log.read("e", 2)
    assert a.events == tuple(("stored", (h,)) for h in range(4)) and a.next_seq == 4
    assert b.events == (("stored", (2,)), ("stored", (3,))) and b.next_seq == 4
    assert log.read("e", 0).events == a.events  # reading consumed nothing
    assert log.read("e", 4).events == () and log.num_snapshots == 0


def test_new_stale_or_overflowed_cursor_gets_a_snapshot() -> None:
    log = KVEventLog(capacity=3, epoch="e")
    log.bind_snapshot(lambda: (7, 8))
    for h in range(5):
        log.append("stored", (h,))
    assert log.first_seq == 2
    for epoch, since in ((None, 0), ("other", 3), ("e", 1), ("e", 6)):
        batch = log.read(epoch, since)
        assert batch.snapshot == (7, 8) and batch.events == () and batch.next_seq == 5
    assert log.num_snapshots == 4
    assert log.read("e", 2).snapshot is None


@pytest.mark.parametrize("seed", range(5))
def test_readers_at_any_pace_rebuild_the_pool_exactly(seed: int) -> None:
    rng = random.Random(seed)
    pool = BlockPool(16)
    pool.events = KVEventLog(capacity=20)
    pool.events.bind_snapshot(pool.cached_hashes)
    fast: tuple[str | None, int] = (None, 0)
    slow: tuple[str | None, int] = (None, 0)
    fast_view: set[int] = set()
    slow_view: set[int] = set()
    for round_ in range(30):
        _churn(pool, rng, rng.randrange(1, 15))
        fast = _replay(pool.events, fast, fast_view)
        if round_ % 7 == 6:  # the slow reader falls out of the 20-event log
            slow = _replay(pool.events, slow, slow_view)
        assert fast_view == set(pool.cached_hashes())
    slow = _replay(pool.events, slow, slow_view)
    assert slow_view == fast_view == set(pool.cached_hashes())
    assert pool.events.num_snapshots > 2  # both first reads, then the slow reader's gaps


def test_snapshot_while_the_engine_thread_writes() -> None:
    """A snapshot taken while another thread churns, then the events after its seq, equal
    the pool's final state (set operations: what the snapshot already shows is harmless)."""
    pool = BlockPool(64)
    stop = threading.Event()

    def engine() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            _churn(pool, rng, 50)

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        views = []
        for _ in range(20):
            view: set[int] = set()
            views.append((view, _replay(pool.events, (None, 0), view)))
    finally:
        stop.set()
        thread.join()
    for view, cursor in views:
        _replay(pool.events, cursor, view)
        assert view == set(pool.cached_hashes())


class _Worker:
    """The actor call over a real log; ``lose_next`` drops one reply after the worker
    answered it (what a health-loop timeout did to the old take-and-empty queue)."""

    def __init__(self, log: KVEventLog) -> None:
        self.log = log
        self.lose_next = False
        self.kv_events = SimpleNamespace(remote=self._remote)

    async def _remote(self, epoch: str | None, since: int, max_events: int) -> dict[str, Any]:
        reply = self.log.read(epoch, since, max_events).to_wire()
        if self.lose_next:
            self.lose_next = False
            raise TimeoutError
        return reply


def _router() -> Router:
    router = Router("dualmap", RouterConfig(block_size=4))
    router.add_instance("w", roles={"prefill", "decode"})
    return router


def test_two_routers_lose_nothing_to_timeouts_and_resync_after_overflow() -> None:
    pool = BlockPool(32)
    pool.events = KVEventLog(capacity=40)
    pool.events.bind_snapshot(pool.cached_hashes)
    worker = _Worker(pool.events)
    handle = SimpleNamespace(worker_id="w", actor=worker)
    counters: list[collections.Counter[str]] = [collections.Counter(), collections.Counter()]
    routers = [_router(), _router()]
    syncs = [KvSync(r, c) for r, c in zip(routers, counters, strict=True)]
    rng = random.Random(3)

    async def run() -> None:
        for round_ in range(40):
            _churn(pool, rng, rng.randrange(1, 12))
            if round_ == 10:
                worker.lose_next = True
                with pytest.raises(TimeoutError):
                    await syncs[0].sync(handle, 1.0)  # the worker answered; the reply was lost
            await syncs[0].sync(handle, 1.0)
            if round_ % 13 == 12:  # the second handle lags far behind: its cursor overflows
                await syncs[1].sync(handle, 1.0)
        await syncs[1].sync(handle, 1.0)

    asyncio.run(run())
    want = set(pool.cached_hashes())
    assert routers[0].index.blocks_of("w") == routers[1].index.blocks_of("w") == want
    assert counters[0]["kv_resync:overflow"] == 0  # the lost reply was read again
    assert counters[1]["kv_resync:overflow"] >= 1


def test_a_restarted_worker_resyncs_as_restart() -> None:
    router, counters = _router(), collections.Counter[str]()
    sync = KvSync(router, counters)
    first = KVEventLog(epoch="one")
    first.bind_snapshot(lambda: (1,))
    handle = SimpleNamespace(worker_id="w", actor=_Worker(first))
    asyncio.run(sync.sync(handle, 1.0))  # a new cursor starts from a snapshot: not a gap
    first.append("stored", (2,))
    asyncio.run(sync.sync(handle, 1.0))
    assert router.index.blocks_of("w") == {1, 2}
    second = KVEventLog(epoch="two")  # same actor, new process: the cache is empty
    second.bind_snapshot(lambda: (5,))
    handle.actor = _Worker(second)
    asyncio.run(sync.sync(handle, 1.0))
    assert router.index.blocks_of("w") == {5}
    assert counters == {"kv_resync:restart": 1}
