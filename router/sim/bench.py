"""The router benchmark: capacity and goodput of every policy, in whole-cluster simulation.

Owns: ``splitserve bench router`` (``main(argv)``; the cluster CLI delegates to it and
``bench/router_sim.py`` runs it), the capacity search, the table, the JSON file, the PNG
of SLO attainment against request rate, and the decision-latency measurement at 1,000
instances. Must not: place requests itself (the simulator drives the real router).

Effective capacity: the highest arrival rate (trace rate x time scale) at which at least
``--attainment`` of requests (default 90%) meet the TTFT SLO, found by doubling then
bisection on the time scale. Goodput (DistServe): the same with requests that meet both
the TTFT and the TPOT SLO. Without ``--ttft-slo`` the SLO is 5x the idle TTFT of the
trace's median-length request under the cost model (DistServe's SLO-scale convention);
with ``--ttft-slo-per-1k-tokens X`` each request's SLO is ``max(fixed, X * prompt / 1000)``
(``auto``: 5x the idle TTFT per 1k tokens of the median request), so traces whose long
prompts cannot meet one fixed SLO even when idle still measure something. Without
``--tpot-slo`` the TPOT SLO is 5x an idle decode step at the median context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from splitserve.errors import ConfigError
from splitserve.router.policies import create_policy
from splitserve.router.schema import RouterConfig
from splitserve.router.sim.cost_model import CostModel
from splitserve.router.sim.simulator import (
    SimConfig,
    SimRequest,
    SimResult,
    prepare_requests,
    simulate,
)
from splitserve.router.sim.trace import load_trace

BASELINES = ("round_robin", "least_loaded", "prefix_affinity", "kv_overlap_cost")
DEFAULT_POLICIES = ("dualmap", *BASELINES)
SLO_SCALE = 5.0
"""SLO = SLO_SCALE x idle TTFT of the median request, when no SLO is given."""


@dataclass(slots=True)
class CapacityResult:
    """A policy's capacity and the run at that rate (``None``: no scale met the target)."""

    policy: str
    capacity_rps: float
    at_capacity: SimResult | None
    probes: list[SimResult] = field(default_factory=list)
    goodput_rps: float = 0.0
    at_goodput: SimResult | None = None


def median_prompt_len(requests: Sequence[SimRequest]) -> int:
    return int(statistics.median(r.prompt_len for r in requests))


def default_slo(requests: Sequence[SimRequest], cost_model: CostModel) -> float:
    """5x the idle TTFT of the median-length request."""
    return SLO_SCALE * cost_model.prefill_time(median_prompt_len(requests))


def default_slo_per_1k(requests: Sequence[SimRequest], cost_model: CostModel) -> float:
    """5x the idle TTFT per 1k prompt tokens of the median-length request."""
    median = max(1, median_prompt_len(requests))
    return SLO_SCALE * cost_model.prefill_time(median) * 1000 / median


def default_tpot_slo(requests: Sequence[SimRequest], cost_model: CostModel) -> float:
    """5x one idle decode step of the median request at mid-output."""
    context = median_prompt_len(requests) + statistics.median(r.output_len for r in requests) / 2
    return SLO_SCALE * cost_model.decode_step_time(int(context))


def find_capacity(
    run: Callable[[float], SimResult],
    attainment: float = 0.9,
    rel_tol: float = 0.02,
    max_scale: float = 1024.0,
    min_scale: float = 1 / 1024,
    metric: Callable[[SimResult], float] = lambda r: r.slo_attainment,
) -> tuple[float, SimResult | None, list[SimResult]]:
    """Highest time scale whose run meets ``attainment`` of ``metric``: double/halve, bisect.

    Returns (scale, the run at that scale, every probe). Scale 0 when even ``min_scale`` fails.
    """
    probes: list[SimResult] = []

    def ok(scale: float) -> bool:
        result = run(scale)
        probes.append(result)
        return metric(result) >= attainment

    lo, hi = _bracket(ok, max_scale, min_scale)
    if lo == 0.0:
        return 0.0, None, probes
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    best = max((p for p in probes if p.time_scale == lo), key=lambda p: p.time_scale)
    return lo, best, probes


def _bracket(
    ok: Callable[[float], bool], max_scale: float, min_scale: float
) -> tuple[float, float]:
    scale = 1.0
    if ok(scale):
        while scale * 2 <= max_scale and ok(scale * 2):
            scale *= 2
        return scale, scale * 2
    while scale / 2 >= min_scale:
        scale /= 2
        if ok(scale):
            return scale, scale * 2
    return 0.0, min_scale


