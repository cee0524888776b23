"""Planning: runs the SLO planner against the live cluster and applies its decisions.

Owns `PlanningLoop`: the metrics window it feeds the planner (every placement the router
makes, through ``Router.observers``; queued prefill work from the router's loads), the loop
that asks ``splitserve.router.planner.Planner`` for decisions every ``planner.interval_s``,
and applying them: a role flip drains the least busy worker of the losing role (no new
placements; its requests and KV leases finish; then it stops) and starts a worker of the
gaining role on the freed resources. Must not: decide (the planner does), place or stream
requests, or stop the cluster on a failure: a failed action is logged, counted
(``planner_failed``) and retried at the next interval.

A flip replaces the worker rather than re-configuring the engine in place: the new worker
has a new id and an empty prefix cache (what a prefill worker cached is of no use to a
decode one anyway).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Any

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.launcher import WorkerHandle
from splitserve.cluster.membership import Membership
from splitserve.cluster.scaling import Scaler
from splitserve.errors import ConfigError
from splitserve.router.planner import (
    Planner,
    PlannerAction,
    PlannerConfig,
    PlannerDecision,
    PlannerMetrics,
)
from splitserve.router.schema import Placement, RouteRequest
from splitserve.router.sim.cost_model import PROFILES, CostModel

logger = logging.getLogger(__name__)

_GAINS = {PlannerAction.FLIP_TO_PREFILL: ("decode", "prefill"),
          PlannerAction.FLIP_TO_DECODE: ("prefill", "decode")}
"""Flip action -> (role that loses a worker, role that gains one)."""


def planner_cost_model(config: ClusterConfig) -> CostModel:
    """The profile named by ``planner.cost_model`` (a built-in name or a JSON file)."""
    name = config.planner.cost_model
    if name is None:
        gpus = sum(rc.num_gpus for _, rc in config.roles.items())
        name = "a100" if gpus else "cpu"
    if name in PROFILES:
        return PROFILES[name]
    if not name.endswith(".json"):
        raise ConfigError(
            f"planner.cost_model: {name!r} is neither a built-in profile "
            f"({', '.join(sorted(PROFILES))}) nor a .json file"
        )
    return CostModel.load(name)


def planner_config(config: ClusterConfig) -> PlannerConfig:
    s = config.planner
    return PlannerConfig(
        enabled=s.enabled, interval_s=s.interval_s, window_s=s.window_s,
        cooldown_s=s.cooldown_s, hysteresis=s.hysteresis, min_pressure=s.min_pressure,
        target_prefill_utilization=s.target_prefill_utilization,
        tpot_target_fraction=s.tpot_target_fraction,
    )


class PlanningLoop:
    """Feeds the planner from the router and applies its flips with drain-then-start."""

    def __init__(
        self, config: ClusterConfig, membership: Membership, scaler: Scaler,
        counters: collections.Counter[str],
    ) -> None:
        self.config = config
        self.membership = membership
        self.scaler = scaler
        self.counters = counters
        self.router = membership.router
        self.cost_model = planner_cost_model(config)
        self.planner = Planner(planner_config(config), self.cost_model,
                               config.slo.ttft_ms / 1000, config.slo.tpot_ms / 1000)
        self._window: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self._started = time.monotonic()
        self.applying: PlannerDecision | None = None
        """The decision being applied (the planner waits for it)."""
        self._owed: list[str] = []
        """Roles whose new worker failed to start: started at the next interval."""
        self.history: list[dict[str, Any]] = []
        """Applied decisions, newest last (for ``status()``)."""
        self.router.observers.append(self._observe)

    def _observe(self, request: RouteRequest, placement: Placement) -> None:
        self._window.append((time.monotonic(), request.prompt_len, placement.cached_tokens,
                             request.max_output_tokens))

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Decide every ``interval_s`` until cancelled; nothing here stops serving."""
        while True:
            await asyncio.sleep(self.planner.config.interval_s)
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - a planner failure must not stop serving
                logger.exception("planner step failed")
                self.counters["planner_failed"] += 1

    async def step(self) -> list[PlannerDecision]:
        """One planning round: start owed workers, then decide and apply."""
        await self._start_owed()
        decisions = self.planner.decide(self.metrics())
        for decision in decisions:
            self.counters[f"planner:{decision.action.value}"] += 1
            logger.info("planner: %s x%d (%s)", decision.action.value, decision.count,
                        decision.reason)
            await self.apply(decision)
        return decisions

    def metrics(self) -> PlannerMetrics:
        now = time.monotonic()
        window = self.planner.config.window_s
        while self._window and self._window[0][0] < now - window:
            self._window.popleft()
        rows = list(self._window)
        span = max(1e-3, min(window, now - self._started))
        n = max(1, len(rows))
        prefill_s = sum(self.cost_model.prefill_time(p - c, c) for _, p, c, _ in rows) / n
        return PlannerMetrics(
            now=now,
            num_prefill=len(self.membership.live("prefill")),
            num_decode=len(self.membership.live("decode")),
            arrival_rate_rps=len(rows) / span,
            mean_prefill_s=prefill_s,
            mean_context_tokens=sum(p + o / 2 for _, p, _, o in rows) / n,
            mean_output_tokens=sum(o for *_, o in rows) / n,
            prefill_backlog_s=self._backlog_s(now),
            pending_actions=int(self.applying is not None) + len(self._owed),
        )

    def _backlog_s(self, now: float) -> float:
        total = 0.0
        for handle in self.membership.live("prefill"):
            load = self.router.loads.loads.get(handle.worker_id)
            if load is not None:
                total += load.pending_prefill_work(now) / load.prefill_rate_tps
        return total

    # ------------------------------------------------------------------ applying

    async def apply(self, decision: PlannerDecision) -> None:
        """Flip ``decision.count`` workers, one at a time: drain one, then start its twin."""
        if decision.action not in _GAINS:
            logger.warning("planner: %s is not applied by this cluster (flips only)",
                           decision.action.value)
            return
        loses, gains = _GAINS[decision.action]
        self.applying = decision
        try:
            for _ in range(decision.count):
                live = self.membership.live(loses)
                if len(live) <= max(1, self.config.replica_bounds(loses)[0]):
                    logger.warning("planner: %s keeps its last worker(s); flip skipped", loses)
                    return
                ceiling = self.config.replica_bounds(gains)[1]
                if ceiling is not None and len(self.membership.live(gains)) >= ceiling:
                    logger.warning("planner: %s is at max_replicas; flip skipped", gains)
                    return
                victim = min(live, key=self._busyness)
                await self.scaler.drain(victim, self.config.planner.drain_timeout_s)
                self._owed.append(gains)
                await self._start_owed()
                self.history.append({"at": time.time(), "action": decision.action.value,
                                     "stopped": victim.worker_id, "reason": decision.reason})
        finally:
            self.applying = None

    def _busyness(self, handle: WorkerHandle) -> int:
        return self.scaler.flights.num_on(handle.worker_id)

    async def _start_owed(self) -> None:
        """Start the workers flips owe; a failure stays owed (retried next interval)."""
        while self._owed:
            role = self._owed[0]
            try:
                handle = await asyncio.get_running_loop().run_in_executor(
                    None, self.membership.start_ready, role)
            except Exception:  # noqa: BLE001 - e.g. no resources yet: logged, retried
                logger.exception("planner: could not start a %s worker; retrying", role)
                self.counters["planner_failed"] += 1
                self.planner.last_action_at = -math.inf  # decide again once it is up
                return
            self.membership.add(handle)
            self._owed.pop(0)

    def status(self) -> dict[str, Any]:
        """Planner state for ``Cluster.status()``."""
        m = self.metrics()
        need = self.planner.needs(m) if m.arrival_rate_rps > 0 else None
        return {
            "enabled": True,
            "cost_model": self.cost_model.name,
            "decisions": {k.split(":", 1)[1]: v for k, v in self.counters.items()
                          if k.startswith("planner:")},
            "failed": self.counters.get("planner_failed", 0),
            "applying": self.applying.action.value if self.applying else None,
            "history": self.history[-20:],
            "arrival_rate_rps": m.arrival_rate_rps,
            "prefill_need": need.prefill if need else 0.0,
            "decode_need": need.decode if need else 0.0,
        }
