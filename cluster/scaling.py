"""Scaling and status: growing or shrinking a role, draining a worker, the status report.

Owns `Scaler`: start workers for a larger role, drain (no new placements, wait for its
requests and leases) and stop the surplus of a smaller one, and the status snapshot that
the frontends' health and metrics read. It runs on the cluster's event loop, so its view of
the worker set never races the health loop's replacements; blocking Ray calls go to an
executor. It must not place or stream requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.flights import FlightTable
from splitserve.cluster.launcher import WorkerHandle
from splitserve.cluster.membership import WORKER_LOST, Membership, aref
from splitserve.errors import ConfigError

DRAINED_KEYS = ("num_running", "num_waiting", "num_held_kv", "num_loading_kv")
"""A worker's stats that must all be 0 before a drained worker is stopped."""

logger = logging.getLogger(__name__)


class Scaler:
    """Scales the roles of a `Membership` and reports its status."""

    def __init__(
        self, config: ClusterConfig, membership: Membership, flights: FlightTable,
        counters: collections.Counter[str], model_id: str,
    ) -> None:
        self.config = config
        self.membership = membership
        self.flights = flights
        self.counters = counters
        self.model_id = model_id

    async def scale(self, role: str, n: int, drain_timeout_s: float) -> None:
        """Grow or shrink ``role`` to ``n`` workers; removed workers are drained first."""
        floor, ceiling = self.config.replica_bounds(role)
        if n < floor or (ceiling is not None and n > ceiling):
            raise ConfigError(
                f"roles.{role}: cannot scale to {n}; allowed {floor}..{ceiling or 'unbounded'}"
            )
        live = self.membership.live(role)
        coming = len(live) + self.membership.num_replacing[role]  # replacements count
        if n > coming:
            launcher = self.membership.launcher

            def start() -> list[WorkerHandle]:
                handles = [launcher.start(role) for _ in range(n - coming)]
                launcher.wait_ready(handles)
                return handles

            for handle in await asyncio.get_running_loop().run_in_executor(None, start):
                self.membership.add(handle)
        for victim in live[max(n - self.membership.num_replacing[role], 0):][::-1]:
            await self.drain(victim, drain_timeout_s)

    async def drain(self, handle: WorkerHandle, timeout_s: float) -> None:
        """Stop placing on a worker, wait for its requests and leases, then stop it.

        Only a worker Ray reports gone counts as drained early; one that is slow to answer
        (a long step on a loaded host) is busy, not dead, and is asked again until
        ``timeout_s``."""
        handle.draining = True
        with contextlib.suppress(Exception):
            self.membership.router.set_healthy(handle.worker_id, False)
        with contextlib.suppress(Exception):
            self.membership.registry.set_status(handle.worker_id, "draining")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not await self._drained(handle, deadline):
            await asyncio.sleep(0.1)  # poll interval of the drain, not a synchronisation
        self.membership.mark_dead(handle.worker_id)
        self.membership.workers.pop(handle.worker_id, None)
        launcher = self.membership.launcher
        await asyncio.get_running_loop().run_in_executor(None, launcher.stop, handle)

    async def _drained(self, handle: WorkerHandle, deadline: float) -> bool:
        """Whether the worker has nothing left: no flight on it, its queues and leases
        empty, or it is gone. A stats call that times out or fails says nothing yet."""
        wait = max(min(self.config.registry.heartbeat_timeout_s, deadline - time.monotonic()), 0)
        try:
            stats = await asyncio.wait_for(aref(handle.actor.stats.remote()), wait)
        except WORKER_LOST:
            return True  # dead: nothing left to drain
        except Exception as e:  # noqa: BLE001 - slow or failing: ask again
            self.counters["drain_stats_errors"] += 1
            logger.warning("draining %s: stats failed (%r); asking again", handle.worker_id, e)
            return False
        return not self.flights.busy(handle.worker_id) and all(
            stats.get(k, 0) == 0 for k in DRAINED_KEYS)

    async def status(self) -> dict[str, Any]:
        """Workers (role, health, KV usage, queues) and healthy counts per role."""
        workers = [await self._worker_status(h) for h in list(self.membership.workers.values())]
        roles: dict[str, int] = {}
        for w in workers:
            if w["healthy"] and not w["draining"]:
                roles[w["role"]] = roles.get(w["role"], 0) + 1
        return {"model": self.model_id, "workers": workers, "roles": roles,
                "num_requests": len(self.flights), "policy": self.config.router.policy,
                "layout": layout_status(self.config), "counters": dict(self.counters)}

    async def _worker_status(self, h: WorkerHandle) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if h.healthy:
            with contextlib.suppress(Exception):
                stats = await asyncio.wait_for(aref(h.actor.stats.remote()), 5.0)
        return {
            "worker_id": h.worker_id, "role": h.role, "healthy": h.healthy,
            "draining": h.draining, "kv_address": h.info.get("kv_address", ""),
            "node_id": h.info.get("node_id", ""), "formats": h.info.get("formats", {}),
            **stats,
        }


def merged_formats(handles: list[WorkerHandle]) -> dict[str, Any]:
    """The numeric formats healthy workers reported at start (``LLMEngine.info()``: the dtype
    chosen and why, quantization, weight formats): the values every reporting worker shares
    at the top level, and the ones they differ in (e.g. KV blocks of differently sized
    roles) per worker under ``by_worker``. Empty when no worker reported formats."""
    reports = {h.worker_id: h.info["formats"] for h in handles
               if h.healthy and isinstance(h.info.get("formats"), dict) and h.info["formats"]}
    if not reports:
        return {}
    first = next(iter(reports.values()))
    common = {k: v for k, v in sorted(first.items())
              if all(k in f and f[k] == v for f in reports.values())}
    out: dict[str, Any] = dict(common)
    differing = {wid: {k: v for k, v in f.items() if k not in common}
                 for wid, f in sorted(reports.items())}
    if any(differing.values()):
        out["by_worker"] = {wid: d for wid, d in differing.items() if d}
    return out


def layout_status(config: ClusterConfig) -> dict[str, Any]:
    """How prompts are prefilled: ``colocated`` (decode workers prefill every prompt,
    ``router.local_prefill_max_tokens: all``) or ``disaggregated`` (prefill workers, with
    prompts of at most ``local_prefill_max_tokens`` uncached tokens prefilled on decode)."""
    local = config.router.local_prefill_max_tokens
    if config.colocated:
        return {"mode": "colocated", "local_prefill_max_tokens": local,
                "prefill": "every prompt on its decode worker"}
    return {"mode": "disaggregated", "local_prefill_max_tokens": local,
            "prefill": f"on prefill workers; uncached prompts of <= {local} tokens on decode"}