def measure_capacity(
    policy: str,
    requests: Sequence[SimRequest],
    base: SimConfig,
    attainment: float,
    goodput: bool = True,
) -> CapacityResult:
    """Capacity (TTFT SLO only) and, with ``goodput``, goodput (TTFT and TPOT SLOs)."""
    runs: dict[float, SimResult] = {}

    def run(scale: float) -> SimResult:
        if scale not in runs:  # the goodput search re-visits the capacity search's scales
            runs[scale] = simulate(replace(base, policy=policy, time_scale=scale), requests)
        return runs[scale]

    scale, at, _ = find_capacity(run, attainment)
    result = CapacityResult(
        policy, at.request_rate_rps if at is not None and scale > 0 else 0.0, at
    )
    if goodput:
        gscale, gat, _ = find_capacity(run, attainment, metric=lambda r: r.goodput_attainment)
        result.goodput_rps = gat.request_rate_rps if gat is not None and gscale > 0 else 0.0
        result.at_goodput = gat
    result.probes = [runs[k] for k in sorted(runs)]
    return result


def decision_latency(
    policy: str,
    requests: Sequence[SimRequest],
    base: SimConfig,
    num_instances: int,
    time_scale: float,
) -> SimResult:
    """A run with ``num_instances`` prefill and as many decode instances, timing every ``route``."""
    config = replace(
        base,
        policy=policy,
        num_instances=num_instances,
        num_decode_instances=num_instances,
        time_scale=time_scale,
        measure_decisions=True,
        stop_below_attainment=0.0,
    )
    return simulate(config, requests)


def format_table(results: Sequence[CapacityResult]) -> str:
    """Capacity and goodput with ratios, then the breakdown at capacity (why a policy loses)."""
    by_name = {r.policy: r for r in results}
    rr = by_name.get("round_robin")
    best_cap = max((r.capacity_rps for r in results if r.policy in BASELINES), default=0.0)
    best_good = max((r.goodput_rps for r in results if r.policy in BASELINES), default=0.0)
    header = (
        f"{'policy':<16} {'capacity_rps':>12} {'vs_rr':>7} {'vs_best_base':>12}"
        f" {'goodput_rps':>11} {'vs_best_base':>12} {'hit_rate':>8} {'ttft_p50_s':>10}"
        f" {'ttft_p90_s':>10} {'ttft_p99_s':>10} {'tpot_p90_s':>10} {'imbalance':>9}"
        f" {'queue_s':>8} {'fallbacks':>9} {'migrations':>10}"
    )
    lines = [header, "-" * len(header)]
    rr_capacity = rr.capacity_rps if rr else 0.0
    for r in results:
        ratios = (
            f"{_ratio(r.capacity_rps, rr_capacity):>7} {_ratio(r.capacity_rps, best_cap):>12}"
            f" {r.goodput_rps:>11.2f} {_ratio(r.goodput_rps, best_good):>12}"
        )
        lines.append(f"{r.policy:<16} {r.capacity_rps:>12.2f} {ratios}{_figures(r.at_capacity)}")
    return "\n".join(lines)


def _figures(at: SimResult | None) -> str:
    if at is None:
        return "  (no rate met the SLO target)"
    percentiles = " ".join(f"{at.ttft_percentile(q):>10.2f}" for q in (50, 90, 99))
    return (
        f" {at.hit_rate:>8.3f} {percentiles} {at.tpot_percentile(90):>10.4f}"
        f" {at.load_imbalance:>9.2f} {at.queue_wait_s:>8.3f} {at.num_fallbacks:>9d}"
        f" {at.num_migrations:>10d}"
    )


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference > 0 else "n/a"


def run_figures(at: SimResult | None) -> dict[str, float | None]:
    """The breakdown of one run, for JSON."""
    if at is None:
        return dict.fromkeys(
            (
                "hit_rate",
                "ttft_p50_s",
                "ttft_p90_s",
                "ttft_p99_s",
                "tpot_p50_s",
                "tpot_p90_s",
                "load_imbalance",
                "slo_attainment",
                "goodput_attainment",
                "queue_wait_s",
                "decode_wait_s",
            )
        )
    return {
        "hit_rate": at.hit_rate,
        "ttft_p50_s": at.ttft_percentile(50),
        "ttft_p90_s": at.ttft_percentile(90),
        "ttft_p99_s": at.ttft_percentile(99),
        "tpot_p50_s": at.tpot_percentile(50),
        "tpot_p90_s": at.tpot_percentile(90),
        "load_imbalance": at.load_imbalance,
        "slo_attainment": at.slo_attainment,
        "goodput_attainment": at.goodput_attainment,
        "queue_wait_s": at.queue_wait_s,
        "decode_wait_s": at.decode_wait_s,
    }


