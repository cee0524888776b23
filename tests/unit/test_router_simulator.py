"""Simulator and benchmark on a small trace slice: conservation, determinism, CLI outputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitserve.errors import ConfigError
from splitserve.router.errors import UnknownPolicyError
from splitserve.router.schema import RouterConfig
from splitserve.router.sim.bench import find_capacity, main
from splitserve.router.sim.cost_model import CostModel
from splitserve.router.sim.simulator import SimConfig, Simulator, prepare_requests, simulate
from splitserve.router.sim.trace import load_trace

SLICE = Path(__file__).resolve().parents[1] / "data" / "mooncake_slice.jsonl"


@pytest.fixture(scope="module")
def requests() -> list:
    return prepare_requests(load_trace(SLICE))


def config(policy: str, scale: float = 0.5) -> SimConfig:
    return SimConfig(
        policy,
        num_instances=8,
        num_decode_instances=4,
        time_scale=scale,
        router_config=RouterConfig(ttft_slo_s=6.0),
    )


@pytest.mark.parametrize(
    "policy", ["round_robin", "least_loaded", "prefix_affinity", "kv_overlap_cost", "dualmap"]
)
def test_every_request_completes_and_loads_return_to_zero(policy: str, requests: list) -> None:
    sim = Simulator(config(policy), requests)
    result = sim.run()
    assert not np.isnan(result.ttfts_s).any() and (result.ttfts_s > 0).all()
    assert 0.0 <= result.hit_rate <= 1.0 and result.load_imbalance >= 1.0
    for load in sim.router.loads.loads.values():
        assert (
            load.num_queued_prefill_tokens,
            load.num_running_requests,
            load.num_reserved_kv_blocks,
            load.num_active_prefill_blocks,
        ) == (0, 0, 0, 0)
        assert not load.queue
    # The router's index mirrors the simulated caches exactly (KV events are complete).
    for instance_id, instance in sim.prefill.items():
        assert sim.router.index.blocks_of(instance_id) == set(instance.cache)
    assert sum(len(i.cache) for i in sim.prefill.values()) > 0


def test_simulation_is_deterministic_and_affinity_beats_round_robin(requests: list) -> None:
    first, second = simulate(config("dualmap"), requests), simulate(config("dualmap"), requests)
    assert np.array_equal(first.ttfts_s, second.ttfts_s)
    rr = simulate(config("round_robin"), requests)
    assert first.hit_rate > 2 * rr.hit_rate
    assert first.slo_attainment > rr.slo_attainment + 0.2
    assert first.request_rate_rps == rr.request_rate_rps
    faster = simulate(config("dualmap", scale=1.0), requests)
    assert faster.request_rate_rps == pytest.approx(2 * first.request_rate_rps)


def test_find_capacity_bisects_to_the_threshold() -> None:
    class Fake:
        def __init__(self, scale: float) -> None:
            self.time_scale, self.slo_attainment = scale, 1.0 if scale <= 5.3 else 0.5

    scale, at, probes = find_capacity(Fake, attainment=0.9, rel_tol=0.01)  # type: ignore[arg-type]
    assert 5.3 * 0.99 <= scale <= 5.3 and at is not None and at.time_scale == scale
    assert [p.time_scale for p in probes][:4] == [1.0, 2.0, 4.0, 8.0]
    zero, none, _ = find_capacity(lambda s: Fake(s * 1e9), min_scale=0.25)  # type: ignore[arg-type, return-value]
    assert zero == 0.0 and none is None


def test_bench_cli_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitserve.cluster.tools.cli import main as splitserve_cli

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = splitserve_cli(  # `splitserve bench router ...`
        [
            "bench",
            "router",
            "--trace",
            str(SLICE),
            "--instances",
            "4",
            "--policies",
            "dualmap,round_robin",
            "--latency-instances",
            "20",
            "--limit",
            "120",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"dualmap", "round_robin"}
    for figures in data["policies"].values():
        assert {"capacity_rps", "hit_rate", "ttft_p90_s", "ttft_p99_s"} <= set(figures)
        assert figures["capacity_rps"] > 0
    assert data["ttft_slo_s"] == pytest.approx(
        5 * CostModel().prefill_time(data["median_prompt_len"])
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "capacity_rps" in printed and "p99" in printed


def test_bench_cli_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UnknownPolicyError, match="'dual'"):
        main(["--trace", str(SLICE), "--policies", "dual"])
    with pytest.raises(ConfigError, match="--ttft-slo must be a positive"):
        main(["--trace", str(SLICE), "--ttft-slo", "0"])
    with pytest.raises(ConfigError, match="--instances"):
        main(["--trace", str(SLICE), "--instances", "0"])
    bad = tmp_path / "cm.json"
    bad.write_text('{"prefill_s_per_token": -1}')
    with pytest.raises(ConfigError, match="'prefill_s_per_token' must be positive"):
        main(["--trace", str(SLICE), "--cost-model", str(bad)])
    bad.write_text('{"warp": 9}')
    with pytest.raises(ConfigError, match=r"unknown fields \['warp'\]"):
        CostModel.load(bad)


def test_cost_model_round_trips_and_has_the_documented_shape(tmp_path: Path) -> None:
    model = CostModel()
    assert model.prefill_time(10_000) == pytest.approx(0.015 + 0.93 + 3.06e-9 * 10_000 * 5_000)
    assert model.prefill_time(0, 5000) == model.prefill_time(1, 5000)
    path = tmp_path / "m.json"
    model.save(path)
    assert CostModel.load(path) == model


def test_fit_cost_model_recovers_known_coefficients() -> None:
    from splitserve.router.sim.cost_model import fit_cost_model

    truth = CostModel(
        prefill_overhead_s=0.01,
        prefill_s_per_token=2e-5,
        prefill_s_per_token_pair=3e-9,
        decode_step_overhead_s=0.02,
        decode_s_per_kv_token=4e-8,
    )
    prefill = [(n, c, truth.prefill_time(n, c)) for c in (0, 4096) for n in (512, 2048, 8192)]
    decode = [(k, truth.decode_step_time(k)) for k in (1000, 50_000)]
    fitted = fit_cost_model(prefill, decode, name="t", kv_capacity_blocks=100)
    assert fitted.prefill_s_per_token == pytest.approx(2e-5, rel=1e-6)
    assert fitted.prefill_s_per_token_pair == pytest.approx(3e-9, rel=1e-6)
    assert fitted.decode_s_per_kv_token == pytest.approx(4e-8, rel=1e-6)
    with pytest.raises(ConfigError, match="at least 3 prefill"):
        fit_cost_model(prefill[:2], decode, name="t", kv_capacity_blocks=100)


def test_fit_cost_model_recovers_a_per_request_decode_term() -> None:
    # A CPU's decode step grows with its batch (each request's rows of the matmuls), not only
    # with the KV it reads; samples carrying their batch size fit that term too.
    from splitserve.router.sim.cost_model import fit_cost_model

    truth = CostModel(decode_step_overhead_s=5e-3, decode_s_per_seq=8e-4,
                      decode_s_per_kv_token=2.5e-6)
    prefill = [(n, 0, CostModel().prefill_time(n)) for n in (512, 2048, 8192)]
    grid = [(1, 128), (8, 512), (16, 256), (64, 128)]
    decode = [(b * c, truth.decode_step_time(b * c, b), b) for b, c in grid]
    fitted = fit_cost_model(prefill, decode, name="t", kv_capacity_blocks=100)
    assert fitted.decode_step_overhead_s == pytest.approx(5e-3, rel=1e-6)
    assert fitted.decode_s_per_seq == pytest.approx(8e-4, rel=1e-6)
    assert fitted.decode_s_per_kv_token == pytest.approx(2.5e-6, rel=1e-6)
    # Without the batch column the same steps cannot be told apart by KV alone: the 2-term
    # fit misses a batch of 64 short contexts by more than 10%.
    two = fit_cost_model(prefill, [(k, t) for k, t, _ in decode], name="t", kv_capacity_blocks=1)
    assert two.decode_s_per_seq == 0.0
    assert abs(two.decode_step_time(64 * 128) / truth.decode_step_time(64 * 128, 64) - 1) > 0.1
    # A GPU-like step (no per-request cost, a negative fit) leaves the term out, not clipped.
    flat = CostModel(decode_step_overhead_s=0.055, decode_s_per_kv_token=3e-8)
    gpu = [(b * c, flat.decode_step_time(b * c) * (1 - 1e-4 * b), b) for b, c in grid]
    fitted = fit_cost_model(prefill, gpu, name="t", kv_capacity_blocks=1)
    assert fitted.decode_s_per_seq == 0.0
    for k, t, b in gpu:
        assert fitted.decode_step_time(k, b) == pytest.approx(t, rel=0.02)


def test_a_decode_instance_prices_its_batch_per_request() -> None:
    from splitserve.router.sim.instances import DecodeInstance

    cost = CostModel(decode_step_overhead_s=5e-3, decode_s_per_seq=1e-3,
                     decode_s_per_kv_token=1e-6)
    inst = DecodeInstance("d0", cost, max_batch=8)
    for i in range(4):
        inst.join(f"r{i}", context=100, reserved=200, steps=10, now=0.0)
    # 3 steps of 4 requests from 400 KV tokens, each step 4 more
    expected = sum(cost.decode_step_time(400 + 4 * j, 4) for j in range(3))
    assert inst.steps_time(3) == pytest.approx(expected)
    assert inst.steps_within(expected * (1 + 1e-9)) == 3
    assert inst.steps_within(expected * 0.999) == 2


def test_a_stalled_instance_stops_attracting_work(requests: list) -> None:
    # p0 becomes 100x slower 20 s in. Its overdue prefill makes it look ever busier, so new
    # requests avoid it and only what had already started there suffers.
    healthy = simulate(config("dualmap"), requests)
    stalled_config = replace(config("dualmap"), slowdowns=(("p0", 20.0, 100.0),))
    sim = Simulator(stalled_config, requests)
    stalled = sim.run()
    assert int((stalled.ttfts_s > 60).sum()) <= int((healthy.ttfts_s > 60).sum()) + 1
    assert stalled.slo_attainment >= healthy.slo_attainment - 0.03
    assert sim.prefill["p0"].busy_time_s > 0
