"""Placement policies for the prefill tier, and their registry.

Owns: the choice of one prefill instance per request (``Policy.choose``) and,
for policies that do it, hotspot rebalancing (``Policy.rebalance``). Must not:
mutate the index or the loads directly; they read a ``ClusterView`` and the
router applies what they return. Pick one by name with ``create_policy``.

- ``round_robin``: the next instance in join order; ignores caches and load.
- ``least_loaded``: lowest predicted prefill backlog (cache-blind).
- ``prefix_affinity``: consistent hash of the prefix key on one ring; no load check.
- ``kv_overlap_cost``: Dynamo's KV router cost, ``weight * blocks_to_prefill + active_blocks``.
- ``dualmap``: two candidates from two independent hash rings, the lower predicted TTFT
  wins; when both exceed the SLO, the globally lowest predicted TTFT; hot instances shed
  queued requests (DualMap, ICLR'26).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from splitserve.hashing import hash_bytes, prefix_key
from splitserve.router.errors import UnknownPolicyError
from splitserve.router.hash_ring import RING_SEEDS, DualHashRing, HashRing
from splitserve.router.schema import Migration, RouterConfig, RouteRequest
from splitserve.router.view import ClusterView

MoveFn = Callable[[Migration], None]
"""Applies one migration to the router's state (supplied by the router to ``rebalance``)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """A policy's answer for one request."""

    instance_id: str
    candidates: tuple[str, ...] = ()
    """Instances the policy looked at first (for logs and tests)."""
    fallback: bool = False
    """True when load overrode the policy's affinity choice."""