def to_json(
    results: Sequence[CapacityResult], header: dict[str, object], latency: dict[str, float] | None
) -> dict[str, object]:
    policies: dict[str, object] = {}
    for r in results:
        policies[r.policy] = {
            "capacity_rps": r.capacity_rps,
            "goodput_rps": r.goodput_rps,
            **run_figures(r.at_capacity),
            "curve": [
                {
                    "rate_rps": p.request_rate_rps,
                    "attainment": p.slo_attainment,
                    "goodput_attainment": p.goodput_attainment,
                }
                for p in sorted(r.probes, key=lambda p: p.time_scale)
            ],
        }
    return {**header, "policies": policies, "decision_latency": latency}


def plot(results: Sequence[CapacityResult], slo_label: str, attainment: float, path: Path) -> None:
    """Two panels: TTFT-SLO attainment and goodput attainment against request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = (
        (axes[0], lambda p: p.slo_attainment, f"TTFT within SLO ({slo_label})"),
        (axes[1], lambda p: p.goodput_attainment, "TTFT and TPOT within SLO (goodput)"),
    )
    for ax, metric, title in panels:
        for r in results:
            probes = sorted(r.probes, key=lambda p: p.request_rate_rps)
            ax.plot(
                [p.request_rate_rps for p in probes],
                [metric(p) for p in probes],
                marker="o",
                markersize=3,
                label=r.policy,
            )
        ax.axhline(attainment, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve bench router", description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, required=True, help="Mooncake-format JSONL trace")
    p.add_argument(
        "--instances", type=int, default=32, help="prefill instances (and decode instances)"
    )
    p.add_argument(
        "--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated policy names"
    )
    add_slo_arguments(p)
    p.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=8192,
        help="tokens per prefill iteration (0: one whole prompt per iteration)",
    )
    p.add_argument(
        "--cost-model",
        type=Path,
        default=None,
        help="cost model JSON (default: built-in A100 profile)",
    )
    p.add_argument(
        "--attainment", type=float, default=0.9, help="fraction of requests that must meet the SLO"
    )
    p.add_argument("--prefix-key-blocks", type=int, default=RouterConfig().prefix_key_blocks)
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests")
    p.add_argument(
        "--latency-instances",
        type=int,
        default=1000,
        help="instances for the decision-latency run (0: skip)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--plot", type=Path, default=None, help="write the SLO-attainment PNG here")
    return p


def parse_policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--policies names no policy")
    for name in names:
        create_policy(name)  # raises UnknownPolicyError naming the known ones
    return names


@dataclass(frozen=True, slots=True)
class Slos:
    """The SLOs of a run: fixed TTFT (the floor), per-1k-tokens TTFT (0: off), TPOT."""

    ttft_s: float
    ttft_per_1k_s: float
    tpot_s: float

    def describe(self) -> str:
        ttft = f"TTFT SLO {self.ttft_s:.2f} s"
        if self.ttft_per_1k_s > 0:
            ttft = f"TTFT SLO max({self.ttft_s:.2f} s, {self.ttft_per_1k_s:.3f} s per 1k tokens)"
        return f"{ttft}; TPOT SLO {self.tpot_s * 1e3:.1f} ms"


def add_slo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ttft-slo", type=float, default=None, help="TTFT SLO in seconds (default: 5x idle median)"
    )
    p.add_argument(
        "--ttft-slo-per-1k-tokens",
        default=None,
        help="per-request TTFT SLO: max(fixed, X s per 1k prompt tokens); 'auto': 5x idle",
    )
    p.add_argument(
        "--tpot-slo", type=float, default=None, help="TPOT SLO in seconds (default: 5x idle step)"
    )


def resolve_slos(
    args: argparse.Namespace, requests: Sequence[SimRequest], cost_model: CostModel
) -> Slos:
    """SLOs from the flags and the trace; bad values raise ``ConfigError`` naming the flag."""
    if args.ttft_slo is not None and not (args.ttft_slo > 0 and math.isfinite(args.ttft_slo)):
        raise ConfigError(f"--ttft-slo must be a positive number of seconds, got {args.ttft_slo}")
    if args.tpot_slo is not None and not (args.tpot_slo > 0 and math.isfinite(args.tpot_slo)):
        raise ConfigError(f"--tpot-slo must be a positive number of seconds, got {args.tpot_slo}")
    per_1k = 0.0
    if args.ttft_slo_per_1k_tokens is not None:
        text = str(args.ttft_slo_per_1k_tokens)
        if text == "auto":
            per_1k = default_slo_per_1k(requests, cost_model)
        else:
            try:
                per_1k = float(text)
            except ValueError:
                per_1k = math.nan
            if not (per_1k > 0 and math.isfinite(per_1k)):
                raise ConfigError(
                    "--ttft-slo-per-1k-tokens must be 'auto' or a positive number of seconds, "
                    f"got {text!r}"
                )
    if args.ttft_slo is not None:
        ttft = args.ttft_slo
    else:  # per-request mode: a 1k-token floor; fixed mode: 5x the idle median
        ttft = per_1k if per_1k > 0 else default_slo(requests, cost_model)
    tpot = args.tpot_slo if args.tpot_slo is not None else default_tpot_slo(requests, cost_model)
    if cost_model.decode_step_time(1) > tpot:
        raise ConfigError(
            f"--tpot-slo {tpot} s cannot be met: one decode step takes "
            f"{cost_model.decode_step_time(1):.4f} s under cost model {cost_model.name!r}"
        )
    return Slos(ttft, per_1k, tpot)


def base_config(
    args: argparse.Namespace, cost_model: CostModel, slos: Slos, policy: str
) -> SimConfig:
    if args.prefill_chunk_tokens < 0:
        raise ConfigError(f"--prefill-chunk-tokens must be >= 0, got {args.prefill_chunk_tokens}")
    return SimConfig(
        policy=policy,
        num_instances=args.instances,
        num_decode_instances=args.instances,
        cost_model=cost_model,
        router_config=RouterConfig(
            ttft_slo_s=slos.ttft_s,
            prefix_key_blocks=args.prefix_key_blocks,
            default_prefill_rate_tps=cost_model.nominal_prefill_rate_tps(),
            block_size=cost_model.block_size,
        ),
        ttft_slo_per_1k_s=slos.ttft_per_1k_s,
        tpot_slo_s=slos.tpot_s,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        stop_below_attainment=args.attainment,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policies = parse_policies(args.policies)
    if args.instances < 1:
        raise ConfigError(f"--instances must be >= 1, got {args.instances}")
    if not 0 < args.attainment <= 1:
        raise ConfigError(f"--attainment must be in (0, 1], got {args.attainment}")
    cost_model = CostModel.load(args.cost_model) if args.cost_model else CostModel()
    requests = prepare_requests(load_trace(args.trace, args.limit))
    slos = resolve_slos(args, requests, cost_model)
    base = base_config(args, cost_model, slos, policies[0])
    print(
        f"trace {args.trace}: {len(requests)} requests; {args.instances}P+{args.instances}D; "
        f"cost model {cost_model.name}; {slos.describe()}; target {args.attainment:.0%}"
    )
    results = []
    for name in policies:
        t0 = time.perf_counter()
        results.append(measure_capacity(name, requests, base, args.attainment))
        print(
            f"  {name}: capacity {results[-1].capacity_rps:.2f} req/s, goodput "
            f"{results[-1].goodput_rps:.2f} req/s ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    print(format_table(results))
    latency = _latency_figures(policies, requests, base, args, results)
    if args.json:
        header = {
            "trace": str(args.trace),
            "num_requests": len(requests),
            "instances": args.instances,
            "ttft_slo_s": slos.ttft_s,
            "ttft_slo_per_1k_tokens_s": slos.ttft_per_1k_s or None,
            "tpot_slo_s": slos.tpot_s,
            "prefill_chunk_tokens": args.prefill_chunk_tokens,
            "median_prompt_len": median_prompt_len(requests),
            "attainment_target": args.attainment,
            "cost_model": dataclasses.asdict(cost_model),
        }
        args.json.write_text(json.dumps(to_json(results, header, latency), indent=2) + "\n")
    if args.plot:
        plot(results, slos.describe(), args.attainment, args.plot)
    return 0


def _latency_figures(
    policies: Sequence[str],
    requests: Sequence[SimRequest],
    base: SimConfig,
    args: argparse.Namespace,
    results: Sequence[CapacityResult],
) -> dict[str, float] | None:
    """p50/p99 of ``route`` in wall time and in thread CPU time (immune to a busy machine)."""
    if args.latency_instances <= 0:
        return None
    figures: dict[str, float] = {}
    print(
        f"placement decision latency with {args.latency_instances} prefill + "
        f"{args.latency_instances} decode instances (wall | thread CPU):"
    )
    for r in results:
        # Load the big fleet as the small one was at capacity, scaled by the fleet size.
        at_scale = r.at_capacity.time_scale if r.at_capacity else 1.0
        scale = at_scale * args.latency_instances / args.instances
        run = decision_latency(r.policy, requests, base, args.latency_instances, scale)
        wall = [float(np.percentile(run.decision_latencies_s, q)) * 1e3 for q in (50, 99)]
        cpu = [float(np.percentile(run.decision_cpu_s, q)) * 1e3 for q in (50, 99)]
        figures[f"{r.policy}_p50_ms"], figures[f"{r.policy}_p99_ms"] = wall
        figures[f"{r.policy}_cpu_p50_ms"], figures[f"{r.policy}_cpu_p99_ms"] = cpu
        print(
            f"  {r.policy:<16} p50 {wall[0]:.3f} ms  p99 {wall[1]:.3f} ms"
            f"  |  p50 {cpu[0]:.3f} ms  p99 {cpu[1]:.3f} ms"
        )
    return figures


if __name__ == "__main__":
    sys.exit(main())
