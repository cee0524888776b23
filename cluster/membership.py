"""Membership: which workers the cluster has, and keeping that set whole.

Owns the worker handles (`Membership.workers`), their registry records and router instances,
declaring a worker dead and starting its replacement. It must not route or stream requests
(request_path.py) nor poll workers (health.py); everything here runs on the cluster's event
loop, except `attach` and `add` at start, before the loop has anything to do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.launcher import Launcher, WorkerHandle
from splitserve.cluster.process_workers import WorkerProcessLost
from splitserve.cluster.registry import Registry, WorkerRecord
from splitserve.errors import NoHealthyWorkerError
from splitserve.router.router import Router

logger = logging.getLogger(__name__)

WORKER_LOST = (RayActorError, ActorUnavailableError, WorkerProcessLost)
"""What a call to a worker whose process is gone raises (Ray's, or a process worker's)."""


class WorkerLost(Exception):
    """The worker serving a request died; the request is placed again."""


async def aref(ref: Any) -> Any:
    """Await a Ray object ref (so ``asyncio.wait_for`` can time it out)."""
    return await ref


class Membership:
    """The worker set of one `Cluster` handle, kept in step with the router and registry."""

    def __init__(
        self, config: ClusterConfig, router: Router, registry: Registry, launcher: Launcher,
        counters: collections.Counter[str], *, owner: bool,
    ) -> None:
        self.config = config
        self.router = router
        self.registry = registry
        self.launcher = launcher
        self.counters = counters
        self.owner = owner
        """Whether this handle started (and so stops and replaces) the workers."""
        self.workers: dict[str, WorkerHandle] = {}
        self.replacing: set[asyncio.Future[None]] = set()
        """Replacements being started (a request whose role has no worker waits for them)."""
        self.num_replacing: collections.Counter[str] = collections.Counter()
        """Replacements being started per role (scaling counts them as workers to come)."""
        self.closed = False

    # ------------------------------------------------------------------ joining

    def attach(self) -> None:
        """Handles on the workers the registry lists (started by another Cluster handle)."""
        if self.launcher.processes:
            raise NoHealthyWorkerError(
                "runtime: processes: another handle's workers are its own child processes; "
                "only a cluster on Ray (runtime: ray) can be joined")
        records = self.registry.list()
        if not records:
            raise NoHealthyWorkerError(
                f"registry {self.config.registry.url}: no live worker to connect to"
            )
        for record in records:
            actor = ray.get_actor(record.actor_name, namespace=record.namespace)
            handle = WorkerHandle(record.worker_id, record.role, actor, None)
            handle.info = ray.get(actor.info.remote(), timeout=30)
            self._join(handle)

    def add(self, handle: WorkerHandle) -> None:
        """A worker this handle started: place on it and register it."""
        self._join(handle)
        self.register(handle)

    def _join(self, handle: WorkerHandle) -> None:
        self.workers[handle.worker_id] = handle
        fmt = handle.info.get("formats") or {}
        if fmt:
            logger.info("worker %s (%s): dtype %s (%s), quantization %s%s", handle.worker_id,
                        handle.role, fmt.get("dtype"), fmt.get("dtype_reason"),
                        fmt.get("quantization"),
                        f"; {fmt['dtype_warning']}" if fmt.get("dtype_warning") else "")
        self.router.add_instance(handle.worker_id, roles={handle.role},
                                 kv_capacity_blocks=handle.info.get("num_blocks") or None)

    def register(self, handle: WorkerHandle) -> None:
        self.registry.register(WorkerRecord(
            worker_id=handle.worker_id, role=handle.role,
            actor_name=f"splitserve-{handle.worker_id}", namespace=self.config.ray.namespace,
            node_id=str(handle.info.get("node_id") or handle.info.get("host", "")),
            kv_address=handle.info.get("kv_address", ""),
            engine_id=handle.worker_id, status="ready",
        ))

    # ------------------------------------------------------------------ queries

    def live(self, role: str) -> list[WorkerHandle]:
        """Healthy, not draining workers of ``role`` (a snapshot)."""
        return [h for h in list(self.workers.values())
                if h.role == role and h.healthy and not h.draining]

    def healthy_handle(self, worker_id: str) -> WorkerHandle | None:
        handle = self.workers.get(worker_id)
        return handle if handle is not None and handle.healthy else None

    # ------------------------------------------------------------------ death and replacement

    def mark_dead(self, worker_id: str) -> None:
        """Kill and forget a worker; start a replacement when its role asks for one."""
        handle = self.workers.get(worker_id)
        if handle is None or not handle.healthy:
            return
        handle.healthy = False
        with contextlib.suppress(Exception):
            # a half-dead actor must not linger, nor its placement group hold resources
            self.launcher.release(handle)
        with contextlib.suppress(Exception):
            self.router.remove_instance(worker_id)
        with contextlib.suppress(Exception):
            self.registry.deregister(worker_id)
        if self.owner and not self.closed and not handle.draining \
                and self.config.role(handle.role).replace_failed:
            task = asyncio.ensure_future(self._replace(handle))
            self.replacing.add(task)
            self.num_replacing[handle.role] += 1
            task.add_done_callback(self.replacing.discard)
            task.add_done_callback(lambda _: self.num_replacing.subtract([handle.role]))

    def retire_unhealthy(self, worker_id: str, error: str) -> None:
        """A worker whose engine reports itself unhealthy: counted, then treated as dead."""
        handle = self.healthy_handle(worker_id)
        if handle is None:
            return
        logger.error("worker %s reports its engine unhealthy: %s", worker_id, error)
        self.counters["workers_unhealthy"] += 1
        self.mark_dead(worker_id)

    async def _replace(self, dead: WorkerHandle) -> None:
        """Start a new worker for one that died, so the role keeps its replica count; the
        dead worker's handle leaves the worker set once its successor joined (until then
        the status shows it unhealthy)."""
        started = time.monotonic()
        try:
            handle = await asyncio.get_running_loop().run_in_executor(
                None, self.start_ready, dead.role)
        except Exception:  # noqa: BLE001 - e.g. no resources left: serve with fewer workers
            logger.exception("could not replace %s worker %s", dead.role, dead.worker_id)
            return
        if self.closed:
            self.launcher.stop(handle)
            return
        self.add(handle)
        self._forget(dead)  # its successor stands in for it now
        self.counters["workers_replaced"] += 1
        logger.warning("replaced dead %s worker %s by %s in %.1f s", dead.role, dead.worker_id,
                       handle.worker_id, time.monotonic() - started)

    def _forget(self, dead: WorkerHandle) -> None:
        """Drop a dead worker's handle (unless a new handle already took its id)."""
        worker_id = dead.worker_id
        if self.workers.get(worker_id) is dead:
            del self.workers[worker_id]

    def start_ready(self, role: str) -> WorkerHandle:
        """Start one worker of ``role`` and wait until it is ready (blocking; run off-loop)."""
        handle = self.launcher.start(role)
        try:
            self.launcher.wait_ready([handle])
        except BaseException:
            self.launcher.stop(handle)
            raise
        return handle

    # ------------------------------------------------------------------ stop

    def stop_all(self) -> None:
        """Stop the workers this handle started (an attached handle leaves them running)."""
        for handle in list(self.workers.values()):
            if self.owner:
                self.launcher.stop(handle)
                with contextlib.suppress(Exception):
                    self.registry.deregister(handle.worker_id)
        self.workers.clear()
