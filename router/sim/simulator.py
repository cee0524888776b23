"""Discrete-event cluster simulator that drives the real ``Router`` with simulated instances.

Owns: simulated prefill instances (FIFO queue, one prefill at a time, LRU prefix
cache of 512-token blocks that emits ``stored``/``removed`` KV events to the
router), simulated decode instances (KV reservations, finish times), the event
clock, and the per-run metrics (TTFT, SLO attainment, cache hit rate, load
imbalance, decision latency). Must not: make placement decisions itself; every
placement and migration comes from the router under test.

Simplifications, on purpose: TTFT is arrival to end of prefill (KV transfer and
the first decode step are not modelled); a decode instance runs each request for
``output_length`` steps priced at its batch when the request arrives there; a
request whose prefill is skipped prefills on its decode instance without queueing.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitserve.router.router import Router
from splitserve.router.schema import InstanceRole, RouterConfig, RouteRequest
from splitserve.router.sim.cost_model import CostModel
from splitserve.router.sim.trace import PromptSynthesizer, TraceRecord


@dataclass(frozen=True, slots=True)
class SimRequest:
    """A trace record with its block hashes, ready to replay."""

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    block_hashes: tuple[int, ...]


def prepare_requests(
    records: Sequence[TraceRecord], synth: PromptSynthesizer | None = None
) -> list[SimRequest]:
    """Hash every record's prompt once; the result can be replayed at any time scale."""
    synth = synth or PromptSynthesizer()
    return [
        SimRequest(
            f"req-{i}", r.arrival_s, r.input_length, r.output_length, tuple(synth.block_hashes(r))
        )
        for i, r in enumerate(records)
    ]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulation run."""

    policy: str
    num_instances: int = 32
    """Prefill instances."""
    num_decode_instances: int = 32
    cost_model: CostModel = field(default_factory=CostModel)
    router_config: RouterConfig = field(default_factory=RouterConfig)
    time_scale: float = 1.0
    """Arrival-rate multiplier: arrivals happen at ``trace time / time_scale``."""
    rebalance_interval_s: float = 0.5
    """How often the simulated cluster asks the router to rebalance."""
    slowdowns: tuple[tuple[str, float, float], ...] = ()
    """Stragglers: (prefill instance id, from simulated time s, factor on its prefill times)."""
    measure_decisions: bool = False
    """Time every ``route`` call, in wall clock and thread CPU time (decision-latency figure)."""

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.num_decode_instances < 1:
            raise ValueError(f"num_decode_instances must be >= 1, got {self.num_decode_instances}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {self.time_scale}")
        if not self.rebalance_interval_s > 0:
            raise ValueError(
                f"rebalance_interval_s must be positive, got {self.rebalance_interval_s}"
            )


@dataclass(frozen=True, slots=True)
class SimResult:
    """Figures of one run. TTFTs are in request order."""

    policy: str
    time_scale: float
    request_rate_rps: float
    ttft_slo_s: float
    ttfts_s: np.ndarray
    hit_rate: float
    """Prompt tokens found in the prefill instance's cache / all prompt tokens prefilled."""
    load_imbalance: float
    """Max over mean of the prefill instances' busy time (1.0: perfectly even)."""
    num_migrations: int
    num_fallbacks: int
    decision_latencies_s: np.ndarray
    """Wall time of each ``route`` call (empty unless ``measure_decisions``)."""
    decision_cpu_s: np.ndarray
    """Thread CPU time of each ``route`` call: the same without time the OS gave other processes."""

    @property
    def slo_attainment(self) -> float:
        return float(np.mean(self.ttfts_s <= self.ttft_slo_s))

    def ttft_percentile(self, q: float) -> float:
        return float(np.percentile(self.ttfts_s, q))


