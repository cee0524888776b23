"""Which instance holds which prefix block, as reported by the workers' KV events.

Owns: the map block hash -> instances and its inverse, fed only by ``stored`` and
``removed`` events (and instance removal). Must not: guess, look at load, or
decide placements. Hashes are the chained block hashes of
``splitserve.hashing``, so holding block i implies its whole prefix was equal;
a match is therefore the longest run of a request's leading blocks an instance holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class PrefixIndex:
    """Block hash -> set of instances holding it. Mutated only by the ``apply_*`` methods."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._blocks: dict[str, set[int]] = {}

    def __len__(self) -> int:
        """Number of distinct blocks held anywhere."""
        return len(self._holders)

    @property
    def instances(self) -> frozenset[str]:
        """Instances that hold at least one block (or were registered and hold none)."""
        return frozenset(self._blocks)

    def add_instance(self, instance_id: str) -> None:
        """Register an instance with an empty cache (events for unknown instances register them)."""
        self._blocks.setdefault(instance_id, set())

    def apply_stored(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """An instance now holds these blocks (idempotent)."""
        held = self._blocks.setdefault(instance_id, set())
        for block_hash in block_hashes:
            if block_hash not in held:
                held.add(block_hash)
                self._holders.setdefault(block_hash, set()).add(instance_id)

    def apply_removed(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """An instance evicted these blocks (removing a block it does not hold is a no-op)."""
        held = self._blocks.get(instance_id)
        if held is None:
            return
        for block_hash in block_hashes:
            if block_hash in held:
                held.discard(block_hash)
                self._drop_holder(block_hash, instance_id)

    def replace(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """The instance holds exactly these blocks (a resync from its snapshot)."""
        new = set(block_hashes)
        held = self._blocks.setdefault(instance_id, set())
        self.apply_removed(instance_id, held - new)
        self.apply_stored(instance_id, new - held)

    def remove_instance(self, instance_id: str) -> int:
        """Forget everything an instance held (it left or died); returns how many blocks."""
        held = self._blocks.pop(instance_id, set())
        for block_hash in held:
            self._drop_holder(block_hash, instance_id)
        return len(held)

    def holders(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._holders.get(block_hash, ()))

    def blocks_of(self, instance_id: str) -> frozenset[int]:
        return frozenset(self._blocks.get(instance_id, ()))

    def num_blocks_of(self, instance_id: str) -> int:
        return len(self._blocks.get(instance_id, ()))

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each instance holding the first block: how many leading blocks it holds.

        Instances missing from the result hold none. Cost: one set lookup per
        (block, surviving instance), so it stops early when every instance has missed.
        """
        if not block_hashes:
            return {}
        first = self._holders.get(block_hashes[0])
        if not first:
            return {}
        matched = dict.fromkeys(first, 1)
        alive = set(first)
        for depth, block_hash in enumerate(block_hashes[1:], start=2):
            holders = self._holders.get(block_hash)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for instance_id in alive:
                matched[instance_id] = depth
        return matched

    def matched_blocks(self, instance_id: str, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of a request one instance holds."""
        held = self._blocks.get(instance_id)
        if not held:
            return 0
        n = 0
        for block_hash in block_hashes:
            if block_hash not in held:
                break
            n += 1
        return n

    def _drop_holder(self, block_hash: int, instance_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is None:
            return
        holders.discard(instance_id)
        if not holders:
            del self._holders[block_hash]


class PendingPrefixes:
    """Blocks that placed, unfinished prefills will store: the router's own forecast.

    Owned and fed by the router from its placements (not by KV events), so that a request
    placed behind a queued one with the same prefix, on the same instance, counts those
    blocks as hits: prefills on one instance run in order, so they will be cached by then.
    Entries go when the prefill finishes (the ``stored`` event takes over), is aborted, or
    moves (a migration moves them with it).
    """

    def __init__(self) -> None:
        self._by_request: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._holders: dict[int, dict[str, int]] = {}  # block -> instance -> refcount

    def __len__(self) -> int:
        return len(self._by_request)

    def add(self, request_id: str, instance_id: str, block_hashes: Sequence[int]) -> None:
        self.remove(request_id)
        self._by_request[request_id] = (instance_id, tuple(block_hashes))
        for block_hash in block_hashes:
            counts = self._holders.setdefault(block_hash, {})
            counts[instance_id] = counts.get(instance_id, 0) + 1

    def remove(self, request_id: str) -> None:
        entry = self._by_request.pop(request_id, None)
        if entry is None:
            return
        instance_id, block_hashes = entry
        for block_hash in block_hashes:
            counts = self._holders[block_hash]
            counts[instance_id] -= 1
            if not counts[instance_id]:
                del counts[instance_id]
                if not counts:
                    del self._holders[block_hash]

    def move(self, request_id: str, instance_id: str) -> None:
        entry = self._by_request.get(request_id)
        if entry is not None:
            self.add(request_id, instance_id, entry[1])

    def holders(self, block_hash: int) -> dict[str, int] | None:
        """Instances (with how many pending prefills) that will store ``block_hash``."""
        return self._holders.get(block_hash)


def match_with_pending(
    index: PrefixIndex, pending: PendingPrefixes, block_hashes: Sequence[int]
) -> dict[str, int]:
    """Like ``PrefixIndex.match``, counting blocks that pending prefills will store as held."""
    matched: dict[str, int] = {}
    alive: set[str] | None = None
    for depth, block_hash in enumerate(block_hashes, start=1):
        held = index._holders.get(block_hash)
        coming = pending.holders(block_hash)
        if coming:
            holders = set(coming) | held if held else set(coming)
        elif held:
            holders = held
        else:
            break
        alive = set(holders) if alive is None else alive & holders
        if not alive:
            break
        for instance_id in alive:
            matched[instance_id] = depth
    return matched
