"""Consistent-hash rings with virtual nodes, and DualMap's pair of independent rings.

Owns: the mapping of a 64-bit routing key to instances, stable across processes
(seeded xxhash, never Python's ``hash()``). Must not: look at load or cache
state; that is the policies' business.

Each instance owns ``virtual_nodes`` points on a ring of 2**64 positions; a key
belongs to the first point clockwise from the key's position. Adding or removing
one of N instances moves only the keys between its points and their
predecessors: about 1/N of them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import xxhash

RING_SEEDS: tuple[int, int] = (0xD0A1_0001, 0x5EC0_0002)
"""Seeds of DualMap's two rings. Different seeds make the two hash functions independent."""


def _position(data: bytes, seed: int) -> int:
    return xxhash.xxh64_intdigest(data, seed=seed)


class HashRing:
    """One consistent-hash ring. Mutated only by ``add`` and ``remove``."""

    def __init__(self, seed: int, virtual_nodes: int = 160, instances: Iterable[str] = ()) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.seed = seed
        self.virtual_nodes = virtual_nodes
        self._points: list[int] = []  # sorted ring positions
        self._owners: list[str] = []  # owner of the point at the same index
        self._members: set[str] = set()
        for instance_id in instances:
            self.add(instance_id)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._members

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def points_of(self, instance_id: str) -> list[int]:
        """Ring positions of an instance's virtual nodes (a pure function of id and seed)."""
        return [
            _position(f"{instance_id}#{v}".encode(), self.seed) for v in range(self.virtual_nodes)
        ]

    def add(self, instance_id: str) -> None:
        """Put an instance's virtual nodes on the ring; adding a member again is an error."""
        if instance_id in self._members:
            raise ValueError(f"instance {instance_id!r} is already on the ring")
        self._members.add(instance_id)
        for point in self.points_of(instance_id):
            i = bisect.bisect_left(self._points, point)
            # 64-bit collisions are astronomically rare; order them by owner so the
            # ring stays a pure function of its member set.
            while (
                i < len(self._points) and self._points[i] == point and self._owners[i] < instance_id
            ):
                i += 1
            self._points.insert(i, point)
            self._owners.insert(i, instance_id)

    def remove(self, instance_id: str) -> None:
        """Take an instance's virtual nodes off the ring; removing a non-member is an error."""
        if instance_id not in self._members:
            raise ValueError(f"instance {instance_id!r} is not on the ring")
        self._members.discard(instance_id)
        keep = [i for i, owner in enumerate(self._owners) if owner != instance_id]
        self._points = [self._points[i] for i in keep]
        self._owners = [self._owners[i] for i in keep]

    def key_position(self, key: int) -> int:
        """Where a routing key lands on this ring."""
        return _position((key & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"), self.seed)

    def lookup(self, key: int) -> str:
        """The instance owning ``key``; raises ``LookupError`` on an empty ring."""
        return self._owners[self._index(key)]

    def walk(self, key: int) -> Iterable[str]:
        """Distinct owners clockwise from ``key``: the owner first, then the successors."""
        if not self._points:
            return
        start = self._index(key)
        seen: set[str] = set()
        n = len(self._points)
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._members):
                    return

    def _index(self, key: int) -> int:
        if not self._points:
            raise LookupError("the hash ring has no instances")
        i = bisect.bisect_right(self._points, self.key_position(key))
        return i % len(self._points)


class DualHashRing:
    """DualMap's two rings over the same members, with independent seeds.

    ``candidates(key)`` gives the owner on ring 0 and the owner on ring 1. When
    both rings pick the same instance (probability about 1/N), the second
    candidate is the next distinct instance clockwise on ring 1, so a request
    always has two choices while two instances exist.
    """

    def __init__(
        self,
        virtual_nodes: int = 160,
        instances: Iterable[str] = (),
        seeds: tuple[int, int] = RING_SEEDS,
    ) -> None:
        if seeds[0] == seeds[1]:
            raise ValueError("the two rings need different seeds to hash independently")
        self.rings = (HashRing(seeds[0], virtual_nodes), HashRing(seeds[1], virtual_nodes))
        for instance_id in instances:
            self.add(instance_id)

    def __len__(self) -> int:
        return len(self.rings[0])

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self.rings[0]

    def add(self, instance_id: str) -> None:
        for ring in self.rings:
            ring.add(instance_id)

    def remove(self, instance_id: str) -> None:
        for ring in self.rings:
            ring.remove(instance_id)

    def candidates(self, key: int) -> tuple[str, ...]:
        """One or two distinct instances for ``key``; ``LookupError`` when the rings are empty."""
        first = self.rings[0].lookup(key)
        for second in self.rings[1].walk(key):
            if second != first:
                return (first, second)
        return (first,)
