"""The SLO planner: its decision rule (hysteresis, cooldown, never a role at zero), its
replay in the simulator on shifting and stationary loads, and ``splitserve bench planner``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from splitserve.errors import ConfigError
from splitserve.router.planner import (
    Planner,
    PlannerAction,
    PlannerConfig,
    PlannerMetrics,
)
from splitserve.router.schema import InstanceRole, RouterConfig
from splitserve.router.sim.cost_model import CostModel
from splitserve.router.sim.planner_bench import main as planner_bench
from splitserve.router.sim.simulator import SimConfig, Simulator, prepare_requests
from splitserve.router.sim.tracegen import PRESETS, PhaseSpec, generate, write_trace

COST = CostModel()


def metrics(
    p: int, d: int, rate: float, prompt: int, output: int, now: float = 100.0, **kw: object
) -> PlannerMetrics:
    return PlannerMetrics(
        now=now,
        num_prefill=p,
        num_decode=d,
        arrival_rate_rps=rate,
        mean_prefill_s=COST.prefill_time(prompt),
        mean_context_tokens=prompt + output / 2,
        mean_output_tokens=output,
        **kw,  # type: ignore[arg-type]
    )


def planner(**kw: object) -> Planner:
    return Planner(PlannerConfig(enabled=True, **kw), COST, 2.0, 0.04)  # type: ignore[arg-type]


def test_needs_follow_the_cost_model() -> None:
    plan = planner()
    need = plan.needs(metrics(4, 4, 2.0, 8192, 2))
    assert need.prefill == pytest.approx(2.0 * COST.prefill_time(8192) / 0.7)
    per_instance = plan.decode_tokens_per_s(8192 + 1)
    assert need.decode == pytest.approx(2.0 * 1 / per_instance)
    # The TPOT target bounds the batch: a step at that batch takes 0.8 x the SLO.
    ctx = 2000  # below the batch cap (256) and the KV bound (230)
    batch = (0.8 * 0.04 - COST.decode_step_overhead_s) / (COST.decode_s_per_kv_token * ctx)
    assert plan.decode_tokens_per_s(ctx) == pytest.approx(
        batch / COST.decode_step_time(int(batch * ctx))
    )


def test_flips_toward_the_pressed_role_then_holds() -> None:
    plan = planner(cooldown_s=20)
    prefill_heavy = metrics(2, 6, 3.0, 8192, 16)
    [decision] = plan.decide(prefill_heavy)
    assert decision.action is PlannerAction.FLIP_TO_PREFILL
    assert decision.role is InstanceRole.PREFILL and decision.count >= 1
    assert decision.pressure_after <= decision.pressure_before * 0.9
    p = 2 + decision.count
    # Cooldown: nothing for 20 s, even if asked.
    assert plan.decide(replace(prefill_heavy, num_prefill=p, num_decode=8 - p, now=110)) == []
    # After the flip, the same load asks for nothing more (no reverse: it was worse).
    settled = replace(prefill_heavy, num_prefill=p, num_decode=8 - p, now=200)
    assert plan.decide(settled) == []
    # While a flip is being applied (a worker drains), nothing either.
    assert planner().decide(replace(prefill_heavy, pending_actions=1)) == []


def test_never_leaves_a_role_empty_and_ignores_small_imbalances() -> None:
    plan = planner()
    [decision] = plan.decide(metrics(2, 2, 8.0, 16_000, 2))  # prefill needs everything
    assert decision.count == 1  # 3:1, never 4:0
    assert planner().decide(metrics(1, 1, 0.01, 512, 16)) == []  # below min_pressure
    # An improvement smaller than the hysteresis margin is not worth a flip.
    plan = planner(hysteresis=0.5)
    assert plan.decide(metrics(6, 2, 3.0, 8192, 16)) == []


def test_scales_within_bounds_when_allowed() -> None:
    plan = planner(max_instances=6, min_instances=2)
    [up] = plan.decide(metrics(1, 1, 3.0, 8192, 16))
    assert up.action in (PlannerAction.SCALE_UP, PlannerAction.FLIP_TO_PREFILL)
    plan = planner(max_instances=6, min_instances=2)
    [down] = plan.decide(metrics(3, 3, 0.05, 1024, 64))
    assert down.action is PlannerAction.SCALE_DOWN and down.count == 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"hysteresis": 1.5}, "hysteresis must be in"),
        ({"interval_s": 0}, "interval_s must be a positive"),
        ({"cooldown_s": -1}, "cooldown_s must be"),
        ({"min_instances": 1}, "min_instances must be >= 2"),
        ({"max_instances": 3, "min_instances": 4}, r"max_instances \(3\)"),
        ({"target_prefill_utilization": 0}, "target_prefill_utilization"),
    ],
)
def test_bad_settings_name_the_value(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PlannerConfig(**kw)  # type: ignore[arg-type]


def test_an_unmeetable_tpot_slo_is_refused() -> None:
    with pytest.raises(ConfigError, match="TPOT SLO 0.001 s cannot be met"):
        Planner(PlannerConfig(), COST, 1.0, 0.001)


def small_shift(seed: int = 0) -> list:
    spec = replace(
        PRESETS["shifting"],
        phases=(
            PhaseSpec(duration_s=120, rate_rps=5.0, user_tokens=8192, output_tokens=16),
            PhaseSpec(duration_s=120, rate_rps=5.0, user_tokens=512, output_tokens=1024),
        ),
        seed=seed,
    )
    return prepare_requests(generate(spec))


def test_simulated_planner_follows_a_shifting_mix_and_loses_nothing() -> None:
    requests = small_shift()
    config = SimConfig(
        "dualmap",
        2,
        4,
        router_config=RouterConfig(ttft_slo_s=5.0),
        tpot_slo_s=0.04,
        prefill_chunk_tokens=8192,
        planner=PlannerConfig(enabled=True, cooldown_s=10, window_s=20),
    )
    sim = Simulator(config, requests)
    result = sim.run()
    actions = [a for _, a in result.planner_actions]
    assert "flip_to_prefill" in actions and "flip_to_decode" in actions
    first_decode = actions.index("flip_to_decode")
    assert all(a == "flip_to_prefill" for a in actions[:first_decode])  # phase 1 first
    assert [t for t, a in result.planner_actions if a == "flip_to_decode"][0] > 100
    assert len(sim.prefill) + len(sim.decode) == 6 and sim.prefill and sim.decode
    assert not any(r != r for r in result.ttfts_s) and (result.tpots_s >= 0).all()
    for load in sim.router.loads.loads.values():
        assert (load.num_running_requests, load.num_reserved_kv_blocks) == (0, 0)
    fixed = Simulator(replace(config, planner=None), requests).run()
    assert result.goodput_attainment > fixed.goodput_attainment


def test_stationary_load_does_not_oscillate() -> None:
    spec = replace(PRESETS["stationary"], phases=(PhaseSpec(300, 4.0, 2048, 256),), seed=3)
    requests = prepare_requests(generate(spec))
    config = SimConfig(
        "dualmap",
        4,
        4,
        router_config=RouterConfig(ttft_slo_s=5.0),
        tpot_slo_s=0.04,
        planner=PlannerConfig(enabled=True, cooldown_s=5, interval_s=2, window_s=20),
    )
    actions = [a for _, a in Simulator(config, requests).run().planner_actions]
    changes = sum(1 for a, b in zip(actions, actions[1:], strict=False) if a != b)
    assert changes <= 1, actions


def test_bench_planner_json_has_exactly_the_issue_keys(tmp_path: Path) -> None:
    trace = tmp_path / "shift.jsonl"
    spec = replace(
        PRESETS["shifting"],
        phases=(PhaseSpec(60, 2.0, 8192, 16), PhaseSpec(60, 2.0, 512, 512)),
    )
    write_trace(generate(spec), trace)
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    from splitserve.cluster.tools.cli import main as cli

    rc = cli(
        [
            "bench",
            "planner",
            "--trace",
            str(trace),
            "--instances",
            "3",
            "--ttft-slo-per-1k-tokens",
            "auto",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {"fixed", "best_fixed", "planner_rps", "ratio_vs_best_fixed"}
    assert set(data["fixed"]) == {"1:2", "2:1"}
    assert data["best_fixed"] == max(data["fixed"], key=data["fixed"].get)
    assert data["ratio_vs_best_fixed"] == pytest.approx(
        data["planner_rps"] / data["fixed"][data["best_fixed"]]
    )
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_planner_rejects_bad_input(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(generate(replace(PRESETS["stationary"], phases=(PhaseSpec(20, 1.0),))), trace)
    with pytest.raises(ConfigError, match="--instances 1 is infeasible"):
        planner_bench(["--trace", str(trace), "--instances", "1"])
    with pytest.raises(ConfigError, match="TTFT SLO 0.010 s cannot be met"):
        planner_bench(["--trace", str(trace), "--instances", "2", "--ttft-slo", "0.01"])
    with pytest.raises(ConfigError, match="planner hysteresis"):
        planner_bench(["--trace", str(trace), "--instances", "2", "--planner-hysteresis", "2"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(trace.read_text().splitlines()[0] + "\n{not json\n")
    from splitserve.router.errors import TraceFormatError

    with pytest.raises(TraceFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        planner_bench(["--trace", str(bad), "--instances", "2"])
