"""Discrete-event simulation of a whole P/D cluster that drives the real ``Router``.

Owns: the event clock; the prefill pool (FIFO queues, chunked prefill iterations, LRU
prefix caches of 512-token blocks that emit ``stored``/``removed`` KV events to the
router); the decode pool (KV admission, KV transfer priced from bytes and link bandwidth,
continuous batching whose step time follows batch size and context); the online
``Planner`` when one is configured (role flips drain first, then change the role); and
the per-run figures (TTFT, TPOT, SLO attainment and goodput, cache hit rate, load
imbalance, decision latency). Must not: make placement decisions itself; every placement
and migration comes from the router under test, every role change from the planner.

Timeline of a request: arrival -> the router places it -> it queues at its prefill
instance -> prefill (in ``prefill_chunk_tokens`` iterations when chunking; each iteration caches
the full blocks it completed, so a prompt sharing them that starts later hits) -> first token
(TTFT ends here, as in DistServe) -> it waits for KV space at its decode instance -> the
KV moves (``CostModel.kv_transfer_time``) -> it joins the decode batch for
``output_len - 1`` steps -> finish. TPOT = (finish - first token - KV transfer) /
(output_len - 1): waiting for decode KV space counts against TPOT, the transfer itself does
not (a fixed per-request cost that would make every long prompt with a short answer miss
any TPOT SLO, at any load). A request the router prefills locally
(``skip_remote_prefill``) prefills on its decode instance without queueing there.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitserve.router.planner import Planner, PlannerAction, PlannerConfig, PlannerMetrics
from splitserve.router.router import Router
from splitserve.router.schema import InstanceRole, RouterConfig, RouteRequest
from splitserve.router.sim.cost_model import CostModel
from splitserve.router.sim.instances import (
    DecodeInstance,
    PrefillInstance,
    Progress,
    iteration_time,
)
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
    """Its ``ttft_slo_s`` is the fixed TTFT SLO (the floor of per-request SLOs)."""
    time_scale: float = 1.0
    """Arrival-rate multiplier: arrivals happen at ``trace time / time_scale``."""
    rebalance_interval_s: float = 0.5
    """How often the simulated cluster asks the router to rebalance."""
    slowdowns: tuple[tuple[str, float, float], ...] = ()
    """Stragglers: (prefill instance id, from simulated time s, factor on its prefill times)."""
    measure_decisions: bool = False
    """Time every ``route`` call, in wall clock and thread CPU time (decision-latency figure)."""
    ttft_slo_per_1k_s: float = 0.0
    """Per-request TTFT SLO: ``max(fixed SLO, this * prompt tokens / 1000)``; 0: fixed only."""
    tpot_slo_s: float = math.inf
    """TPOT SLO (goodput counts requests meeting both); inf: TTFT only."""
    prefill_chunk_tokens: int = 0
    """Tokens per prefill iteration (chunked prefill, packing short prompts); 0: one whole
    prompt per iteration."""
    decode_max_batch: int = 256
    """Most requests admitted on one decode instance (running or receiving KV)."""
    planner: PlannerConfig | None = None
    """Online planner (role flips) when set and enabled."""
    stop_below_attainment: float = 0.0
    """Stop early once so many requests missed their TTFT SLO that the run's TTFT attainment
    must end below this (unfinished requests then count as misses); 0: always run to the end.
    The capacity search uses it: an overloaded probe needs no full replay to fail."""

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
        if not (self.ttft_slo_per_1k_s >= 0 and math.isfinite(self.ttft_slo_per_1k_s)):
            raise ValueError(f"ttft_slo_per_1k_s must be >= 0, got {self.ttft_slo_per_1k_s}")
        if not self.tpot_slo_s > 0:
            raise ValueError(f"tpot_slo_s must be positive, got {self.tpot_slo_s}")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0, got {self.prefill_chunk_tokens}")
        if self.decode_max_batch < 1:
            raise ValueError(f"decode_max_batch must be >= 1, got {self.decode_max_batch}")
        if not 0 <= self.stop_below_attainment <= 1:
            raise ValueError(
                f"stop_below_attainment must be in [0, 1], got {self.stop_below_attainment}"
            )

    def ttft_slo_of(self, prompt_len: int) -> float:
        fixed = self.router_config.ttft_slo_s
        if self.ttft_slo_per_1k_s <= 0:
            return fixed
        return max(fixed, self.ttft_slo_per_1k_s * prompt_len / 1000)


@dataclass(frozen=True, slots=True)
class SimResult:
    """Figures of one run. Per-request arrays are in request order."""

    policy: str
    time_scale: float
    request_rate_rps: float
    ttft_slo_s: float
    """The fixed TTFT SLO (the floor of the per-request ones)."""
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
    ttft_slos_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Each request's TTFT SLO."""
    tpots_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Each request's time per output token after the first, KV transfer excluded (0 for
    one-token outputs)."""
    tpot_slo_s: float = math.inf
    queue_wait_s: float = 0.0
    """Mean time requests waited in prefill queues."""
    decode_wait_s: float = 0.0
    """Mean time prefilled requests waited for decode KV space."""
    planner_actions: tuple[tuple[float, str], ...] = ()
    """(simulated time, action) of every planner decision applied."""

    @property
    def slo_attainment(self) -> float:
        """Fraction of requests meeting their TTFT SLO."""
        slos = self.ttft_slos_s if len(self.ttft_slos_s) else self.ttft_slo_s
        return float(np.mean(self.ttfts_s <= slos))

    @property
    def goodput_attainment(self) -> float:
        """Fraction of requests meeting both their TTFT SLO and the TPOT SLO (DistServe)."""
        slos = self.ttft_slos_s if len(self.ttft_slos_s) else self.ttft_slo_s
        ok = self.ttfts_s <= slos
        if len(self.tpots_s):
            ok &= self.tpots_s <= self.tpot_slo_s
        return float(np.mean(ok))

    def ttft_percentile(self, q: float) -> float:
        return float(np.percentile(self.ttfts_s, q))

    def tpot_percentile(self, q: float) -> float:
        return float(np.percentile(self.tpots_s, q)) if len(self.tpots_s) else 0.0


class Simulator:
    """Replays requests through a ``Router`` over simulated instances; ``run`` once per object."""

    _ARRIVE, _PREFILL_DONE, _JOIN, _DECODE, _REBALANCE, _PLAN = range(6)

    def __init__(self, config: SimConfig, requests: Sequence[SimRequest]) -> None:
        if not requests:
            raise ValueError("the simulation needs at least one request")
        self.config = config
        self.cost = config.cost_model
        self.requests = requests
        self.now = 0.0
        self.router = Router(config.policy, config.router_config, clock=lambda: self.now)
        self.prefill: dict[str, PrefillInstance] = {}
        self.decode: dict[str, DecodeInstance] = {}
        self._ids = itertools.count()
        for _ in range(config.num_instances):
            self._add_prefill()
        for _ in range(config.num_decode_instances):
            self._add_decode()
        self._events: list[tuple[float, int, int, object]] = []
        self._work = 0
        """Events queued other than the periodic ticks."""
        self._misses = 0
        self._miss_budget = (
            math.floor((1 - config.stop_below_attainment) * len(requests))
            if config.stop_below_attainment > 0
            else len(requests)
        )
        self.stopped_early = False
        self._seq = itertools.count()
        n = len(requests)
        self._ttft = np.full(n, np.nan)
        self._finish = np.full(n, np.nan)
        self._transfer = np.zeros(n)
        self._index = {r.request_id: i for i, r in enumerate(requests)}
        self._by_id = {r.request_id: r for r in requests}
        self._decode_of: dict[str, str] = {}
        self._num_hit_tokens = 0
        self._num_prompt_tokens = 0
        self._num_migrations = 0
        self._num_fallbacks = 0
        self._latencies: list[float] = []
        self._cpu_times: list[float] = []
        self._queue_wait = 0.0
        self._decode_wait = 0.0
        self._prefilled_at: dict[str, float] = {}
        self._queued_at: dict[str, float] = {}
        self._t0 = min(r.arrival_s for r in requests)
        self._last_arrival = max(self._arrival(r) for r in requests)
        self._planner: Planner | None = None
        self._window: deque[tuple[float, SimRequest]] = deque()
        self._prefill_seconds: deque[tuple[float, float]] = deque()
        self._actions: list[tuple[float, str]] = []
        if config.planner is not None and config.planner.enabled:
            self._planner = Planner(
                config.planner, self.cost, config.router_config.ttft_slo_s, config.tpot_slo_s
            )

    # -- membership ----------------------------------------------------------------------------

    def _add_prefill(self) -> str:
        instance_id = f"p{next(self._ids)}"
        self.prefill[instance_id] = PrefillInstance(instance_id, self.cost.kv_capacity_blocks)
        self.router.add_instance(
            instance_id,
            {InstanceRole.PREFILL},
            prefill_rate_tps=self.cost.nominal_prefill_rate_tps(),
        )
        return instance_id

    def _add_decode(self) -> str:
        instance_id = f"d{next(self._ids)}"
        self.decode[instance_id] = DecodeInstance(
            instance_id, self.cost, self.config.decode_max_batch
        )
        self.router.add_instance(
            instance_id, {InstanceRole.DECODE}, kv_capacity_blocks=self.cost.kv_capacity_blocks
        )
        return instance_id

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> SimResult:
        for request in self.requests:
            self._push(self._arrival(request), self._ARRIVE, request)
        self._push(self.config.rebalance_interval_s, self._REBALANCE, None)
        if self._planner is not None:
            self._push(self._planner.config.interval_s, self._PLAN, None)
        handlers: tuple[Callable[[Any], None], ...] = (
            self._arrive,
            self._prefill_done,
            self._join,
            self._decode_tick,
            self._rebalance,
            self._plan,
        )
        while self._events and self._misses <= self._miss_budget:
            self.now, _, kind, payload = heapq.heappop(self._events)
            self._work -= kind < self._REBALANCE
            handlers[kind](payload)
        self.stopped_early = self._misses > self._miss_budget
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
        if kind < self._REBALANCE:
            self._work += 1
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    def _busy(self) -> bool:
        """Work other than the periodic ticks remains."""
        return self._work > 0

    # -- prefill -------------------------------------------------------------------------------

    def _arrive(self, request: SimRequest) -> None:
        slo = self.config.ttft_slo_of(request.prompt_len)
        route_request = RouteRequest(
            request.request_id,
            request.prompt_len,
            request.block_hashes,
            max_output_tokens=request.output_len,
            ttft_slo_s=slo if self.config.ttft_slo_per_1k_s > 0 else None,
        )
        if self.config.measure_decisions:
            c0, t0 = time.thread_time(), time.perf_counter()
            placement = self.router.route(route_request)
            self._latencies.append(time.perf_counter() - t0)
            self._cpu_times.append(time.thread_time() - c0)
        else:
            placement = self.router.route(route_request)
        self._window.append((self.now, request))
        self._num_fallbacks += placement.fallback
        self._decode_of[request.request_id] = placement.decode_instance
        if placement.prefill_instance is None:
            self._local_prefill(request)
            return
        instance = self.prefill[placement.prefill_instance]
        instance.queue[request.request_id] = request
        self._queued_at[request.request_id] = self.now
        if not instance.busy:
            self._start_next(instance)

    def _local_prefill(self, request: SimRequest) -> None:
        duration = self.cost.prefill_time(request.prompt_len)
        self._num_prompt_tokens += request.prompt_len
        self._push(self.now + duration, self._PREFILL_DONE, (None, [(request, duration)]))

    def _take(self, instance: PrefillInstance) -> Progress:
        """Start the next queued request: look up its cache hit and tell the router."""
        request_id, request = instance.queue.popitem(last=False)
        assert isinstance(request, SimRequest)
        self._queue_wait += self.now - self._queued_at.pop(request_id)
        self.router.on_prefill_start(request_id, instance.instance_id)
        cached_blocks = instance.cached_prefix_blocks(request.block_hashes)
        cached = min(cached_blocks * self.cost.block_size, request.prompt_len)
        self._num_hit_tokens += cached
        self._num_prompt_tokens += request.prompt_len
        # A fully cached prompt still computes its last token to sample the first output.
        new = max(1, request.prompt_len - cached)
        progress = Progress(request_id, new, request.prompt_len - new)
        instance.active.append(progress)
        return progress

    def _start_next(self, instance: PrefillInstance) -> None:
        """Run the next iteration: the started prompts first, then queued ones, up to a chunk."""
        chunk = self.config.prefill_chunk_tokens
        pieces: list[tuple[Progress, int]] = []
        if chunk <= 0:
            if not instance.active and instance.queue:
                self._take(instance)
            if instance.active:
                pieces.append((instance.active[0], instance.active[0].remaining))
        else:
            budget = chunk
            for progress in instance.active:
                if budget <= 0:
                    break
                n = min(budget, progress.remaining)
                pieces.append((progress, n))
                budget -= n
            while budget > 0 and instance.queue:
                progress = self._take(instance)
                n = min(budget, progress.remaining)
                pieces.append((progress, n))
                budget -= n
        if not pieces:
            instance.busy = False
            self._maybe_retire_prefill(instance)
            return
        duration = iteration_time(self.cost, pieces) * self._slowdown(instance.instance_id)
        total = sum(n for _, n in pieces)
        for progress, n in pieces:
            progress.compute_s += duration * n / total
        instance.busy = True
        instance.busy_time_s += duration
        self._push(self.now + duration, self._PREFILL_DONE, (instance, pieces))

    def _prefill_done(self, payload: tuple[PrefillInstance | None, list[Any]]) -> None:
        instance, pieces = payload
        if instance is None:  # a local prefill: [(request, seconds)]
            request, seconds = pieces[0]
            self._prefill_seconds.append((self.now, seconds))
            self._first_token(request)
            return
        for progress, n in pieces:
            progress.remaining -= n
            progress.context += n
            request = self._by_id[progress.request_id]
            if progress.remaining > 0:
                # Full blocks computed so far are cached now (as an engine hashes each block
                # once it is full): a prompt sharing them, started in a later iteration, hits.
                self._store(
                    instance, request.block_hashes[: progress.context // self.cost.block_size]
                )
                continue
            instance.active.remove(progress)
            self._prefill_seconds.append((self.now, progress.compute_s))
            self._store(instance, request.block_hashes)
            self._first_token(request)
        self._start_next(instance)

    def _store(self, instance: PrefillInstance, block_hashes: Sequence[int]) -> None:
        """Cache blocks on a prefill instance and report them (and evictions) to the router."""
        stored, evicted = instance.store(block_hashes)
        if evicted:
            self.router.on_kv_removed(instance.instance_id, evicted)
        if stored:
            self.router.on_kv_stored(instance.instance_id, stored)

    def _first_token(self, request: SimRequest) -> None:
        ttft = self.now - self._arrival(request)
        self._ttft[self._index[request.request_id]] = ttft
        self._misses += ttft > self.config.ttft_slo_of(request.prompt_len)
        self.router.on_prefill_done(request.request_id)
        decode = self.decode[self._decode_of[request.request_id]]
        decode.waiting.append(request.request_id)
        self._prefilled_at[request.request_id] = self.now
        self._admit(decode)

    # -- decode --------------------------------------------------------------------------------

    def _admit(self, decode: DecodeInstance) -> None:
        while decode.waiting:
            request = self._by_id[decode.waiting[0]]
            tokens = request.prompt_len + request.output_len
            if not decode.can_admit(tokens):
                return
            decode.waiting.popleft()
            decode.admit(tokens)
            self._decode_wait += self.now - self._prefilled_at[request.request_id]
            transfer = self.cost.kv_transfer_time(request.prompt_len)
            self._transfer[self._index[request.request_id]] = transfer
            self._push(self.now + transfer, self._JOIN, (decode, request))

    def _join(self, payload: tuple[DecodeInstance, SimRequest]) -> None:
        decode, request = payload
        tokens = request.prompt_len + request.output_len
        if request.output_len <= 1:  # the first token was the last
            decode.release(tokens)
            self._done(decode, request)
            return
        decode.join(
            request.request_id, request.prompt_len + 1, tokens, request.output_len - 1, self.now
        )
        self._schedule_decode(decode)

    def _schedule_decode(self, decode: DecodeInstance) -> None:
        at = decode.next_finish_time()
        if at is not None:
            self._push(max(at, self.now), self._DECODE, (decode, decode.version))

    def _decode_tick(self, payload: tuple[DecodeInstance, int]) -> None:
        decode, version = payload
        if version != decode.version:
            return  # the batch changed since this finish was scheduled
        for finished in decode.pop_finished():
            decode.release(finished.reserved)
            self._done(decode, self._by_id[finished.request_id])
        self._schedule_decode(decode)

    def _done(self, decode: DecodeInstance, request: SimRequest) -> None:
        self._finish[self._index[request.request_id]] = self.now
        del self._decode_of[request.request_id]
        self.router.on_finish(request.request_id)
        self._admit(decode)
        self._maybe_retire_decode(decode)

    # -- rebalancing and planning --------------------------------------------------------------

    def _rebalance(self, _: object) -> None:
        # Apply every move first, then start idle targets: one request may move twice in a
        # round (A -> B, then B -> C), and must not start on B in between.
        targets = []
        for migration in self.router.rebalance():
            source = self.prefill[migration.source]
            request = source.queue.pop(migration.request_id)  # queued: nothing started it
            target = self.prefill[migration.target]
            target.queue[migration.request_id] = request
            self._num_migrations += 1
            targets.append(target)
        for target in targets:
            if not target.busy:
                self._start_next(target)
        if self._busy():  # other work remains: keep ticking
            self._push(self.now + self.config.rebalance_interval_s, self._REBALANCE, None)

    def _plan(self, _: object) -> None:
        assert self._planner is not None
        for decision in self._planner.decide(self._metrics()):
            for _ in range(decision.count):
                self._apply(decision.action)
        if self._busy():
            self._push(self.now + self._planner.config.interval_s, self._PLAN, None)

    def _metrics(self) -> PlannerMetrics:
        assert self._planner is not None
        window = self._planner.config.window_s
        while self._window and self._window[0][0] < self.now - window:
            self._window.popleft()
        while self._prefill_seconds and self._prefill_seconds[0][0] < self.now - window:
            self._prefill_seconds.popleft()
        span = min(window, max(self.now, 1e-9))
        arrivals = [r for _, r in self._window]
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        backlog = 0.0
        for instance_id, instance in self.prefill.items():
            if not instance.draining:
                load = self.router.loads.get(instance_id)
                backlog += load.pending_prefill_work(self.now) / load.prefill_rate_tps
        return PlannerMetrics(
            now=self.now,
            num_prefill=sum(not p.draining for p in self.prefill.values()),
            num_decode=sum(not d.draining for d in self.decode.values()),
            arrival_rate_rps=len(arrivals) / span,
            mean_prefill_s=mean([s for _, s in self._prefill_seconds])
            or mean([self.cost.prefill_time(r.prompt_len) for r in arrivals]),
            mean_context_tokens=mean([r.prompt_len + r.output_len / 2 for r in arrivals]),
            mean_output_tokens=mean([r.output_len for r in arrivals]),
            prefill_backlog_s=backlog,
            pending_actions=sum(p.draining for p in self.prefill.values())
            + sum(d.draining for d in self.decode.values()),
        )

    def _apply(self, action: PlannerAction) -> None:
        """Flips drain the least loaded instance of the losing role; it changes role when idle."""
        self._actions.append((self.now, action.value))
        if action is PlannerAction.FLIP_TO_DECODE:
            serving = [p for p in self.prefill.values() if not p.draining]
            victim = min(serving, key=lambda p: len(p.queue) + len(p.active))
            victim.draining = True
            self.router.set_healthy(victim.instance_id, False)
            self._maybe_retire_prefill(victim)
        elif action is PlannerAction.FLIP_TO_PREFILL:
            serving = [d for d in self.decode.values() if not d.draining]
            victim = min(serving, key=lambda d: d.num_admitted + len(d.waiting))
            victim.draining = True
            self.router.set_healthy(victim.instance_id, False)
            self._maybe_retire_decode(victim)
        # Scale up/down needs a budget beyond the fixed one: the offline search holds it fixed.

    def _maybe_retire_prefill(self, instance: PrefillInstance) -> None:
        if not instance.draining or not instance.idle:
            return
        orphans = self.router.remove_instance(instance.instance_id)
        assert not orphans, orphans
        del self.prefill[instance.instance_id]
        self._add_decode()

    def _maybe_retire_decode(self, decode: DecodeInstance) -> None:
        if not decode.draining or not decode.idle:
            return
        if self.router.loads.get(decode.instance_id).num_running_requests:
            return  # requests placed here are still prefilling elsewhere
        orphans = self.router.remove_instance(decode.instance_id)
        assert not orphans, orphans
        del self.decode[decode.instance_id]
        new_id = self._add_prefill()
        self._start_next(self.prefill[new_id])

    # -- results -------------------------------------------------------------------------------

    def _result(self) -> SimResult:
        busy = np.array([p.busy_time_s for p in self.prefill.values()])
        duration = self._last_arrival
        n = len(self.requests)
        rate = n / duration if duration > 0 else math.inf
        outputs = np.array([r.output_len for r in self.requests])
        first = np.array([self._arrival(r) for r in self.requests]) + self._ttft
        decode_s = self._finish - first - self._transfer
        tpots = np.where(outputs > 1, decode_s / np.maximum(outputs - 1, 1), 0.0)
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
            ttft_slos_s=np.array([self.config.ttft_slo_of(r.prompt_len) for r in self.requests]),
            tpots_s=tpots,
            tpot_slo_s=self.config.tpot_slo_s,
            queue_wait_s=self._queue_wait / n,
            decode_wait_s=self._decode_wait / n,
            planner_actions=tuple(self._actions),
        )


def simulate(config: SimConfig, requests: Sequence[SimRequest]) -> SimResult:
    """Run one simulation of ``requests`` under ``config``."""
    return Simulator(config, requests).run()
