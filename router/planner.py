"""The SLO planner: how many prefill and decode workers, decided from live metrics.

Owns: ``PlannerConfig`` (validated settings), ``PlannerMetrics`` (what the cluster or
the simulator measured over the last window), ``PlannerDecision`` and the decision rule
(``Planner.decide``). Must not: start, stop or flip workers (the cluster's
``planning`` module and the simulator apply decisions), import torch or Ray, or sleep.

The rule (Dynamo's SLA planner and DistServe's placement search, reduced to a per-role
pressure): from the window's arrival rate and request shape, and a ``CostModel``,

- prefill need ``P* = rate * prefill seconds per request / target utilization``, plus the
  instances that would drain the queued backlog within one window;
- decode need ``D* = rate * (output tokens - 1) / tokens/s one decode instance sustains
  at the TPOT target`` (the largest batch whose step time is ``tpot_target_fraction`` of
  the TPOT SLO, bounded by KV capacity and the batch cap);
- pressure of a role = need / instances. The bottleneck is the larger pressure.

Role flips (workers move from the less to the more pressed role, draining first; as many
as reach the split of the same total with the lowest bottleneck) or a scale step are taken
only when they lower the bottleneck by at least ``hysteresis`` (relative), never within
``cooldown_s`` of the previous action, never while one is still being applied, and never
leave a role with zero instances. Because a flip must strictly
improve the bottleneck by a margin, its reverse cannot (the state it returns to was worse
by that margin), so a stationary load converges instead of oscillating.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from splitserve.errors import ConfigError
from splitserve.router.schema import InstanceRole
from splitserve.router.sim.cost_model import CostModel


class PlannerAction(enum.StrEnum):
    """What a decision asks for (the metric label of ``planner_decisions_total``)."""

    FLIP_TO_PREFILL = "flip_to_prefill"
    FLIP_TO_DECODE = "flip_to_decode"
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """Planner settings (``ClusterConfig.planner``; all times in seconds)."""

    enabled: bool = False
    """Off by default: the cluster keeps the roles it was started with."""
    interval_s: float = 5.0
    """How often the planner decides."""
    window_s: float = 30.0
    """Metrics window: arrival rate and request shape over the last ``window_s``."""
    cooldown_s: float = 20.0
    """No action within this long of the previous one."""
    hysteresis: float = 0.1
    """An action must lower the bottleneck pressure by at least this fraction."""
    min_pressure: float = 0.3
    """Below this bottleneck pressure the split does not matter: no flips."""
    target_prefill_utilization: float = 0.7
    """Prefill busy fraction the planner sizes for (queueing keeps TTFT within SLO below it)."""
    tpot_target_fraction: float = 0.8
    """Decode is sized so a step takes at most this fraction of the TPOT SLO."""
    scale_down_pressure: float = 0.25
    """Scale down a role when the bottleneck without that instance would stay below this."""
    min_instances: int = 2
    """Fewest prefill + decode instances (scale-down floor; at least one per role)."""
    max_instances: int = 0
    """Most prefill + decode instances (0: as many as at start: flips only)."""
    max_decode_batch: int = 256
    """Decode batch cap assumed for a decode instance."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "window_s", "tpot_target_fraction"):
            _positive(name, getattr(self, name))
        for name in ("cooldown_s", "min_pressure", "scale_down_pressure"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"planner {name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.hysteresis < 1:
            raise ConfigError(f"planner hysteresis must be in [0, 1), got {self.hysteresis!r}")
        if not 0 < self.target_prefill_utilization <= 1:
            raise ConfigError(
                "planner target_prefill_utilization must be in (0, 1], got "
                f"{self.target_prefill_utilization!r}"
            )
        if self.tpot_target_fraction > 1:
            raise ConfigError(
                f"planner tpot_target_fraction must be <= 1, got {self.tpot_target_fraction!r}"
            )
        if self.min_instances < 2:
            raise ConfigError(
                f"planner min_instances must be >= 2 (one per role), got {self.min_instances!r}"
            )
        if self.max_instances and self.max_instances < self.min_instances:
            raise ConfigError(
                f"planner max_instances ({self.max_instances}) must be 0 or >= min_instances "
                f"({self.min_instances})"
            )
        if self.max_decode_batch < 1:
            raise ConfigError(
                f"planner max_decode_batch must be >= 1, got {self.max_decode_batch!r}"
            )


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"planner {name} must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True)
class PlannerMetrics:
    """One window's measurements."""

    now: float
    num_prefill: int
    """Prefill instances serving (not draining)."""
    num_decode: int
    arrival_rate_rps: float
    mean_prefill_s: float
    """Mean prefill compute seconds per request (after prefix-cache hits)."""
    mean_context_tokens: float
    """Mean prompt + half the output: the KV a decoding request holds on average."""
    mean_output_tokens: float
    prefill_backlog_s: float = 0.0
    """Queued prefill seconds summed over the prefill instances."""
    pending_actions: int = 0
    """Decisions still being applied (workers draining); the planner waits for them."""
    prefill_requests: int = 0
    """Requests queued or prefilling (a role with requests is never scaled to zero)."""
    decode_requests: int = 0


@dataclass(frozen=True, slots=True)
class PlannerDecision:
    action: PlannerAction
    role: InstanceRole
    """The role that gains (flip, scale up) or loses (scale down) instances."""
    count: int
    """How many instances flip or scale (flips may move several at once to the best split)."""
    pressure_before: float
    pressure_after: float
    reason: str


@dataclass(frozen=True, slots=True)
class RoleNeeds:
    prefill: float
    decode: float


class Planner:
    """Decides per window; holds only the time of its last action."""

    def __init__(
        self,
        config: PlannerConfig,
        cost_model: CostModel,
        ttft_slo_s: float,
        tpot_slo_s: float,
    ) -> None:
        _positive("ttft_slo_s", ttft_slo_s)
        if not tpot_slo_s > 0:
            raise ConfigError(f"planner tpot_slo_s must be positive, got {tpot_slo_s!r}")
        one_step = cost_model.decode_step_time(1)
        if math.isfinite(tpot_slo_s) and one_step > tpot_slo_s:
            raise ConfigError(
                f"TPOT SLO {tpot_slo_s} s cannot be met: one decode step of a single request "
                f"takes {one_step:.4f} s under cost model {cost_model.name!r}"
            )
        self.config = config
        self.cost_model = cost_model
        self.ttft_slo_s = ttft_slo_s
        self.tpot_slo_s = tpot_slo_s
        self.last_action_at = -math.inf
        self.decisions: list[PlannerDecision] = []

    def needs(self, m: PlannerMetrics) -> RoleNeeds:
        """Fractional instances each role needs for the window's load."""
        prefill = m.arrival_rate_rps * m.mean_prefill_s / self.config.target_prefill_utilization
        prefill += m.prefill_backlog_s / self.config.window_s
        per_instance = self.decode_tokens_per_s(m.mean_context_tokens)
        decode = m.arrival_rate_rps * max(0.0, m.mean_output_tokens - 1) / per_instance
        return RoleNeeds(prefill, decode)

    def decode_tokens_per_s(self, context_tokens: float) -> float:
        """Output tokens/s one decode instance sustains with steps at the TPOT target."""
        cm, ctx = self.cost_model, max(1.0, context_tokens)
        batch = float(self.config.max_decode_batch)
        batch = min(batch, max(1.0, cm.kv_capacity_tokens / ctx))
        per_request = cm.decode_s_per_seq + cm.decode_s_per_kv_token * ctx
        if math.isfinite(self.tpot_slo_s) and per_request > 0:
            budget = self.config.tpot_target_fraction * self.tpot_slo_s - cm.decode_step_overhead_s
            batch = min(batch, max(1.0, budget / per_request))
        return batch / cm.decode_step_time(int(batch * ctx), batch)

    def decide(self, m: PlannerMetrics) -> list[PlannerDecision]:
        """At most one decision per call; none during cooldown or while one is applied."""
        if m.pending_actions or m.now - self.last_action_at < self.config.cooldown_s:
            return []
        if m.num_prefill < 1 or m.num_decode < 1 or m.arrival_rate_rps <= 0:
            return []
        need = self.needs(m)
        decision = self._best_move(need, m)
        if decision is None:
            return []
        self.last_action_at = m.now
        self.decisions.append(decision)
        return [decision]

    def _best_move(self, need: RoleNeeds, m: PlannerMetrics) -> PlannerDecision | None:
        """The split (same total) with the lowest bottleneck, if it beats now by the margin;
        else one scale-up step of the bottleneck role; else a scale-down step."""
        p, d, cfg = m.num_prefill, m.num_decode, self.config
        now = _pressure(need, p, d)
        if now < cfg.min_pressure:
            return self._scale_down(need, m, now)
        total = p + d
        target = min(range(1, total), key=lambda q: (_pressure(need, q, total - q), abs(q - p)))
        after = _pressure(need, target, total - target)
        if target != p and after <= now * (1 - cfg.hysteresis):
            action, role = _FLIP_TO_PREFILL if target > p else _FLIP_TO_DECODE
            return PlannerDecision(action, role, abs(target - p), now, after, _reason(need, p, d))
        if cfg.max_instances and total < cfg.max_instances:
            role = (
                InstanceRole.PREFILL if need.prefill / p >= need.decode / d else InstanceRole.DECODE
            )
            grown = (p + 1, d) if role is InstanceRole.PREFILL else (p, d + 1)
            after = _pressure(need, *grown)
            if after <= now * (1 - cfg.hysteresis):
                return PlannerDecision(
                    PlannerAction.SCALE_UP, role, 1, now, after, _reason(need, p, d)
                )
        return self._scale_down(need, m, now)

    def _scale_down(self, need: RoleNeeds, m: PlannerMetrics, now: float) -> PlannerDecision | None:
        p, d, cfg = m.num_prefill, m.num_decode, self.config
        if not cfg.max_instances or p + d <= cfg.min_instances:
            return None
        options = []
        if p > 1:
            options.append((_pressure(need, p - 1, d), InstanceRole.PREFILL))
        if d > 1:
            options.append((_pressure(need, p, d - 1), InstanceRole.DECODE))
        if not options:
            return None
        after, role = min(options, key=lambda o: o[0])
        if after >= cfg.scale_down_pressure:
            return None
        return PlannerDecision(PlannerAction.SCALE_DOWN, role, 1, now, after, _reason(need, p, d))


_FLIP_TO_DECODE = (PlannerAction.FLIP_TO_DECODE, InstanceRole.DECODE)
_FLIP_TO_PREFILL = (PlannerAction.FLIP_TO_PREFILL, InstanceRole.PREFILL)


def _pressure(need: RoleNeeds, prefill: int, decode: int) -> float:
    return max(need.prefill / prefill, need.decode / decode)


def _reason(need: RoleNeeds, p: int, d: int) -> str:
    return (
        f"prefill needs {need.prefill:.2f} of {p} instances, decode needs {need.decode:.2f} of {d}"
    )
