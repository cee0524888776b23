"""The bench's workloads, arrivals and report, without a server."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from splitserve.cluster.tools.bench import (
    RequestResult,
    arrival_offsets,
    check_loopback,
    format_report,
    mooncake_dataset,
    parse_goodput,
    prefix_repetition_dataset,
    random_dataset,
    summarize,
)

TRACE = Path(__file__).resolve().parents[1] / "data" / "mooncake_slice.jsonl"


def test_random_dataset_lengths() -> None:
    reqs = random_dataset(20, 50, 10, 0.5, random.Random(0))
    assert all(25 <= len(r.prompt) <= 75 and 5 <= r.output_len <= 15 for r in reqs)
    assert (
        random_dataset(3, 8, 2, 0.0, random.Random(1))[0].prompt
        == random_dataset(3, 8, 2, 0.0, random.Random(1))[0].prompt
    )


def test_prefix_repetition_shares_prefixes() -> None:
    reqs = prefix_repetition_dataset(12, 16, 4, 3, 5, random.Random(0))
    assert len({tuple(r.prompt[:16]) for r in reqs}) == 3
    assert all(len(r.prompt) == 20 for r in reqs)


def test_mooncake_trace_keeps_prefix_sharing_and_times() -> None:
    reqs = mooncake_dataset(
        TRACE, 50, block_tokens=4, max_input_len=10_000, max_output_len=64, speedup=2.0
    )
    rows = [json.loads(line) for line in TRACE.read_text().splitlines()[:50]]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx((rows[1]["timestamp"] - rows[0]["timestamp"]) / 2000)
    for req, row in zip(reqs, rows, strict=True):
        scaled = max(1, row["input_length"] * 4 // 512)
        assert len(req.prompt) == min(scaled, len(row["hash_ids"]) * 4)
        assert req.output_len == min(row["output_length"], 64)
    # two rows that start with the same hash block start with the same tokens
    first = {}
    for req, row in zip(reqs, rows, strict=True):
        key = row["hash_ids"][0]
        if key in first and len(req.prompt) >= 4 and len(first[key]) >= 4:
            assert req.prompt[:4] == first[key][:4]
        first.setdefault(key, req.prompt)


def test_gamma_arrivals_have_the_requested_rate() -> None:
    offsets = arrival_offsets(4000, rate=10.0, burstiness=0.5, rng=np.random.default_rng(0))
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1] / len(offsets) == pytest.approx(0.1, rel=0.1)
    assert arrival_offsets(3, float("inf"), 1.0, np.random.default_rng(0)) == [0.0, 0.0, 0.0]


def test_summary_tpot_and_goodput() -> None:
    results = [
        RequestResult(True, 10, output_len=5, ttft=0.1, e2e=0.5, itl=[0.1] * 4),
        RequestResult(True, 10, output_len=5, ttft=1.0, e2e=3.0, itl=[0.5] * 4),
        RequestResult(False, 10, error="HTTP 500"),
    ]
    report = summarize(results, 2.0, [50, 99], parse_goodput(["ttft:500", "tpot:200"]))
    assert report["completed"] == 2 and report["failed"] == 1
    assert report["mean_tpot_ms"] == pytest.approx((100 + 500) / 2)
    assert report["request_goodput"] == pytest.approx(0.5)  # only the first meets both SLOs
    assert report["output_throughput"] == pytest.approx(5.0)
    assert "P99 TTFT (ms):" in format_report(report)


def test_only_loopback_targets() -> None:
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000")
    with pytest.raises(SystemExit, match="loopback"):
        check_loopback("http://10.1.2.3:8000")
    with pytest.raises(SystemExit):
        parse_goodput(["latency:5"])


def test_serve_bench_rounds_take_the_median() -> None:
    """bench/serve_pd_vs_colocated.py --rounds: each figure is the median of the runs."""
    from bench.serve_pd_vs_colocated import median_result, ratios

    runs = [{"output_throughput": 70.0, "median_tpot_ms": 650.0, "model": "smollm2"},
            {"output_throughput": 90.0, "median_tpot_ms": 500.0, "model": "smollm2"},
            {"output_throughput": 80.0, "median_tpot_ms": 520.0, "model": "smollm2"}]
    med = median_result(runs)
    assert med == {"output_throughput": 80.0, "median_tpot_ms": 520.0, "model": "smollm2"}
    base = {"output_throughput": 100.0, "request_throughput": 2.0, "median_tpot_ms": 400.0,
            "p90_tpot_ms": 500.0, "median_ttft_ms": 1000.0}
    got = ratios({"default": {**base, "output_throughput": 95.0, "median_tpot_ms": 500.0},
                  "single-engine": base})
    assert got["output_throughput"] == pytest.approx(0.95)
    assert got["median_tpot"] == pytest.approx(0.8)  # single-engine / default: < 1 is slower


def test_serve_bench_cpu_split_counts_the_busiest_threads_as_the_engine_team() -> None:
    """bench/serve_pd_vs_colocated.py: the ``cores`` busiest threads over the load are the
    engine's team; every other thread's CPU is summed by process, as % of a core."""
    from bench.serve_pd_vs_colocated import cpu_split, median_result

    before = {(10, 10): ("DecodeWorker", 5.0), (10, 11): ("DecodeWorker", 5.0),
              (10, 12): ("DecodeWorker", 1.0), (20, 20): ("raylet", 2.0),
              (30, 30): ("cli", 0.5), (30, 31): ("cli", 0.1)}
    after = {(10, 10): ("DecodeWorker", 24.0), (10, 11): ("DecodeWorker", 23.5),
             (10, 12): ("DecodeWorker", 1.2), (20, 20): ("raylet", 2.4),
             (30, 30): ("cli", 0.8), (30, 31): ("cli", 0.2),
             (40, 40): ("log_monitor.py", 0.1)}  # started during the load: all of it counts
    got = cpu_split(before, after, wall_s=20.0, cores=2)
    assert got["engine_team_pct"] == pytest.approx(100 * 37.5 / 40)
    assert got["others_pct_of_a_core"] == pytest.approx(100 * 1.1 / 20)
    assert got["others_by_process"] == pytest.approx(
        {"raylet": 2.0, "cli": 2.0, "DecodeWorker": 1.0, "log_monitor.py": 0.5})
    assert list(got["others_by_process"])[0] in ("raylet", "cli")  # largest first
    runs = [{"output_throughput": 1.0, "cpu": {**got, "engine_team_pct": p}} for p in (90, 80, 95)]
    assert median_result(runs)["cpu"]["engine_team_pct"] == 90


def test_serve_bench_cpu_sampler_splits_over_the_busy_intervals_only() -> None:
    """The load tool's start-up (server idle) and the tail after the load are left out."""
    from bench.serve_pd_vs_colocated import CpuSampler

    def snap(team: float, other: float) -> dict[tuple[int, int], tuple[str, float]]:
        return {(1, 1): ("w", team), (1, 2): ("w", team), (2, 2): ("raylet", other)}

    sampler = CpuSampler(pid=0)  # never started: samples set by hand
    sampler.samples = [(0.0, snap(0.0, 0.0)), (10.0, snap(0.0, 0.5)),  # tool start-up
                       (11.0, snap(0.9, 0.55)), (12.0, snap(1.8, 0.6)),  # the load
                       (13.0, snap(1.8, 0.65))]  # done
    got = sampler.split(cores=2)
    assert got["wall_s"] == pytest.approx(2.0)  # 10 s -> 12 s
    assert got["engine_team_pct"] == pytest.approx(90.0)
    assert got["others_pct_of_a_core"] == pytest.approx(5.0)  # 0.1 s in 2 s, not 0.6 in 12


