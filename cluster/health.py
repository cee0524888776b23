"""Health: the loop that polls every worker, heartbeats it and feeds the router.

Owns the health loop: each interval it asks every healthy worker for its stats, reads its KV
events (kv_sync.py), feeds the router its KV usage, refreshes the registry record, and suspects
or declares dead a worker that stops answering or reports its engine unhealthy. The loop never
ends while the cluster runs: a failure in one iteration is logged and counted
(``health_errors``) and the next iteration runs. It must not start or stop workers itself
(membership.py does) nor touch requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.kv_sync import KvSync
from splitserve.cluster.launcher import WorkerHandle
from splitserve.cluster.membership import WORKER_LOST, Membership, aref
from splitserve.cluster.registry import UnknownWorkerError

logger = logging.getLogger(__name__)


class HealthMonitor:
    """Polls the workers of a `Membership` from the cluster's event loop."""

    def __init__(self, config: ClusterConfig, membership: Membership) -> None:
        self.config = config
        self.membership = membership
        self.router = membership.router
        self.registry = membership.registry
        self.counters = membership.counters
        self.kv = KvSync(self.router, self.counters)

    async def run(self) -> None:
        """The health loop (runs until cancelled; nothing else ends it)."""
        interval = self.config.registry.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            await self.tick()

    async def tick(self) -> None:
        """One iteration over every healthy worker; one worker's failure spares the others."""
        for handle in list(self.membership.workers.values()):
            if not handle.healthy:
                continue
            try:
                await self.check(handle)
            except Exception:  # noqa: BLE001 - counted and logged; the loop must go on
                self.counters["health_errors"] += 1
                logger.exception("health check of %s failed", handle.worker_id)
        self.kv.forget(set(self.membership.workers))

    async def check(self, handle: WorkerHandle) -> None:
        """One worker: stats and KV events in, router and registry updated."""
        timeout = self.config.registry.heartbeat_timeout_s
        try:
            stats = await asyncio.wait_for(aref(handle.actor.stats.remote()), timeout)
            await self.kv.sync(handle, timeout)
        except WORKER_LOST:
            self.membership.mark_dead(handle.worker_id)
            return
        except TimeoutError:
            self._suspect(handle)
            return
        if handle.suspect_since is not None:  # busy, not dead: place on it again
            handle.suspect_since = None
            with contextlib.suppress(Exception):
                self.router.set_healthy(handle.worker_id, not handle.draining)
        if stats.get("healthy", True) is False:  # the engine itself failed: replace the worker
            self.membership.retire_unhealthy(handle.worker_id, str(stats.get("error", "")))
            return
        handle.info["stats"] = stats
        if "num_blocks" in stats:
            used = int(stats["num_blocks"] - stats["num_free_blocks"])
            self.router.report_kv_usage(handle.worker_id, used)
        self._heartbeat(handle, stats)

    def _heartbeat(self, handle: WorkerHandle, stats: dict[str, Any]) -> None:
        """Refresh the worker's registry record; re-register it if the registry dropped it."""
        load = {"num_waiting": int(stats.get("num_waiting", 0)),
                "num_running": int(stats.get("num_running", 0)),
                "kv_usage": float(stats.get("kv_usage", 0.0)),
                "num_free_blocks": int(stats.get("num_free_blocks", 0))}
        try:
            self.registry.heartbeat(handle.worker_id, **load)
        except UnknownWorkerError:
            self.membership.register(handle)
        except Exception:  # noqa: BLE001 - a registry hiccup must not stop the health loop
            logger.exception("registry heartbeat failed for %s", handle.worker_id)

    def _suspect(self, handle: WorkerHandle) -> None:
        """A missed heartbeat: no new placements; dead after three timeouts in a row.

        A worker busy with a long step can miss one; a dead process is usually reported by
        Ray at once (RayActorError), so this only catches hangs.
        """
        now = time.monotonic()
        if handle.suspect_since is None:
            logger.warning("worker %s missed its heartbeat", handle.worker_id)
            handle.suspect_since = now
            with contextlib.suppress(Exception):
                self.router.set_healthy(handle.worker_id, False)
        elif now - handle.suspect_since > 3 * self.config.registry.heartbeat_timeout_s:
            logger.error("worker %s unresponsive: declared dead", handle.worker_id)
            self.membership.mark_dead(handle.worker_id)