class Policy(ABC):
    """Chooses a prefill instance. Holds only its own routing state (counters, rings).

    The router calls ``add_instance`` / ``remove_instance`` when the healthy prefill set
    changes, ``choose`` once per request, and ``rebalance`` periodically.
    """

    name: ClassVar[str]
    uses_forecast: ClassVar[bool] = False
    """True: ``matches`` count blocks that prefills already queued will store (the router's
    forecast); False: only blocks the KV events reported, as the routers we compare with do."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def add_instance(self, instance_id: str) -> None:
        """A prefill instance became available (mutates only the policy's own state)."""
        return None  # policies without routing state or rebalancing need nothing here

    def remove_instance(self, instance_id: str) -> None:
        """A prefill instance left or became unhealthy (mutates only the policy's own state)."""
        return None  # policies without routing state or rebalancing need nothing here

    @abstractmethod
    def choose(self, request: RouteRequest, view: ClusterView, matches: dict[str, int]) -> Choice:
        """Pick a prefill instance. ``matches``: leading blocks held, per instance holding any.

        ``view.prefill_instances`` is never empty when the router calls this.
        """

    def rebalance(self, view: ClusterView, move: MoveFn) -> None:
        """Move queued requests off hot instances by calling ``move``; default: never."""
        return None  # policies without routing state or rebalancing need nothing here


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available to ``create_policy`` under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a policy named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def create_policy(name: str, config: RouterConfig | None = None) -> Policy:
    """A fresh policy by registered name; ``UnknownPolicyError`` lists the known names."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnknownPolicyError(name, available_policies())
    return cls(config if config is not None else RouterConfig())


def routing_key(request: RouteRequest, num_blocks: int) -> int:
    """The prefix key of a request; a prompt without a full block keys on its own id."""
    if request.block_hashes:
        return prefix_key(request.block_hashes, num_blocks)
    return hash_bytes(request.request_id.encode())


@register_policy
class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self._next = 0

    def choose(self, request: RouteRequest, view: ClusterView, matches: dict[str, int]) -> Choice:
        instances = view.prefill_instances
        choice = instances[self._next % len(instances)]
        self._next = (self._next + 1) % len(instances)
        return Choice(choice)


@register_policy
class LeastLoaded(Policy):
    name = "least_loaded"

    def choose(self, request: RouteRequest, view: ClusterView, matches: dict[str, int]) -> Choice:
        now = view.now
        best = min(
            view.prefill_loads,
            key=lambda load: (
                load.pending_prefill_work(now) / load.prefill_rate_tps,
                load.num_running_requests,
            ),
        )
        return Choice(best.instance_id)


@register_policy
class PrefixAffinity(Policy):
    name = "prefix_affinity"

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.ring = HashRing(RING_SEEDS[0], config.virtual_nodes)

    def add_instance(self, instance_id: str) -> None:
        self.ring.add(instance_id)

    def remove_instance(self, instance_id: str) -> None:
        self.ring.remove(instance_id)

    def choose(self, request: RouteRequest, view: ClusterView, matches: dict[str, int]) -> Choice:
        owner = self.ring.lookup(routing_key(request, self.config.prefix_key_blocks))
        return Choice(owner, (owner,))


@register_policy
class KvOverlapCost(Policy):
    """Dynamo's KV router: ``weight * blocks_to_prefill + active_blocks``, lowest wins.

    ``active_blocks`` counts the KV blocks of requests the instance holds: prompts queued or
    prefilling there and decode reservations. Dynamo's default weight is 1.0.
    """

    name = "kv_overlap_cost"
    overlap_weight: float = 1.0

    def choose(self, request: RouteRequest, view: ClusterView, matches: dict[str, int]) -> Choice:
        num_blocks = math.ceil(request.prompt_len / self.config.block_size)
        weight = self.overlap_weight
        best_id, best_cost = "", math.inf
        for load in view.prefill_loads:
            instance_id = load.instance_id
            to_prefill = num_blocks - min(matches.get(instance_id, 0), num_blocks)
            active = load.num_active_prefill_blocks + load.num_reserved_kv_blocks
            cost = weight * to_prefill + active
            if cost < best_cost:
                best_id, best_cost = instance_id, cost
        return Choice(best_id)


@register_policy
class DualMap(Policy):
    """Two hash candidates, the better by predicted TTFT; SLO fallback; hotspot migration."""

    name = "dualmap"
    uses_forecast = True

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.rings = DualHashRing(config.virtual_nodes)

    def add_instance(self, instance_id: str) -> None:
        self.rings.add(instance_id)

    def remove_instance(self, instance_id: str) -> None:
        self.rings.remove(instance_id)

    def candidates(self, request: RouteRequest) -> tuple[str, ...]:
        """The request's two candidates (one when a single instance exists)."""
        return self.rings.candidates(routing_key(request, self.config.prefix_key_blocks))

    def choose(self, request: RouteRequest, view: ClusterView, matches: dict[str, int]) -> Choice:
        candidates = self.candidates(request)
        ttfts = [view.predicted_ttft(c, request, matches.get(c, 0)) for c in candidates]
        best = min(range(len(candidates)), key=ttfts.__getitem__)  # ties: the ring-0 candidate
        if ttfts[best] <= self.config.ttft_slo_s:
            return Choice(candidates[best], candidates)
        fallback, _ = view.best_predicted_ttft(request, matches)
        return Choice(fallback, candidates, fallback=fallback not in candidates)

    def rebalance(self, view: ClusterView, move: MoveFn) -> None:
        """Shed queued requests, newest first, from every instance predicted past the SLO.

        A request moves only to an instance where its predicted TTFT (with that instance's
        cache hit) is within the SLO and lower than where it waits now.
        """
        budget = self.config.max_migrations_per_rebalance
        for source in list(view.prefill_instances):
            budget -= _shed(view, source, move, budget)
            if budget <= 0:
                return


def _shed(view: ClusterView, source: str, move: MoveFn, budget: int) -> int:
    """Move queued requests off ``source`` while it is predicted past the SLO; returns how many."""
    slo, load, moved = view.config.ttft_slo_s, view.load(source), 0
    for request_id in reversed(list(load.queue)):
        waits = load.predicted_ttft(0, view.now)  # the tail request finishes when the queue drains
        if waits <= slo or moved >= budget:
            break
        request = view.queued_requests.get(request_id)
        if request is None:
            continue
        matches = view.match(request)
        target, ttft = view.best_predicted_ttft(request, matches, exclude=source)
        if target and ttft <= slo and ttft < waits:
            move(Migration(request_id, source, target, ttft))
            moved += 1
    return moved
