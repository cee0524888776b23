"""KV sync: one router's copy of each worker's prefix cache, fed from the workers' event logs.

Owns this `Cluster` handle's cursor into every worker's `KVEventLog` (roles/engine/kv_events.py):
it reads from the cursor, applies the events to the router's prefix index, and advances the
cursor only once they are applied, so a lost or timed-out reply is read again and another
handle's reads take nothing away. A gap (the log overflowed past the cursor, or the worker
restarted with a new epoch) comes back as a snapshot, which replaces the worker's entries;
each is counted (``kv_resync:<reason>``, exported as ``kv_event_resyncs_total``). It must
not decide placements nor poll anything but the event logs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from typing import Any

from splitserve.cluster.launcher import WorkerHandle
from splitserve.cluster.membership import aref
from splitserve.router.router import Router

logger = logging.getLogger(__name__)

MAX_EVENTS_PER_READ = 10_000
MAX_READS_PER_SYNC = 8
"""A worker far behind is caught up over several health ticks, not in one long burst."""


@dataclasses.dataclass
class Cursor:
    """Where this handle is in one worker's event log."""

    epoch: str | None = None
    """The log's epoch (None: never read; the first read is a snapshot)."""
    next_seq: int = 0


class KvSync:
    """Per-worker cursors of one router; ``sync`` runs on the cluster's event loop."""

    def __init__(self, router: Router, counters: collections.Counter[str]) -> None:
        self.router = router
        self.counters = counters
        self.cursors: dict[str, Cursor] = {}

    async def sync(self, handle: WorkerHandle, timeout_s: float) -> None:
        """Read and apply ``handle``'s new events (raises what the call raises, e.g. a
        timeout: the cursor then stays, and the next sync reads the same events again)."""
        cursor = self.cursors.setdefault(handle.worker_id, Cursor())
        for _ in range(MAX_READS_PER_SYNC):
            ref = handle.actor.kv_events.remote(cursor.epoch, cursor.next_seq,
                                                MAX_EVENTS_PER_READ)
            batch = await asyncio.wait_for(aref(ref), timeout_s)
            self._apply(handle.worker_id, cursor, batch)
            if len(batch["events"]) < MAX_EVENTS_PER_READ:
                return

    def forget(self, live: set[str]) -> None:
        """Drop the cursors of workers that left."""
        for worker_id in set(self.cursors) - live:
            del self.cursors[worker_id]

    def _apply(self, worker_id: str, cursor: Cursor, batch: dict[str, Any]) -> None:
        if batch["snapshot"] is not None:
            if cursor.epoch is not None:
                reason = "overflow" if batch["epoch"] == cursor.epoch else "restart"
                self.counters[f"kv_resync:{reason}"] += 1
                logger.warning("KV events of %s had a gap (%s): resynced from a snapshot",
                               worker_id, reason)
            self.router.on_kv_snapshot(worker_id, batch["snapshot"])
        for kind, hashes in batch["events"]:
            if kind == "stored":
                self.router.on_kv_stored(worker_id, hashes)
            else:
                self.router.on_kv_removed(worker_id, hashes)
        cursor.epoch, cursor.next_seq = batch["epoch"], batch["next_seq"]
