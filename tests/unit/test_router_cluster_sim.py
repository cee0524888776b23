"""Whole-cluster simulation: decode batches in closed form, KV transfer, chunked prefill,
per-request TTFT SLOs, goodput, and the benchmark CLIs' new figures."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitserve.errors import ConfigError
from splitserve.router.policies import DualMap
from splitserve.router.router import Router
from splitserve.router.schema import InstanceRole, RouterConfig, RouteRequest
from splitserve.router.sim.bench import main as router_bench
from splitserve.router.sim.cost_model import CostModel
from splitserve.router.sim.instances import DecodeInstance
from splitserve.router.sim.simulator import SimConfig, SimRequest, Simulator, simulate

COST = CostModel(
    prefill_overhead_s=0.01,
    prefill_s_per_token=1e-4,
    prefill_s_per_token_pair=1e-9,
    decode_step_overhead_s=0.01,
    decode_s_per_kv_token=1e-6,
    kv_capacity_blocks=40,
)


def naive_decode(cost: CostModel, joins: list[tuple[float, int, int]]) -> dict[int, float]:
    """Step-by-step reference: (join time, context, steps) -> finish time per join index.

    A request that joins while a step runs is in that step (the closed form's convention).
    """
    t, running, done = 0.0, {}, {}
    pending = sorted(enumerate(joins), key=lambda x: x[1][0])
    while pending or running:
        if not running:
            t = max(t, pending[0][1][0])
        while pending and pending[0][1][0] <= t + (
            cost.decode_step_time(sum(c for c, _ in running.values())) if running else 0
        ):
            i, (_, context, steps) = pending.pop(0)
            running[i] = [context, steps]
        t += cost.decode_step_time(sum(c for c, _ in running.values()))
        for i in list(running):
            running[i][0] += 1
            running[i][1] -= 1
            if running[i][1] == 0:
                done[i] = t
                del running[i]
    return done


def test_decode_batches_in_closed_form_match_stepping() -> None:
    joins = [(0.0, 1000, 50), (0.05, 3000, 10), (0.3, 200, 80), (0.31, 500, 1), (2.0, 100, 5)]
    reference = naive_decode(COST, joins)
    decode = DecodeInstance("d", COST, max_batch=8)
    finished: dict[str, float] = {}
    events = sorted((t, i) for i, (t, _, _) in enumerate(joins))
    while events or decode.running:
        next_finish = decode.next_finish_time()
        if events and (next_finish is None or events[0][0] < next_finish):
            t, i = events.pop(0)
            decode.join(str(i), joins[i][1], 0, joins[i][2], t)
        else:
            assert next_finish is not None
            for done in decode.pop_finished():
                finished[done.request_id] = next_finish
    assert set(finished) == {str(i) for i in reference}
    for i, t in reference.items():
        assert finished[str(i)] == pytest.approx(t, rel=1e-9)


def one(prompt: int, output: int, at: float = 0.0, rid: str = "r0") -> SimRequest:
    return SimRequest(rid, at, prompt, output, ())


def test_a_lone_request_pays_prefill_transfer_and_its_decode_steps() -> None:
    config = SimConfig("round_robin", 1, 1, cost_model=COST, tpot_slo_s=1.0)
    sim = Simulator(config, [one(3000, 11)])
    result = sim.run()
    assert result.ttfts_s[0] == pytest.approx(COST.prefill_time(3000))
    steps = sum(COST.decode_step_time(3001 + k) for k in range(10))
    assert result.tpots_s[0] == pytest.approx(steps / 10)  # the transfer is not in TPOT
    finish = result.ttfts_s[0] + COST.kv_transfer_time(3000) + steps
    assert sim._finish[0] == pytest.approx(finish)  # ... but it delays the finish
    assert COST.kv_transfer_time(3000) == pytest.approx(0.002 + 3000 * 131072 / 25e9)


def test_chunked_prefill_splits_long_prompts_and_packs_short_ones() -> None:
    requests = [one(2500, 2, 0.0, "long"), one(300, 2, 0.0, "short")]
    chunk = replace(SimConfig("round_robin", 1, 1, cost_model=COST), prefill_chunk_tokens=1000)
    sim = Simulator(chunk, requests)
    result = sim.run()
    # Iterations: [long 1000], [long 1000], [long 500 + short 300].
    t1 = COST.prefill_overhead_s + 1000 * COST.prefill_s_per_token + 1e-9 * 1000 * 500
    t2 = COST.prefill_overhead_s + 1000 * COST.prefill_s_per_token + 1e-9 * 1000 * 1500
    t3 = (
        COST.prefill_overhead_s
        + 800 * COST.prefill_s_per_token
        + 1e-9 * (500 * (2000 + 250) + 300 * 150)
    )
    assert result.ttfts_s[0] == pytest.approx(t1 + t2 + t3)
    assert result.ttfts_s[1] == pytest.approx(t1 + t2 + t3)
    whole = simulate(SimConfig("round_robin", 1, 1, cost_model=COST), requests)
    assert whole.ttfts_s[1] == pytest.approx(COST.prefill_time(2500) + COST.prefill_time(300))


def test_chunked_prefill_caches_each_completed_chunk_for_later_prompts() -> None:
    # b shares a's first 4 blocks (2048 tokens) and starts in a's last iteration, packed
    # beside it: the blocks of a's finished chunks are cached by then, its last chunk's not.
    a = SimRequest("a", 0.0, 2560, 2, (1, 2, 3, 4, 5))
    b = SimRequest("b", 0.0, 2560, 2, (1, 2, 3, 4, 9))
    config = replace(SimConfig("round_robin", 1, 1, cost_model=COST), prefill_chunk_tokens=1024)
    sim = Simulator(config, [a, b])
    result = sim.run()
    assert sim._num_hit_tokens == 2048  # b: 4 blocks from a's first two iterations
    # Iterations: [a 1024], [a 1024], [a 512 + b 512 after its 2048 cached].
    t1 = COST.prefill_overhead_s + 1024 * COST.prefill_s_per_token + 1e-9 * 1024 * 512
    t2 = COST.prefill_overhead_s + 1024 * COST.prefill_s_per_token + 1e-9 * 1024 * 1536
    t3 = (
        COST.prefill_overhead_s
        + 1024 * COST.prefill_s_per_token
        + 1e-9 * 2 * 512 * (2048 + 256)
    )
    assert result.ttfts_s[0] == pytest.approx(t1 + t2 + t3)
    assert result.ttfts_s[1] == pytest.approx(t1 + t2 + t3)


def test_decode_kv_admission_queues_requests_that_do_not_fit() -> None:
    # 40 blocks x 512 = 20,480 KV tokens: two 12k-token requests cannot decode together.
    requests = [one(12_000, 50, 0.0, "a"), one(12_000, 50, 0.0, "b")]
    result = simulate(SimConfig("round_robin", 2, 1, cost_model=COST), requests)
    assert result.decode_wait_s > 0
    slower = max(result.tpots_s)
    assert slower > 1.5 * min(result.tpots_s)


def test_per_request_slo_scales_with_prompt_and_reaches_the_router(tmp_path: Path) -> None:
    config = SimConfig(
        "dualmap",
        1,
        1,
        cost_model=COST,
        router_config=RouterConfig(ttft_slo_s=0.5),
        ttft_slo_per_1k_s=0.3,
    )
    assert config.ttft_slo_of(1000) == 0.5 and config.ttft_slo_of(10_000) == pytest.approx(3.0)
    result = simulate(config, [one(10_000, 2, 0.0, "a"), one(100, 2, 0.0, "b")])
    assert list(result.ttft_slos_s) == [pytest.approx(3.0), 0.5]
    # DualMap keeps its hash candidate when the request's own (long) SLO holds there.
    router = Router("dualmap", RouterConfig(ttft_slo_s=0.1, default_prefill_rate_tps=1000))
    for i in range(4):
        router.add_instance(f"p{i}", {InstanceRole.PREFILL})
    router.add_instance("d0", {InstanceRole.DECODE})
    assert isinstance(router.policy, DualMap)
    blocks = tuple(range(1, 5))
    strict = router.route(RouteRequest("x", 2048, blocks, max_output_tokens=1))
    assert strict.fallback or strict.predicted_ttft_s > 0.1
    relaxed = router.route(RouteRequest("y", 2048, blocks, max_output_tokens=1, ttft_slo_s=60.0))
    assert relaxed.prefill_instance in relaxed.candidates and not relaxed.fallback
    with pytest.raises(Exception, match="ttft_slo_s"):
        RouteRequest("z", 10, ttft_slo_s=-1.0)


def test_goodput_counts_tpot_and_a_failing_run_stops_early() -> None:
    requests = [one(2000, 20, i * 0.01, f"r{i}") for i in range(60)]
    loose = simulate(SimConfig("round_robin", 2, 1, cost_model=COST, tpot_slo_s=10.0), requests)
    assert loose.goodput_attainment == loose.slo_attainment
    tight = simulate(SimConfig("round_robin", 2, 1, cost_model=COST, tpot_slo_s=0.011), requests)
    assert tight.goodput_attainment < tight.slo_attainment
    strict = SimConfig(
        "round_robin",
        1,
        1,
        cost_model=COST,
        router_config=RouterConfig(ttft_slo_s=0.3),
        stop_below_attainment=0.9,
    )
    sim = Simulator(strict, requests)
    stopped = sim.run()
    assert sim.stopped_early and np.isnan(stopped.ttfts_s).any()
    assert stopped.slo_attainment < 0.9


def test_router_bench_reports_goodput_and_per_request_slo(tmp_path: Path) -> None:
    from splitserve.router.sim.tracegen import PRESETS, PhaseSpec, generate, write_trace

    spec = replace(PRESETS["chat"], phases=(PhaseSpec(duration_s=60, rate_rps=3),), seed=1)
    trace = tmp_path / "t.jsonl"
    write_trace(generate(spec), trace)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = [
        "--trace",
        str(trace),
        "--instances",
        "2",
        "--policies",
        "dualmap,round_robin",
        "--latency-instances",
        "0",
        "--ttft-slo-per-1k-tokens",
        "auto",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert router_bench(args) == 0
    data = json.loads(out.read_text())
    assert data["ttft_slo_per_1k_tokens_s"] > 0 and data["tpot_slo_s"] > 0
    for figures in data["policies"].values():
        assert 0 < figures["goodput_rps"] <= figures["capacity_rps"] * (1 + 1e-9)
        assert {"tpot_p90_s", "queue_wait_s", "hit_rate"} <= set(figures)
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="--ttft-slo-per-1k-tokens"):
        router_bench([*args[:8], "--ttft-slo-per-1k-tokens", "-2"])
    with pytest.raises(ConfigError, match="--tpot-slo 0.001"):
        router_bench([*args[:8], "--tpot-slo", "0.001"])
    assert math.isfinite(data["ttft_slo_s"])


def test_a_request_moved_twice_in_one_rebalance_is_applied_in_order() -> None:
    from splitserve.router.schema import Migration

    sim = Simulator(SimConfig("dualmap", 3, 1, cost_model=COST), [one(100, 2)])
    a, b, c = sim.prefill
    sim.prefill[a].queue["r0"] = sim.requests[0]
    moves = [Migration("r0", a, b, 0.1), Migration("r0", b, c, 0.1)]
    sim.router.rebalance = lambda: moves  # type: ignore[method-assign]
    sim._queued_at["r0"] = 0.0
    sim._rebalance(None)
    assert sim.prefill[c].active and not sim.prefill[b].active and not sim.prefill[b].queue


def test_prefill_cache_evicts_a_prompts_tail_before_its_head() -> None:
    """As the engine frees a request's blocks tail first, the simulated prefix cache evicts
    the last block of a prompt first: what stays is still a usable prefix. (Inserting head
    first would evict block 1 and leave 2 and 3 cached behind a missing head.)"""
    from splitserve.router.sim.instances import PrefillInstance

    inst = PrefillInstance("p0", capacity_blocks=3)
    assert inst.store([1, 2, 3]) == ([1, 2, 3], [])
    assert inst.store([9]) == ([9], [3])
    assert inst.cached_prefix_blocks([1, 2, 3]) == 2
    # the hit renews 1 and 2 (head last): 9 goes first now, then the hit's tail 2 before 1
    assert inst.store([7]) == ([7], [9])
    assert inst.store([8]) == ([8], [2])
    assert inst.cached_prefix_blocks([1, 2]) == 1
