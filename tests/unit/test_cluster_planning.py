"""The cluster's planner settings and the loop that applies decisions: off by default,
bad settings named, profiles resolved, a failed start logged and retried, never a role's
last worker flipped away, and the decisions exported as ``planner_decisions_total``."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from splitserve.cluster.config import ClusterConfig, ClusterConfigError
from splitserve.cluster.frontends.metrics import _LoadCollector
from splitserve.cluster.planning import PlanningLoop, planner_cost_model
from splitserve.errors import ConfigError
from splitserve.router.planner import PlannerAction, PlannerDecision
from splitserve.router.router import Router
from splitserve.router.schema import InstanceRole, RouteRequest
from splitserve.router.sim.cost_model import PROFILES, CostModel


def test_planner_is_off_by_default_and_settings_are_named() -> None:
    assert ClusterConfig().planner.enabled is False
    config = ClusterConfig.from_yaml_text("planner:\n  enabled: true\n  hysteresis: 0.3\n")
    assert config.planner.enabled and config.planner.hysteresis == 0.3
    for text, match in (
        ("planner:\n  hysteresis: 1.5\n", r"planner\.hysteresis"),
        ("planner:\n  interval_s: 0\n", r"planner\.interval_s"),
        ("planner:\n  target_prefill_utilization: 2\n", r"planner\.target_prefill_utilization"),
        ("planner:\n  warp: 9\n", r"planner\.warp"),
    ):
        with pytest.raises(ClusterConfigError, match=match):
            ClusterConfig.from_yaml_text(text, source="cluster.yaml")


def test_cost_model_profiles_resolve(tmp_path: Path) -> None:
    assert planner_cost_model(ClusterConfig.local()) == PROFILES["cpu"]
    gpu = ClusterConfig.from_dict({"roles": {"prefill": {"num_gpus": 1}, "decode": {"num_gpus": 1}}})
    assert planner_cost_model(gpu) == PROFILES["a100"]
    path = tmp_path / "m.json"
    CostModel(name="mine").save(path)
    mine = ClusterConfig.local(planner={"cost_model": str(path)})
    assert planner_cost_model(mine).name == "mine"
    with pytest.raises(ConfigError, match="'h100' is neither a built-in profile"):
        planner_cost_model(ClusterConfig.local(planner={"cost_model": "h100"}))


@dataclass
class FakeHandle:
    worker_id: str
    role: str
    healthy: bool = True
    draining: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class FakeMembership:
    """The worker set, with a start that fails ``failures`` times (a fault Ray won't give us
    on demand: no resources for the new worker)."""

    def __init__(self, router: Router, failures: int) -> None:
        self.router = router
        self.workers: dict[str, FakeHandle] = {}
        self.failures = failures
        self.started: list[str] = []

    def live(self, role: str) -> list[FakeHandle]:
        return [h for h in self.workers.values() if h.role == role and h.healthy and not h.draining]

    def start_ready(self, role: str) -> FakeHandle:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("no resources for a new worker")
        handle = FakeHandle(f"new-{role}-{len(self.started)}", role)
        self.started.append(handle.worker_id)
        return handle

    def add(self, handle: FakeHandle) -> None:
        self.workers[handle.worker_id] = handle
        self.router.add_instance(handle.worker_id, {InstanceRole(handle.role)})


class FakeScaler:
    def __init__(self, membership: FakeMembership) -> None:
        self.membership = membership
        self.flights = type("Flights", (), {"num_on": staticmethod(lambda worker_id: 0)})()
        self.drained: list[str] = []

    async def drain(self, handle: FakeHandle, timeout_s: float) -> None:
        handle.draining = True
        self.membership.router.remove_instance(handle.worker_id)
        del self.membership.workers[handle.worker_id]
        self.drained.append(handle.worker_id)


def make_loop(prefill: int, decode: int, failures: int = 0) -> tuple[PlanningLoop, FakeMembership]:
    config = ClusterConfig.local(prefill, decode, planner={"enabled": True, "cooldown_s": 0},
                                 slo={"tpot_ms": 2000})
    router = Router("dualmap")
    membership = FakeMembership(router, failures)
    for i in range(prefill):
        membership.add(FakeHandle(f"p{i}", "prefill"))
    for i in range(decode):
        membership.add(FakeHandle(f"d{i}", "decode"))
    counters: collections.Counter[str] = collections.Counter()
    loop = PlanningLoop(config, membership, FakeScaler(membership), counters)  # type: ignore[arg-type]
    return loop, membership


def flip(action: PlannerAction, count: int = 1) -> PlannerDecision:
    return PlannerDecision(action, InstanceRole.PREFILL, count, 2.0, 1.0, "test")


def test_a_flip_drains_then_starts_the_other_role_and_a_failed_start_is_retried() -> None:
    loop, membership = make_loop(1, 2, failures=1)
    asyncio.run(loop.apply(flip(PlannerAction.FLIP_TO_PREFILL)))
    assert loop.scaler.drained == ["d0"]  # type: ignore[attr-defined]
    assert loop.counters["planner_failed"] == 1 and loop._owed == ["prefill"]
    assert loop.metrics().pending_actions == 1  # the planner waits for the owed worker
    asyncio.run(loop.step())
    assert membership.started == ["new-prefill-0"] and not loop._owed
    assert sorted(h.role for h in membership.workers.values()) == ["decode", "prefill", "prefill"]


def test_the_last_worker_of_a_role_is_never_flipped() -> None:
    loop, membership = make_loop(1, 2)
    asyncio.run(loop.apply(flip(PlannerAction.FLIP_TO_DECODE, count=1)))
    assert loop.scaler.drained == [] and len(membership.live("prefill")) == 1  # type: ignore[attr-defined]
    asyncio.run(loop.apply(flip(PlannerAction.FLIP_TO_PREFILL, count=5)))
    assert len(membership.live("decode")) == 1 and len(membership.live("prefill")) == 2


def test_metrics_window_comes_from_the_routers_placements() -> None:
    loop, _ = make_loop(1, 1)
    for i in range(6):
        loop.router.route(RouteRequest(f"r{i}", 600, max_output_tokens=30))
    m = loop.metrics()
    assert m.arrival_rate_rps > 0 and m.mean_output_tokens == 30
    assert m.mean_context_tokens == 615 and m.num_prefill == m.num_decode == 1
    assert m.mean_prefill_s == pytest.approx(loop.cost_model.prefill_time(600))
    assert m.prefill_backlog_s > 0


def test_decisions_are_exported_per_action() -> None:
    collector = _LoadCollector()
    collector.counters = {"planner:flip_to_decode": 2, "planner_failed": 1}
    families = {f.name: f for f in collector.collect()}
    samples = {s.labels["action"]: s.value for s in families["splitserve:planner_decisions"].samples
               if s.name.endswith("_total")}
    assert samples == {"flip_to_prefill": 0, "flip_to_decode": 2, "scale_up": 0, "scale_down": 0}
    failures = [s.value for s in families["splitserve:planner_failures"].samples
                if s.name.endswith("_total")]
    assert failures == [1]


def test_slos_the_profile_cannot_meet_are_refused_by_name() -> None:
    config = ClusterConfig.local(planner={"enabled": True, "cost_model": "a100"},
                                 slo={"tpot_ms": 1})
    with pytest.raises(ConfigError, match="TPOT SLO 0.001 s cannot be met"):
        make_loop_from(config)


def make_loop_from(config: ClusterConfig) -> PlanningLoop:
    router = Router("dualmap")
    membership = FakeMembership(router, 0)
    return PlanningLoop(config, membership, FakeScaler(membership), collections.Counter())  # type: ignore[arg-type]