class _PrefillInstance:
    """A simulated prefill instance: FIFO queue, one prefill at a time, LRU block cache."""

    def __init__(self, instance_id: str, capacity_blocks: int) -> None:
        self.instance_id = instance_id
        self.capacity_blocks = capacity_blocks
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.queue: OrderedDict[str, SimRequest] = OrderedDict()
        self.busy = False
        self.busy_time_s = 0.0

    def cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        n = 0
        for block_hash in block_hashes:
            if block_hash not in self.cache:
                break
            self.cache.move_to_end(block_hash)
            n += 1
        return n

    def store(self, block_hashes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Insert a prompt's blocks; returns (newly stored, evicted) for the KV events."""
        stored = []
        for block_hash in block_hashes:
            if block_hash in self.cache:
                self.cache.move_to_end(block_hash)
            else:
                self.cache[block_hash] = None
                stored.append(block_hash)
        evicted = []
        while len(self.cache) > self.capacity_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        return stored, evicted


class Simulator:
    """Replays requests through a ``Router`` over simulated instances; ``run`` once per object."""

    _ARRIVE, _PREFILL_DONE, _FINISH, _REBALANCE = range(4)

    def __init__(self, config: SimConfig, requests: Sequence[SimRequest]) -> None:
        if not requests:
            raise ValueError("the simulation needs at least one request")
        self.config = config
        self.requests = requests
        self.now = 0.0
        self.router = Router(config.policy, config.router_config, clock=lambda: self.now)
        rate = config.cost_model.nominal_prefill_rate_tps()
        self.prefill = {
            f"p{i}": _PrefillInstance(f"p{i}", config.cost_model.kv_capacity_blocks)
            for i in range(config.num_instances)
        }
        for instance_id in self.prefill:
            self.router.add_instance(instance_id, {InstanceRole.PREFILL}, prefill_rate_tps=rate)
        decode_blocks = config.cost_model.kv_capacity_blocks
        self.decode_kv_tokens = {f"d{i}": 0 for i in range(config.num_decode_instances)}
        for instance_id in self.decode_kv_tokens:
            self.router.add_instance(
                instance_id, {InstanceRole.DECODE}, kv_capacity_blocks=decode_blocks
            )
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._ttft = np.full(len(requests), np.nan)
        self._index = {r.request_id: i for i, r in enumerate(requests)}
        self._decode_of: dict[str, str] = {}
        self._num_hit_tokens = 0
        self._num_prompt_tokens = 0
        self._num_migrations = 0
        self._num_fallbacks = 0
        self._latencies: list[float] = []
        self._cpu_times: list[float] = []
        self._outstanding = 0
        self._t0 = min(r.arrival_s for r in requests)

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> SimResult:
        for request in self.requests:
            self._push(self._arrival(request), self._ARRIVE, request)
        self._push(self.config.rebalance_interval_s, self._REBALANCE, None)
        handlers: tuple[Callable[[Any], None], ...] = (
            self._arrive,
            self._prefill_done,
            self._finish,
            self._rebalance,
        )
        while self._events:
            self.now, _, kind, payload = heapq.heappop(self._events)
            handlers[kind](payload)
        return self._result()

    def _slowdown(self, instance_id: str) -> float:
        factor = 1.0
        for slow_id, since_s, slow_factor in self.config.slowdowns:
            if slow_id == instance_id and self.now >= since_s:
                factor = slow_factor
        return factor

    def _arrival(self, request: SimRequest) -> float:
        """Simulated arrival time: trace time from the first request, divided by the time scale."""
        return (request.arrival_s - self._t0) / self.config.time_scale

    def _push(self, at: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    # -- events --------------------------------------------------------------------------------

    def _arrive(self, request: SimRequest) -> None:
        route_request = RouteRequest(
            request.request_id,
            request.prompt_len,
            request.block_hashes,
            max_output_tokens=request.output_len,
        )
        if self.config.measure_decisions:
            c0, t0 = time.thread_time(), time.perf_counter()
            placement = self.router.route(route_request)
            self._latencies.append(time.perf_counter() - t0)
            self._cpu_times.append(time.thread_time() - c0)
        else:
            placement = self.router.route(route_request)
        self._outstanding += 1
        self._num_fallbacks += placement.fallback
        self._decode_of[request.request_id] = placement.decode_instance
        if placement.prefill_instance is None:
            self._local_prefill(request, placement.decode_instance)
            return
        instance = self.prefill[placement.prefill_instance]
        instance.queue[request.request_id] = request
        if not instance.busy:
            self._start_next(instance)

    def _local_prefill(self, request: SimRequest, decode_id: str) -> None:
        duration = self.config.cost_model.prefill_time(request.prompt_len)
        self._num_prompt_tokens += request.prompt_len
        self._push(self.now + duration, self._PREFILL_DONE, (None, request))

    def _start_next(self, instance: _PrefillInstance) -> None:
        if not instance.queue:
            instance.busy = False
            return
        _, request = instance.queue.popitem(last=False)
        self.router.on_prefill_start(request.request_id, instance.instance_id)
        cached_blocks = instance.cached_prefix_blocks(request.block_hashes)
        cached = min(cached_blocks * self.config.cost_model.block_size, request.prompt_len)
        self._num_hit_tokens += cached
        self._num_prompt_tokens += request.prompt_len
        duration = self.config.cost_model.prefill_time(request.prompt_len - cached, cached)
        duration *= self._slowdown(instance.instance_id)
        instance.busy = True
        instance.busy_time_s += duration
        self._push(self.now + duration, self._PREFILL_DONE, (instance, request))

    def _prefill_done(self, payload: tuple[_PrefillInstance | None, SimRequest]) -> None:
        instance, request = payload
        self._ttft[self._index[request.request_id]] = self.now - self._arrival(request)
        self.router.on_prefill_done(request.request_id)
        if instance is not None:
            stored, evicted = instance.store(request.block_hashes)
            if evicted:
                self.router.on_kv_removed(instance.instance_id, evicted)
            if stored:
                self.router.on_kv_stored(instance.instance_id, stored)
            self._start_next(instance)
        self._start_decode(request)

    def _start_decode(self, request: SimRequest) -> None:
        decode_id = self._decode_of[request.request_id]
        context = request.prompt_len + request.output_len
        self.decode_kv_tokens[decode_id] += context
        step = self.config.cost_model.decode_step_time(self.decode_kv_tokens[decode_id])
        self._push(self.now + step * max(1, request.output_len), self._FINISH, request)

    def _finish(self, request: SimRequest) -> None:
        decode_id = self._decode_of.pop(request.request_id)
        self.decode_kv_tokens[decode_id] -= request.prompt_len + request.output_len
        self.router.on_finish(request.request_id)
        self._outstanding -= 1

    def _rebalance(self, _: object) -> None:
        for migration in self.router.rebalance():
            source = self.prefill[migration.source]
            request = source.queue.pop(migration.request_id)  # queued: nothing started it
            target = self.prefill[migration.target]
            target.queue[migration.request_id] = request
            self._num_migrations += 1
            if not target.busy:
                self._start_next(target)
        if self._events:  # other work remains: keep ticking
            self._push(self.now + self.config.rebalance_interval_s, self._REBALANCE, None)

    # -- results -------------------------------------------------------------------------------

    def _result(self) -> SimResult:
        busy = np.array([p.busy_time_s for p in self.prefill.values()])
        duration = max(self._arrival(r) for r in self.requests)
        rate = len(self.requests) / duration if duration > 0 else math.inf
        return SimResult(
            policy=self.config.policy,
            time_scale=self.config.time_scale,
            request_rate_rps=rate,
            ttft_slo_s=self.config.router_config.ttft_slo_s,
            ttfts_s=self._ttft,
            hit_rate=self._num_hit_tokens / max(1, self._num_prompt_tokens),
            load_imbalance=float(busy.max() / busy.mean()) if busy.mean() > 0 else 1.0,
            num_migrations=self._num_migrations,
            num_fallbacks=self._num_fallbacks,
            decision_latencies_s=np.array(self._latencies),
            decision_cpu_s=np.array(self._cpu_times),
        )


def simulate(config: SimConfig, requests: Sequence[SimRequest]) -> SimResult:
    """Run one simulation of ``requests`` under ``config``."""
    return Simulator(config, requests).run()
