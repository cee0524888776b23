"""KVEventLog: one worker's prefix-cache changes as a sequence-numbered, bounded log.

Owns the events the block pool emits (a block hash cached or evicted), each with a sequence
number, and the log's epoch (random per process, so a restarted worker is told apart). Readers
never consume: each keeps its own cursor (the next sequence number it wants) and reads from
there, so several routers (one per `Cluster` handle) see every event, and a reply lost on the
way (a timeout) is simply read again. When a reader's cursor has fallen out of the bounded log,
or names another epoch, it gets a full snapshot of the cached hashes instead (a resync).

Written by the engine thread, read from the worker's actor thread: every method takes the
lock. It must not interpret events (the router's prefix index does). Torch-free.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable, Iterable

from splitserve import env

Event = tuple[str, tuple[int, ...]]
"""(kind, block hashes): kind is "stored" or "removed"."""


@dataclasses.dataclass(frozen=True)
class KVEventBatch:
    """What one read returns: the events from the reader's cursor, or a snapshot."""

    epoch: str
    """The log's epoch; a reader keeps it with its cursor."""
    next_seq: int
    """The reader's new cursor: the sequence number of the first event not included."""
    events: tuple[Event, ...] = ()
    """Events ``next_seq - len(events)`` .. ``next_seq - 1``, in order."""
    snapshot: tuple[int, ...] | None = None
    """Set on a resync: every cached block hash; the reader replaces its view with it and then
    applies events from ``next_seq`` (set operations, so an event already reflected in the
    snapshot is harmless)."""

    def to_wire(self) -> dict[str, object]:
        """A plain dict for a Ray reply."""
        return {"epoch": self.epoch, "next_seq": self.next_seq, "events": list(self.events),
                "snapshot": None if self.snapshot is None else list(self.snapshot)}


class KVEventLog:
    """Bounded log of KV events; ``read(epoch, since)`` from any cursor, snapshot on a gap."""

    def __init__(self, capacity: int | None = None, epoch: str | None = None) -> None:
        self.capacity = capacity if capacity is not None else env.SPLITSERVE_KV_EVENT_LOG_SIZE.get()
        if self.capacity < 1:
            raise ValueError(f"KV event log capacity must be >= 1, got {self.capacity}")
        self.epoch = epoch or os.urandom(8).hex()
        self._events: collections.deque[Event] = collections.deque(maxlen=self.capacity)
        self._next_seq = 0
        self._lock = threading.Lock()
        self._snapshot: Callable[[], Iterable[int]] = tuple
        self.num_snapshots = 0
        """Resyncs served (a reader's cursor had fallen out of the log or was stale)."""

    def bind_snapshot(self, snapshot: Callable[[], Iterable[int]]) -> None:
        """Set where a resync's full set of cached hashes comes from (the block pool)."""
        self._snapshot = snapshot

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq

    @property
    def first_seq(self) -> int:
        """Oldest sequence number still in the log."""
        with self._lock:
            return self._next_seq - len(self._events)

    def append(self, kind: str, block_hashes: tuple[int, ...]) -> None:
        """One change, recorded after the block pool made it (a snapshot relies on that)."""
        with self._lock:
            self._events.append((kind, block_hashes))
            self._next_seq += 1

    def read(self, epoch: str | None, since: int, max_events: int = 10_000) -> KVEventBatch:
        """Events from ``since`` (at most ``max_events``), or a snapshot when the reader is
        new (``epoch`` None), from another epoch, or fell out of the log."""
        with self._lock:
            first = self._next_seq - len(self._events)
            if epoch == self.epoch and first <= since <= self._next_seq:
                start = since - first
                stop = min(len(self._events), start + max_events)
                events = tuple(self._events[i] for i in range(start, stop))
                return KVEventBatch(self.epoch, since + len(events), events)
            seq = self._next_seq  # read before the copy: later changes are replayed from seq
            self.num_snapshots += 1
        return KVEventBatch(self.epoch, seq, snapshot=tuple(self._copy_snapshot()))

    def _copy_snapshot(self) -> tuple[int, ...]:
        """The cached hashes; the engine thread may change them meanwhile, so retry a copy
        that saw the dict change size (everything changed after ``seq`` is replayed anyway)."""
        for _ in range(100):
            try:
                return tuple(self._snapshot())
            except RuntimeError:
                continue
        raise RuntimeError("could not snapshot the prefix cache: it kept changing")
