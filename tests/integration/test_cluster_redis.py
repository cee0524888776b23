"""Two Cluster handles on one Redis registry and one Ray cluster see the same workers, and
their routers keep the same prefix index (each reads the workers' KV event logs from its own
cursor)."""

from __future__ import annotations

import functools
import random
import threading

import pytest

from splitserve import LLM, Cluster, ClusterConfig, SamplingParams
from splitserve.cluster import kv_sync
from tests.integration.test_registry import running_redis
from tests.utils import assert_workers_intact, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.ucx, pytest.mark.redis]


def test_second_handle_sees_and_uses_the_same_workers(tiny_model_dir) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [list(range(100, 140)), list(range(7, 90))]
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_model_dir)).generate(prompts, params)]
    with running_redis() as (url, _):
        config = ClusterConfig.local(
            prefill=1, decode=1, model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20,
            registry={"url": url, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0},
            router={"local_prefill_max_tokens": 0},
        )
        with Cluster(config) as first:
            second = Cluster.connect(config)
            try:
                ids = lambda c: sorted(w["worker_id"] for w in c.status()["workers"])  # noqa: E731
                assert ids(second) == ids(first) and len(ids(first)) == 2
                got = [o.outputs[0].token_ids for o in second.generate(prompts, params)]
                assert got == want
            finally:
                second.shutdown()
            # closing the second handle left the workers serving the first
            assert [o.outputs[0].token_ids for o in first.generate(prompts, params)] == want
            assert len(first.registry.list()) == 2
            assert_workers_intact(h for h in first.workers.values() if h.healthy)
        memory = ClusterConfig.local(model=str(tiny_model_dir))
        with pytest.raises(Exception, match="registry"):
            Cluster.connect(memory)


def test_two_handles_keep_identical_prefix_indexes(tiny_model_dir, monkeypatch) -> None:
    """200 requests through two handles on the same workers, one handle's KV reads lagging
    far behind (its cursor falls out of the 128-event log: a resync) and one reply lost after
    the worker answered it (read again from the same cursor): both routers end with the
    workers' exact cached hashes."""
    # the actors inherit it. The 200 requests log ~240 events per worker (~12 a batch of 10):
    # the lagging handle overflows 128, and the first handle, reading every 0.2 s, has ~10
    # batches of margin (with 64 a stalled cluster loop at a cold start overflowed it once)
    monkeypatch.setenv("SPLITSERVE_KV_EVENT_LOG_SIZE", "128")
    lost = threading.Event()
    original_aref = kv_sync.aref

    async def lossy_aref(ref):  # the worker answers; the reply never arrives
        reply = await original_aref(ref)
        if lost.is_set():
            lost.clear()
            raise TimeoutError
        return reply

    monkeypatch.setattr(kv_sync, "aref", lossy_aref)
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 49000) for _ in range(48)] for _ in range(20)]
    prompts = [rng.choice(prefixes) + [rng.randrange(3, 49000) for _ in range(rng.randint(1, 40))]
               for _ in range(200)]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    with running_redis() as (url, _):
        config = ClusterConfig.local(
            prefill=1, decode=1, model=str(tiny_model_dir), kv_cache_memory_bytes=8 << 20,
            registry={"url": url, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 5.0},
            router={"local_prefill_max_tokens": 0},
        )
        with Cluster(config) as first:
            second = Cluster.connect(config)
            try:
                lagging = _lag(second)
                _wait(lambda: _caught_up(second, {w: (0, ()) for w in first.workers}, exact=False),
                      "the second handle's first read of every worker")
                for i in range(0, 200, 10):
                    handle = first if i % 20 == 0 else second
                    if i == 100:  # the first handle has read everything before this batch
                        _wait(lambda: _caught_up(first, _now(first)), "the first handle")
                        overflows = first.counters["kv_resync:overflow"]
                    handle.generate(prompts[i:i + 10], params)
                    if i == 100:  # its next reply (this batch's events) is lost
                        lost.set()
                        _wait(lambda: not lost.is_set() and all(
                            h.suspect_since is None for h in first.workers.values()),
                            "the lost reply, then the next heartbeat")
                        _wait(lambda: _caught_up(first, _now(first)), "the re-read")
                        # read again from the same cursor, not resynced from a snapshot
                        assert first.counters["kv_resync:overflow"] == overflows
                lagging.set()
                truth = _now(first)
                for handle in (first, second):
                    _wait(lambda h=handle: _caught_up(h, truth), "both handles to catch up")
                for worker_id, (_, hashes) in truth.items():
                    assert hashes, "the workers cached nothing: the test would prove nothing"
                    assert _index(first, worker_id) == _index(second, worker_id) == hashes
                seqs = {w: seq for w, (seq, _) in truth.items()}
                assert second.counters["kv_resync:overflow"] >= 1, (seqs, second.counters)
            finally:
                second.shutdown()
            assert_workers_intact(h for h in first.workers.values() if h.healthy)


def _lag(cluster: Cluster) -> threading.Event:
    """Hold back ``cluster``'s KV reads after its first one of each worker (which starts its
    cursor) until the returned event is set."""
    go = threading.Event()
    sync = cluster.health.kv.sync

    async def lagging(handle, timeout_s):
        if go.is_set() or handle.worker_id not in cluster.health.kv.cursors:
            await sync(handle, timeout_s)

    cluster.health.kv.sync = lagging  # type: ignore[method-assign]
    return go


def _cached(handle) -> tuple[int, frozenset[int]]:
    """A worker's event-log position and exact cached hashes (from a fresh snapshot)."""
    import ray

    batch = ray.get(handle.actor.kv_events.remote(None, 0))
    return batch["next_seq"], frozenset(batch["snapshot"])


def _now(cluster: Cluster) -> dict[str, tuple[int, frozenset[int]]]:
    return {w: _cached(h) for w, h in cluster.workers.items()}


def _caught_up(cluster: Cluster, truth: dict, exact: bool = True) -> bool:
    """Whether ``cluster`` has read every worker's log up to ``truth``'s positions."""
    cursors = cluster.health.kv.cursors
    return all(w in cursors and (cursors[w].next_seq == seq or not exact)
               for w, (seq, _) in truth.items())


def _index(cluster: Cluster, worker_id: str) -> frozenset[int]:
    async def read() -> frozenset[int]:
        return cluster.router.index.blocks_of(worker_id)

    return cluster.run_on_loop(read())


_wait = functools.partial(wait_until, poll_s=0.05)
