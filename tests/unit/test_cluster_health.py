"""The health loop survives any one iteration's failure, and replaces an unhealthy engine.

Real HealthMonitor, Membership, Router, in-memory Registry and KV event log; the worker actor
is a stand-in because the faults here (stats() raising in the driver, an engine reporting
itself unhealthy) are injected.
"""

from __future__ import annotations

import asyncio
import collections
from types import SimpleNamespace
from typing import Any

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.health import HealthMonitor
from splitserve.cluster.launcher import WorkerHandle
from splitserve.cluster.membership import Membership
from splitserve.cluster.registry import create_registry
from splitserve.roles.engine.kv_events import KVEventLog
from splitserve.router.router import Router
from splitserve.router.schema import RouterConfig

STATS = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "num_free_blocks": 8,
         "num_blocks": 8}


class _Actor:
    """Answers like a worker; ``stats`` raises ``failures`` times first (a bug in the
    driver-side call), then returns ``stats``."""

    def __init__(self, failures: int = 0, stats: dict[str, Any] | None = None) -> None:
        self.failures = failures
        self.stats_calls = 0
        self.stats_reply = stats or STATS
        self.log = KVEventLog(epoch="e")
        self.log.bind_snapshot(lambda: (42,))
        self.stats = SimpleNamespace(remote=self._stats)
        self.kv_events = SimpleNamespace(remote=self._kv_events)

    def _stats(self) -> Any:
        self.stats_calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("injected failure in stats()")
        return _value(dict(self.stats_reply))

    def _kv_events(self, epoch: str | None, since: int, max_events: int) -> Any:
        return _value(self.log.read(epoch, since, max_events).to_wire())


async def _value(v: Any) -> Any:
    return v


class _Launcher:
    """Records replacement starts (no Ray here)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, role: str) -> WorkerHandle:
        self.started.append(role)
        return WorkerHandle(f"{role}-new", role, _Actor(), None)

    def wait_ready(self, handles: list[WorkerHandle]) -> None:
        pass

    def stop(self, handle: WorkerHandle) -> None:
        pass


def _monitor(*actors: _Actor) -> tuple[HealthMonitor, Membership, _Launcher]:
    config = ClusterConfig.local(registry={"heartbeat_interval_s": 0.01,
                                           "heartbeat_timeout_s": 5.0})
    router = Router("dualmap", RouterConfig(block_size=16))
    registry = create_registry("memory", 5.0)
    launcher = _Launcher()
    membership = Membership(config, router, registry, launcher,  # type: ignore[arg-type]
                            collections.Counter(), owner=True)
    for i, actor in enumerate(actors):
        membership.add(WorkerHandle(f"decode-{i}", "decode", actor, None, {"num_blocks": 8}))
    return HealthMonitor(config, membership), membership, launcher


async def _until(condition: Any, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_the_loop_survives_stats_failures_and_counts_them() -> None:
    flaky, steady = _Actor(failures=3), _Actor()
    health, membership, _ = _monitor(flaky, steady)

    async def run() -> None:
        loop = asyncio.ensure_future(health.run())
        try:
            await _until(lambda: flaky.stats_calls >= 6)
            assert not loop.done()  # still running after three failures
        finally:
            loop.cancel()

    asyncio.run(run())
    assert membership.counters["health_errors"] == 3
    assert steady.stats_calls >= flaky.stats_calls - 1  # the other was checked every tick too
    assert all(h.healthy for h in membership.workers.values())
    # after the failures, the flaky worker is fed to the router again
    assert health.router.index.blocks_of("decode-0") == {42}


def test_no_ray_is_started_here() -> None:
    import ray

    assert not ray.is_initialized()  # a unit test must not leave a Ray behind for others


def test_an_unhealthy_engine_gets_its_worker_replaced() -> None:
    sick = _Actor(stats={**STATS, "healthy": False, "error": "engine step kept failing"})
    health, membership, launcher = _monitor(sick)

    async def run() -> None:
        await health.tick()
        await _until(lambda: not membership.replacing)

    dead = membership.workers["decode-0"]
    asyncio.run(run())
    assert not dead.healthy and "decode-0" not in membership.workers  # replaced: gone
    assert launcher.started == ["decode"]
    assert membership.workers["decode-new"].healthy
    assert membership.counters["workers_unhealthy"] == 1
    assert membership.counters["workers_replaced"] == 1
    assert health.router.instances("decode") == ["decode-new"]
    test_no_ray_is_started_here()