def test_router_calibrate_records_the_engines_formats_and_fits_per_request_steps(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/router_calibrate.py: --measure-splitserve runs the engine in the formats asked for
    and says which (the profile's name carries them); --fit prices decode steps per request."""
    import bench.router_calibrate as cal
    from splitserve.router.sim.cost_model import CostModel

    monkeypatch.setattr(cal, "SPLITSERVE_PREFILL_GRID", [(16, 0), (32, 0), (16, 32), (32, 32)])
    monkeypatch.setattr(cal, "SPLITSERVE_DECODE_GRID", [(1, 16), (2, 48), (4, 8)])
    timings = tmp_path / "t.jsonl"
    assert cal.main(["--measure-splitserve", str(timings), "--model", str(tiny_model_dir),
                     "--threads", "1", "--quantization", "int8"]) == 0
    rows = [json.loads(line) for line in timings.read_text().splitlines()]
    device = rows[0]
    assert device["kind"] == "device" and device["threads"] == 1
    assert device["quantization"] == "int8" and device["dtype"] == "float32"
    assert any(k.startswith("int8") for k in device["weight_formats"])
    assert device["kv_bytes_per_token"] % 4 == 0  # float32 KV: 4 bytes an element
    assert [(r["batch"], r["context"]) for r in rows if r["kind"] == "decode"] == [
        (1, 16), (2, 48), (4, 8)]
    # The fit, on timings made from a known profile with a per-request decode cost.
    truth = CostModel(prefill_overhead_s=0.01, prefill_s_per_token=5e-4,
                      prefill_s_per_token_pair=1e-6, decode_step_overhead_s=5e-3,
                      decode_s_per_seq=8e-4, decode_s_per_kv_token=2.5e-6)
    made = [device]
    made += [{**r, "seconds": truth.prefill_time(r["new"], r["cached"])}
             for r in rows if r["kind"] == "prefill"]
    made += [{**r, "seconds": truth.decode_step_time(r["kv_tokens"], r["batch"])}
             for r in rows if r["kind"] == "decode"]
    timings.write_text("".join(json.dumps(r) + "\n" for r in made))
    profile = tmp_path / "p.json"
    assert cal.main(["--fit", str(timings), "--out", str(profile)]) == 0
    fitted = CostModel.load(profile)
    assert fitted.decode_s_per_seq == pytest.approx(8e-4, rel=1e-6)
    assert fitted.decode_s_per_kv_token == pytest.approx(2.5e-6, rel=1e-6)
    assert fitted.prefill_s_per_token == pytest.approx(5e-4, rel=1e-6)
    assert fitted.name.startswith(f"cpu/{tiny_model_dir}/int8 (int8") and "/1 thread/" in fitted.name
    assert fitted.kv_bytes_per_token == device["kv_bytes_per_token"]
