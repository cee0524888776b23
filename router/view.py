"""A read-only view of the router's state that policies decide on.

Owns: nothing; it bundles the ``PrefixIndex``, the ``LoadTracker``, the healthy
prefill instances and the clock, and derives per-request figures (cached tokens,
predicted TTFT). Must not: mutate the index or the loads; policies get only this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from splitserve.router.load_tracker import InstanceLoad, LoadTracker
from splitserve.router.prefix_index import PendingPrefixes, PrefixIndex, match_with_pending
from splitserve.router.schema import RouterConfig, RouteRequest


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What a policy may look at while it places one request."""

    config: RouterConfig
    index: PrefixIndex
    loads: LoadTracker
    prefill_instances: Sequence[str]
    """Healthy prefill instances, in the order they joined."""
    prefill_loads: Sequence[InstanceLoad]
    """Their loads, in the same order."""
    prefill_set: AbstractSet[str]
    """The same instances as a set (membership tests on the hot path)."""
    now: float
    """The router's clock at decision time (seconds)."""
    pending: PendingPrefixes
    """Blocks that queued prefills will store (the router's forecast of the caches)."""
    queued_requests: Mapping[str, RouteRequest]
    """Placed requests whose prefill has not started (what rebalancing may move)."""

    def match(self, request: RouteRequest) -> dict[str, int]:
        """Leading blocks each instance holds or will hold (pending prefills), for one request."""
        return match_with_pending(self.index, self.pending, request.block_hashes)

    def load(self, instance_id: str) -> InstanceLoad:
        return self.loads.loads[instance_id]

    def cached_tokens(self, request: RouteRequest, matched_blocks: int) -> int:
        """Prompt tokens covered by ``matched_blocks`` leading blocks."""
        return min(matched_blocks * self.config.block_size, request.prompt_len)

    def uncached_tokens(self, request: RouteRequest, matched_blocks: int) -> int:
        return request.prompt_len - self.cached_tokens(request, matched_blocks)

    def prefill_work(self, request: RouteRequest, matched_blocks: int) -> float:
        """Token-equivalents of prefilling the request after ``matched_blocks`` cached blocks."""
        cached = self.cached_tokens(request, matched_blocks)
        return self.loads.prefill_work(request.prompt_len - cached, cached)

    def predicted_ttft(self, instance_id: str, request: RouteRequest, matched_blocks: int) -> float:
        """Seconds until the request would finish prefilling at ``instance_id`` if placed now."""
        return self.load(instance_id).predicted_ttft(
            self.prefill_work(request, matched_blocks), self.now
        )

    def best_predicted_ttft(
        self,
        request: RouteRequest,
        matches: dict[str, int],
        exclude: str | AbstractSet[str] | None = None,
    ) -> tuple[str, float]:
        """The healthy prefill instance with the lowest predicted TTFT (ties: earliest joined),
        leaving out ``exclude`` (one instance id or a set of them).

        Returns ``("", inf)`` when no instance outside ``exclude`` exists.
        """
        excluded = {exclude} if isinstance(exclude, str) else (exclude or set())
        # Hot path (every fallback, every rebalance move): one pass with the uncached work,
        # InstanceLoad.predicted_ttft inlined; then the few instances holding a prefix.
        now, full_work = self.now, self.loads.prefill_work(request.prompt_len, 0)
        best_load, best_ttft = None, float("inf")
        for load in self.prefill_loads:
            rate = load.prefill_rate_tps
            left = 0.0  # InstanceLoad.remaining_work_in_progress, inlined
            if load.prefill_tokens_in_progress > 0:
                left = load.prefill_work_in_progress - rate * (now - load.prefill_started_at)
            ttft = (load.queued_prefill_work + (left if left > 0 else -left) + full_work) / rate
            if ttft < best_ttft and load.instance_id not in excluded:
                best_load, best_ttft = load, ttft
        best_id = best_load.instance_id if best_load is not None else ""
        loads, kappa, block_size = (
            self.loads.loads,
            self.loads.attention_coeff,
            self.config.block_size,
        )
        prompt_len = request.prompt_len
        for instance_id, matched in matches.items():
            if not matched or instance_id in excluded or instance_id not in self.prefill_set:
                continue
            load = loads[instance_id]
            rate = load.prefill_rate_tps
            left = 0.0
            if load.prefill_tokens_in_progress > 0:
                left = load.prefill_work_in_progress - rate * (now - load.prefill_started_at)
            cached = min(matched * block_size, prompt_len)
            new = prompt_len - cached
            work = new + kappa * new * (cached + new / 2)
            ttft = (load.queued_prefill_work + (left if left > 0 else -left) + work) / rate
            if ttft < best_ttft or (
                ttft == best_ttft and self.joined_before(instance_id, best_id)
            ):
                best_id, best_ttft = instance_id, ttft
        return best_id, best_ttft

    def joined_before(self, a: str, b: str) -> bool:
        """Tie-break in join order (rare: only on exactly equal predictions); ``b`` "": True."""
        if not b:
            return True
        order = self.prefill_instances
        return order.index(a) < order.index(b)
