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
  (cache hit included) of those holding at least as long a cached prefix as the instance
  predicted fastest wins while it is within half the SLO and spends at most a quarter of
  the headroom the request has at the globally fastest instance; otherwise that instance. A
  patient request (slack, its SLO less its own prefill time, at least twice the tight slack
  of recent traffic, ``RecentSlack``), while the cluster is busy, leaves the instances that
  would start a request first to those that cannot wait (``express_lane``) and may wait longer
  for its cache: instances are FIFO, so only placement gives tight requests precedence. A
  request predicted past its SLO even there goes where it costs least work: the instance
  holding its longest cached prefix (``deepest_holder``). Hot instances shed queued
  requests (DualMap, ICLR'26). The hash key skips hot shared prefixes (a system
  prompt most requests start with): it is the chained hash of the first K blocks after the
  leading blocks that many recent requests share, so the sessions behind one hot prompt
  spread over the rings instead of piling onto its two candidates, while each session's own
  history keeps its affinity (``HotPrefixes``).
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
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


class HotPrefixes:
    """Which leading prefixes many recent requests share *and fan out from*.

    Over the last ``window`` requests it counts, per leading block (chained hashes, so a
    block stands for its whole prefix), the requests that start with it and the distinct
    blocks that follow it. A hot shared prompt (a system prompt) is one that many requests
    share and then diverge after, into at least ``min_fanout`` continuations; the turns of one
    long conversation also share a prefix, but continue it one way, so they are not hot (their
    affinity is what the cache wants). Looks at the first ``max_depth`` blocks of a prompt.
    """

    _END = -1

    def __init__(
        self,
        window: int = 1024,
        share: float = 0.05,
        min_count: int = 8,
        min_fanout: int = 4,
        max_depth: int = 64,
    ) -> None:
        self.window, self.share, self.min_count = window, share, min_count
        self.min_fanout, self.max_depth = min_fanout, max_depth
        self.counts: dict[int, int] = {}
        self.fanout: dict[int, int] = {}
        self._pairs: dict[tuple[int, int], int] = {}
        self._recent: deque[tuple[int, ...]] = deque()

    def observe(self, block_hashes: Sequence[int]) -> None:
        prefix = tuple(block_hashes[: self.max_depth])
        self._recent.append(prefix)
        self._count(prefix, 1)
        if len(self._recent) > self.window:
            self._count(self._recent.popleft(), -1)

    def _count(self, prefix: tuple[int, ...], step: int) -> None:
        counts, pairs, fanout = self.counts, self._pairs, self.fanout
        for i, h in enumerate(prefix):
            n = counts.get(h, 0) + step
            if n:
                counts[h] = n
            else:
                del counts[h]
            pair = (h, prefix[i + 1] if i + 1 < len(prefix) else self._END)
            m = pairs.get(pair, 0) + step
            if m:
                pairs[pair] = m
            else:
                del pairs[pair]
            if (step > 0 and m == 1) or (step < 0 and m == 0):
                f = fanout.get(h, 0) + step
                if f:
                    fanout[h] = f
                else:
                    del fanout[h]

    def hot_depth(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks up to the deepest shared block many requests fan out from."""
        threshold = max(self.min_count, self.share * len(self._recent))
        depth, counts, fanout = 0, self.counts, self.fanout
        for i, h in enumerate(block_hashes[: self.max_depth]):
            if counts.get(h, 0) < threshold:
                break
            if fanout.get(h, 0) >= self.min_fanout:
                depth = i + 1
        return depth


class RecentSlack:
    """The tight slack of the recent traffic: a low quantile of the last ``window`` requests'
    slack (TTFT SLO less the request's own prefill time on an idle instance).

    A request whose slack is several times it can wait (DualMap calls it patient). Under one SLO
    for all, long prompts have little slack and short ones much; under per-request SLOs scaled
    with the prompt it is the other way round. Recomputed every ``every`` requests (a sort).
    """

    def __init__(self, window: int = 512, quantile: float = 0.1, every: int = 64) -> None:
        self.quantile, self.every = quantile, every
        self._recent: deque[float] = deque(maxlen=window)
        self._seen = 0
        self.tight = math.inf

    def observe(self, slack: float) -> None:
        self._recent.append(slack)
        self._seen += 1
        if self._seen % self.every == 1 or self.every == 1:
            ordered = sorted(self._recent)
            self.tight = ordered[int(self.quantile * (len(ordered) - 1))]


SLO_FRACTION = 0.5
"""DualMap keeps a hash candidate only while its predicted TTFT is within this part of the SLO."""
HEADROOM_SHARE = 0.25
"""... and spends at most this part of the headroom (SLO - the globally lowest predicted TTFT)."""
PATIENT_SLO_FRACTION = 0.7
"""A patient request (slack at least ``PATIENT_SLACK_RATIO`` x the tight one) keeps a candidate
while within this part of its SLO ..."""
PATIENT_HEADROOM_SHARE = 0.5
"""... spending at most this part of its headroom: it can wait for its cache."""
PATIENT_SLACK_RATIO = 2.0
"""A request whose slack is at least this multiple of the tight slack is patient."""
MIN_SLACK_S = 1e-3
"""Slack is counted from this (a prompt longer than its SLO allows fits only by its cache hit)."""
EXPRESS_SHARE = 1 / 16
"""When the cluster is busy, this share of the prefill instances (at least one), those that
would start a request first, is kept for requests that are not patient."""


@register_policy
class DualMap(Policy):
    """Two hash candidates, the better by predicted TTFT unless the global best is clearly
    faster (``acceptable_ttft``) or holds more of the prompt cached; a request late everywhere
    to its longest cached prefix (``deepest_holder``); hotspot migration."""

    name = "dualmap"
    uses_forecast = True
    slo_fraction: float = SLO_FRACTION
    headroom_share: float = HEADROOM_SHARE

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.rings = DualHashRing(config.virtual_nodes)
        self.hot = HotPrefixes()
        self.slack = RecentSlack()

    def add_instance(self, instance_id: str) -> None:
        self.rings.add(instance_id)

    def remove_instance(self, instance_id: str) -> None:
        self.rings.remove(instance_id)

    def key(self, request: RouteRequest) -> int:
        """The routing key: the first K blocks past the hot shared prefix; a prompt that is
        all hot prefix keys on its id (the hot prefix is cached widely anyway)."""
        hot = self.hot.hot_depth(request.block_hashes)
        if hot and hot >= len(request.block_hashes):
            return hash_bytes(request.request_id.encode())
        return routing_key(request, hot + self.config.prefix_key_blocks)

    def candidates(self, request: RouteRequest) -> tuple[str, ...]:
        """The request's two candidates (one when a single instance exists)."""
        return self.rings.candidates(self.key(request))

    def choose(self, request: RouteRequest, view: ClusterView, matches: dict[str, int]) -> Choice:
        candidates = self.candidates(request)
        self.hot.observe(request.block_hashes)
        slo = slo_of(request, self.config)
        fallback, fallback_ttft = view.best_predicted_ttft(request, matches)
        if fallback_ttft > slo:  # late wherever it goes: place it where it costs least work
            cheapest = deepest_holder(view, request, matches) or fallback
            return Choice(cheapest, candidates, fallback=cheapest not in candidates)
        own_s = view.prefill_work(request, 0) / view.load(fallback).prefill_rate_tps
        slack = max(MIN_SLACK_S, slo - own_s)
        self.slack.observe(slack)
        patient = slack >= PATIENT_SLACK_RATIO * self.slack.tight
        express = self.express_lane(view) if patient else frozenset()
        if fallback in express:  # a patient request leaves the express lane to the others
            outside, outside_ttft = view.best_predicted_ttft(request, matches, exclude=express)
            if outside and outside_ttft <= PATIENT_SLO_FRACTION * slo:
                fallback, fallback_ttft = outside, outside_ttft
            else:
                express = frozenset()  # it needs the lane itself
        best, best_ttft = "", math.inf
        for candidate in candidates:  # ties: the ring-0 candidate
            matched = matches.get(candidate, 0)
            if candidate in express or matched < matches.get(fallback, 0):
                continue  # affinity never prefills again what the fastest instance holds
            ttft = view.predicted_ttft(candidate, request, matched)
            if ttft < best_ttft:
                best, best_ttft = candidate, ttft
        # While the lane is kept, a patient request may also wait longer for its cache.
        if best and best_ttft <= self.acceptable_ttft(slo, fallback_ttft, bool(express)):
            return Choice(best, candidates)
        return Choice(fallback, candidates, fallback=fallback not in candidates)

    def express_lane(self, view: ClusterView) -> frozenset[str]:
        """The instances kept for requests that cannot wait, while the cluster is busy.

        Busy: fewer than ``EXPRESS_SHARE`` of the instances would start a request within the
        tight slack. Then those that would start one first are kept (their queues drain), so a
        request with little slack still finds an instance where it starts in time instead of
        queueing behind prompts that could have waited elsewhere. Instances are FIFO: only
        placement can give the tight requests precedence. Empty when the cluster is not busy.
        """
        loads = view.prefill_loads
        keep = max(1, int(EXPRESS_SHARE * len(loads)))
        if len(loads) <= keep:
            return frozenset()
        now, waits = view.now, []
        for i, load in enumerate(loads):  # pending_prefill_work(now) / rate, inlined (hot path)
            left = 0.0
            if load.prefill_tokens_in_progress > 0:
                left = load.prefill_work_in_progress - load.prefill_rate_tps * (
                    now - load.prefill_started_at
                )
            waits.append(((load.queued_prefill_work + abs(left)) / load.prefill_rate_tps, i))
        waits = heapq.nsmallest(keep + 1, waits)
        if waits[keep][0] < self.slack.tight:
            return frozenset()
        return frozenset(loads[i].instance_id for _, i in waits[:keep])

    def acceptable_ttft(self, slo: float, best_ttft: float, patient: bool = False) -> float:
        """The highest predicted TTFT at which a hash candidate still wins over the global best.

        A candidate keeps the request only while it leaves ``1 - slo_fraction`` of the SLO as
        margin against misprediction and spends at most ``headroom_share`` of the headroom the
        request would have at the instance predicted fastest (cache hits included): a short
        prompt with a loose SLO may wait a little for its cache, a long one that barely fits
        goes where it starts first. Taking every candidate within the SLO (the original rule) lets
        the two candidates' queues fill up to the SLO while other instances idle; a long prompt
        that only just fits then misses on any error, and one behind it inherits the wait.
        A patient request (``PATIENT_*``) may wait longer for its cache while the cluster is busy:
        the instances that start first stay free for the requests that cannot.
        """
        headroom = max(0.0, slo - best_ttft)
        if patient:
            return min(PATIENT_SLO_FRACTION * slo, best_ttft + PATIENT_HEADROOM_SHARE * headroom)
        return min(self.slo_fraction * slo, best_ttft + self.headroom_share * headroom)

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


def deepest_holder(view: ClusterView, request: RouteRequest, matches: dict[str, int]) -> str:
    """Of the healthy instances holding the longest leading match, the one with the lowest
    predicted TTFT (ties: earliest joined); "" when none holds a block.

    Where a request cannot meet its SLO anyway, this is where it costs the cluster least
    prefill work: its cached blocks are not computed again, and it stores no second copy of
    its prefix (the cache space stays with prefixes that later requests can still hit).
    """
    depth = max((n for i, n in matches.items() if i in view.prefill_set), default=0)
    best_id, best_ttft = "", math.inf
    for instance_id, matched in matches.items():
        if matched != depth or not depth or instance_id not in view.prefill_set:
            continue
        ttft = view.predicted_ttft(instance_id, request, matched)
        if ttft < best_ttft or (ttft == best_ttft and view.joined_before(instance_id, best_id)):
            best_id, best_ttft = instance_id, ttft
    return best_id


def slo_of(request: RouteRequest, config: RouterConfig) -> float:
    """The request's TTFT SLO: its own when it carries one, else the configured one."""
    return request.ttft_slo_s if request.ttft_slo_s is not None else config.ttft_slo_s


def _shed(view: ClusterView, source: str, move: MoveFn, budget: int) -> int:
    """Move queued requests off ``source`` while it is predicted past the SLO; returns how many."""
    load, moved = view.load(source), 0
    for request_id in reversed(list(load.queue)):
        waits = load.predicted_ttft(0, view.now)  # the tail request finishes when the queue drains
        if moved >= budget:
            break
        request = view.queued_requests.get(request_id)
        if request is None:
            continue
        slo = slo_of(request, view.config)
        if waits <= slo:
            if request.ttft_slo_s is None:
                break  # one SLO for all: nothing queued before it is late either
            continue
        matches = view.match(request)
        target, ttft = view.best_predicted_ttft(request, matches, exclude=source)
        if target and ttft <= slo and ttft < waits:
            move(Migration(request_id, source, target, ttft))
            moved += 1
    return moved
