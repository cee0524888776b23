"""KVCacheManager: which blocks each request holds, prefix-cache lookups, allocation.

Owns the request -> blocks map on top of the BlockPool. It answers "how much of
this request is already cached" and "give this request room for N more
tokens"; it returns None when there is no room, and the scheduler decides whom
to preempt. Torch-free.
"""

from __future__ import annotations

from splitserve.roles.engine.block_pool import BlockPool, KVBlock
from splitserve.roles.engine.request import Request


class KVCacheManager:
    """Per-request block lists over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        """Prompt tokens admitted / found in the prefix cache (hit-rate metrics)."""

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request: (blocks, number of tokens they hold).

        At least one token is always left to compute, since the model must run on
        the last token to produce logits.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_prefix_queries += num_tokens
        self.num_prefix_hits += num_hit_tokens

    # ------------------------------------------------------------------ allocation

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
        cache: bool = True,
    ) -> list[KVBlock] | None:
        """Make room for ``num_new_tokens`` after the request's computed tokens.

        ``new_computed_blocks`` are prefix-cache hits found for a request being
        admitted. Returns the newly allocated blocks, or None (nothing changed)
        when the pool cannot supply them. With ``cache=False`` the new full blocks
        are not published in the prefix cache (their KV comes from a remote load
        that may still fail: ``cache_blocks`` publishes them once it is verified).
        """
        computed = new_computed_blocks or []
        held = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        needed = self.blocks_for(num_computed + num_new_tokens) - len(held) - len(computed)
        # hits that are free right now leave the free list when touched
        free_hits = sum(1 for b in computed if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - free_hits:
            return None
        self.pool.touch(computed)
        new_blocks = self.pool.get_new_blocks(max(needed, 0)) or []
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        blocks.extend(computed)
        blocks.extend(new_blocks)
        if cache:
            self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Publish the request's full blocks up to ``num_tokens`` in the prefix cache."""
        self._cache_full_blocks(request, num_tokens)

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that will be full once ``num_tokens`` tokens are computed."""
        if not self.enable_caching:
            return
        blocks = self.req_to_blocks[request.request_id]
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        start = self._num_cached_blocks.get(request.request_id, 0)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        """Release every block of the request (tail first, so tails are evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(list(reversed(blocks)))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]
