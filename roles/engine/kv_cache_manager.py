"""KVCacheManager: which blocks each request holds, prefix-cache lookups, allocation.

Owns the request -> blocks map on top of the BlockPool. It answers "how much of
this request is already cached" and "give this request room for N more
tokens"; it returns None when there is no room, and the scheduler decides whom
to preempt. Torch-free.

Windowed-only models (every layer attends inside a sliding window: Mistral-style, Phi-3,
Mixtral with ``sliding_window``): a block whose every position is before the window of the
request's next query is returned to the pool when the request is next given room. Its place
in the request's list becomes a hole (None; ``get_block_ids`` reports block ``NULL_BLOCK_ID``
there, which the attention kernels read only under the window mask). A freed block keeps its
prefix-cache hash while it sits free (its KV is intact until the block is reused); a block
that was never published is never published once freed. Requests whose KV a remote decode
worker will read (``remote_kv_sink``) keep every block. Mixed models (Gemma 2/3, Qwen with
``max_window_layers``) keep every block: their global layers read the whole history.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from splitserve.integrity import IntegrityReport
from splitserve.roles.engine.block_pool import BlockPool, KVBlock
from splitserve.roles.engine.request import Request

NULL_BLOCK_ID = 0
"""Block id reported for a hole (a block freed after it left the window): any valid id
does, since no query's window reaches it."""


class KVCacheManager:
    """Per-request block lists over one BlockPool."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        """The window of a windowed-only model (blocks outside it are freed), else None."""
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock | None]] = {}
        self.num_window_freed = 0
        """Blocks returned to the pool because they left every layer's window."""
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
        the last token to produce logits. A request that still needs prompt logprobs, or a
        MEAN / CLS embedding, gets no hit: its prompt rows come only from computing them.
        """
        if not self.enable_caching or request.computes_whole_prompt:
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
        self._free_outside_window(request)
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

    def _free_outside_window(self, request: Request) -> None:
        """Return the blocks before the window of the request's next query (at position
        ``num_computed_tokens``, which sees keys after ``position - window``) to the pool."""
        window = self.sliding_window
        if window is None or request.remote_kv_sink:
            return
        blocks = self.req_to_blocks.get(request.request_id)
        if not blocks:
            return
        first_needed = request.num_computed_tokens - window + 1
        num_outside = min(max(first_needed, 0) // self.block_size, len(blocks))
        freed = []
        for i in range(num_outside):
            block = blocks[i]
            if block is not None:
                freed.append(block)
                blocks[i] = None
        if freed:
            self.pool.free_blocks(list(reversed(freed)))
            self.num_window_freed += len(freed)

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
            block = blocks[i]
            if block is not None:  # a hole's KV is gone: never published
                self.pool.cache_block(block, request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        """Release every block of the request (tail first, so tails are evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks([b for b in reversed(blocks) if b is not None])

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past the first ``blocks_for(num_tokens)`` (tail first).

        Speculative decoding's rollback: those blocks hold only rejected drafts' KV. None of
        them is cached: a block is published only once full of the request's own tokens.
        """
        blocks = self.req_to_blocks.get(request.request_id, [])
        keep = self.blocks_for(num_tokens)
        if len(blocks) <= keep:
            return
        if self._num_cached_blocks.get(request.request_id, 0) > keep:
            raise RuntimeError(f"trim of {request.request_id} would drop a cached block")
        tail = [b for b in blocks[keep:] if b is not None]
        del blocks[keep:]
        self.pool.free_blocks(list(reversed(tail)))

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (``NULL_BLOCK_ID`` where a block left the window)."""
        return [NULL_BLOCK_ID if b is None else b.block_id
                for b in self.req_to_blocks.get(request_id, [])]

    def num_holes(self, request_id: str) -> int:
        """Blocks of the request freed because they left the window."""
        return sum(1 for b in self.req_to_blocks.get(request_id, []) if b is None)

    # ------------------------------------------------------------------ integrity

    def check_integrity(self, live_request_ids: Collection[str] | None = None) -> IntegrityReport:
        """Reference counts equal the requests' block lists (no block twice in one list),
        the pool is consistent, and (given ``live_request_ids``) only live requests hold
        blocks: blocks held under a forgotten request id are leaked."""
        refs: Counter[int] = Counter()
        report = IntegrityReport()
        for request_id, held in self.req_to_blocks.items():
            blocks = [b for b in held if b is not None]
            ids = [b.block_id for b in blocks]
            if len(set(ids)) != len(ids):
                report.add(f"request {request_id!r} holds a block twice: {ids}")
            holes = len(held) - len(blocks)
            if any(b is not None for b in held[:holes]):
                report.add(f"request {request_id!r} has a freed-window hole after a held block")
            for block in blocks:
                if block is not self.pool.blocks[block.block_id]:
                    report.add(f"request {request_id!r} holds a foreign block {block.block_id}")
            refs.update(ids)
        for request_id, num in self._num_cached_blocks.items():
            if num > len(self.req_to_blocks.get(request_id, [])):
                report.add(f"request {request_id!r}: {num} cached blocks, fewer held")
        report.merge(self.pool.check_integrity(refs))
        if live_request_ids is not None:
            self._check_owners(report, set(live_request_ids))
        return report

    def _check_owners(self, report: IntegrityReport, live: set[str]) -> None:
        for request_id in sorted(set(self.req_to_blocks) - live):
            blocks = self.req_to_blocks[request_id]
            report.add(f"request {request_id!r} is gone but holds {len(blocks)} blocks")
            report.leaked_blocks += sum(1 for b in blocks if b is not None and b.ref_cnt == 1)
