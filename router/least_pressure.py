"""A lazy min-heap over decode instances keyed by KV pressure, for O(log N) decode picks.

Owns: the order of healthy decode instances by (KV pressure, running requests, join
order). Must not: read or change loads except through the key function it is given;
the router calls ``touch`` whenever an instance's load changes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

Key = tuple[float, int]


class LeastPressure:
    """Healthy instances ordered by ``key(instance_id)``; stale heap entries are skipped lazily."""

    def __init__(self, key: Callable[[str], Key]) -> None:
        self._key = key
        self._heap: list[tuple[float, int, int, str]] = []
        self._current: dict[str, tuple[float, int, int, str]] = {}
        self._join_order: dict[str, int] = {}
        self._joins = itertools.count()

    def __len__(self) -> int:
        return len(self._current)

    def add(self, instance_id: str) -> None:
        self._join_order.setdefault(instance_id, next(self._joins))
        self._current[instance_id] = ()  # type: ignore[assignment]  # replaced by touch
        self.touch(instance_id)

    def remove(self, instance_id: str) -> None:
        self._current.pop(instance_id, None)

    def touch(self, instance_id: str) -> None:
        """Re-key an instance after its load changed (no-op for instances not held)."""
        if instance_id not in self._current:
            return
        pressure, running = self._key(instance_id)
        entry = (pressure, running, self._join_order[instance_id], instance_id)
        self._current[instance_id] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._current) + 64:
            self._heap = list(self._current.values())
            heapq.heapify(self._heap)

    def least(self) -> str:
        """The instance with the lowest key; ``LookupError`` when none is held."""
        while self._heap:
            entry = self._heap[0]
            if self._current.get(entry[3]) == entry:
                return entry[3]
            heapq.heappop(self._heap)
        raise LookupError("no instance to choose from")
