"""BlockPool: the KV blocks of one worker, their reference counts and the prefix cache.

Owns which block ids are free, which are in use, and which full blocks are
cached under their chained hash. Torch-free: it only deals in ids, so its
behaviour can be tested with exact block ids and free-list order.

Free list order is LRU: allocation takes from the head, freed blocks go to the
tail, so an unreferenced cached block is evicted only when every block freed
before it has been reused. A cached block hit while free leaves the free list.

It records KV events (stored / removed block hashes) in its `KVEventLog` (kv_events.py), which
the routers read with their own cursors and which snapshots `cached_hashes` on a resync; it
must not decide anything about requests (that is the KV manager's job).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from splitserve.integrity import IntegrityReport
from splitserve.roles.engine.kv_events import KVEventLog


@dataclass(eq=False)
class KVBlock:
    """One block of KV cache slots."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    """Chained hash of the block's tokens once it is full and cached, else None."""


@dataclass(frozen=True)
class KVEvent:
    """A change to the set of cached block hashes, for the router's prefix index."""

    kind: str  # "stored" or "removed"
    block_hashes: tuple[int, ...]


class BlockPool:
    """Fixed set of ``num_blocks`` blocks with LRU reuse of cached, unreferenced ones."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}
        self.events = KVEventLog()
        """Every change to the cached hashes, sequence-numbered, for the routers."""
        self.events.bind_snapshot(self.cached_hashes)
        self._taken = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free block ids in allocation order (head first)."""
        return list(self._free)

    def cached_hashes(self) -> tuple[int, ...]:
        """Every block hash in the prefix cache (a resync's snapshot)."""
        return tuple(self._cached)

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        return self._cached.get(block_hash)

    # ------------------------------------------------------------------ allocation

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock] | None:
        """Take ``num_blocks`` blocks from the head of the free list, or None if too few."""
        if num_blocks > len(self._free):
            return None
        taken = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: list[KVBlock]) -> None:
        """Add a reference to cache-hit blocks, taking free ones off the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free tail in order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    # ------------------------------------------------------------------ prefix cache

    def cache_block(self, block: KVBlock, block_hash: int) -> None:
        """Register a full block under its chained hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # same content already cached in another block; keep that one
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self.events.append("stored", (block_hash,))

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
            self.events.append("removed", (block.block_hash,))
        block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is referenced."""
        if len(self._free) != self.num_blocks:
            return False
        removed = tuple(self._cached)
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if removed:
            self.events.append("removed", removed)
        return True

    # ------------------------------------------------------------------ integrity

    def check_integrity(self, expected_refs: Mapping[int, int] | None = None) -> IntegrityReport:
        """The free list is exactly the unreferenced blocks, the hash map and the blocks'
        hashes agree, and (given ``expected_refs``: block id -> how many requests hold it)
        every reference count equals its holders. Blocks referenced more often than held
        count as leaked."""
        report = IntegrityReport()
        self._check_free_list(report)
        self._check_hash_map(report)
        if expected_refs is not None:
            self._check_refs(report, expected_refs)
        return report

    def _check_free_list(self, report: IntegrityReport) -> None:
        for block_id, block in self._free.items():
            if block is not self.blocks[block_id]:
                report.add(f"free list entry {block_id} is not block {block_id}")
            if block.ref_cnt != 0:
                report.add(f"block {block_id} is on the free list with ref_cnt {block.ref_cnt}")
        for block in self.blocks:
            if block.ref_cnt < 0:
                report.add(f"block {block.block_id} has ref_cnt {block.ref_cnt}")
            if block.ref_cnt == 0 and block.block_id not in self._free:
                report.add(f"block {block.block_id} is unreferenced but not on the free list")

    def _check_hash_map(self, report: IntegrityReport) -> None:
        if not self.enable_caching and self._cached:
            report.add(f"prefix caching is off but {len(self._cached)} hashes are cached")
        for block_hash, block in self._cached.items():
            if block.block_hash != block_hash:
                report.add(
                    f"hash map entry {block_hash:#x} points at block {block.block_id}, "
                    f"whose hash is {block.block_hash}"
                )
        for block in self.blocks:
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                report.add(f"block {block.block_id} carries a hash the map does not know")

    def _check_refs(self, report: IntegrityReport, expected: Mapping[int, int]) -> None:
        for block in self.blocks:
            want = expected.get(block.block_id, 0)
            if block.ref_cnt != want:
                report.add(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt}, but requests hold it "
                    f"{want} times"
                )
                if block.ref_cnt > want:
                    report.leaked_blocks += 1
        unknown = sorted(set(expected) - set(range(self.num_blocks)))
        if unknown:
            report.add(f"requests hold block ids outside the pool: {unknown[:8]}")

    def take_events(self) -> list[KVEvent]:
        """KV events since this method's last call (one in-process reader's cursor; the
        routers read ``events`` with their own)."""
        batch = self.events.read(self.events.epoch, self._taken, max_events=self.events.capacity)
        if batch.snapshot is not None:
            raise RuntimeError("KV events were dropped: the log overflowed since the last take")
        self._taken = batch.next_seq
        return [KVEvent(kind, hashes) for kind, hashes in batch.events]
