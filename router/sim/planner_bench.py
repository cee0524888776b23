"""The planner benchmark: goodput of every fixed prefill:decode split of an instance budget,
and of the online planner replayed over the same trace, in whole-cluster simulation.

Owns: ``splitserve bench planner`` (``main(argv)``; the cluster CLI delegates to it), the
offline split search, the planner replay, the table, the JSON file and the PNG. Must not:
decide splits itself (the simulator runs the real ``Router`` and ``Planner``).

Goodput (DistServe): the highest arrival rate (trace rate x time scale) at which at least
``--attainment`` of requests meet both their TTFT SLO and the TPOT SLO. The offline search
measures it for every split ``P:D`` with ``P + D = --instances``; the best one is the
offline plan. The planner row starts from that split (``--initial best``, a deployment's
offline placement) or from an even one (``--initial even``) and flips roles online.

JSON (``--json``): exactly ``{"fixed": {"<P>:<D>": goodput_rps, ...}, "best_fixed": "<P>:<D>",
"planner_rps": ..., "ratio_vs_best_fixed": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from splitserve.errors import ConfigError
from splitserve.router.planner import PlannerConfig
from splitserve.router.schema import RouterConfig
from splitserve.router.sim.bench import (
    Slos,
    add_slo_arguments,
    base_config,
    find_capacity,
    parse_policies,
    resolve_slos,
)
from splitserve.router.sim.cost_model import CostModel
from splitserve.router.sim.simulator import (
    SimConfig,
    SimRequest,
    SimResult,
    prepare_requests,
    simulate,
)
from splitserve.router.sim.trace import load_trace


def split_name(prefill: int, decode: int) -> str:
    return f"{prefill}:{decode}"


def measure_goodput(
    config: SimConfig, requests: Sequence[SimRequest], attainment: float
) -> tuple[float, SimResult | None]:
    """Goodput (req/s) of one configuration and the run at that rate."""

    def run(scale: float) -> SimResult:
        return simulate(replace(config, time_scale=scale), requests)

    scale, at, _ = find_capacity(run, attainment, metric=lambda r: r.goodput_attainment)
    return (at.request_rate_rps if at is not None and scale > 0 else 0.0), at


def check_feasible(
    instances: int, requests: Sequence[SimRequest], base: SimConfig, attainment: float
) -> None:
    """Refuse budgets and SLOs that no split can serve, naming the value."""
    if instances < 2:
        raise ConfigError(
            f"--instances {instances} is infeasible: a P/D split needs at least one prefill "
            "and one decode instance (2)"
        )
    cost = base.cost_model
    idle_ok = np.mean(
        [cost.prefill_time(r.prompt_len) <= base.ttft_slo_of(r.prompt_len) for r in requests]
    )
    if idle_ok < attainment:
        raise ConfigError(
            f"TTFT SLO {base.router_config.ttft_slo_s:.3f} s cannot be met: even on an idle "
            f"cluster only {idle_ok:.1%} of the trace's requests prefill within it (target "
            f"{attainment:.0%}); raise --ttft-slo or use --ttft-slo-per-1k-tokens"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve bench planner", description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, required=True, help="Mooncake-format JSONL trace")
    p.add_argument("--instances", type=int, required=True, help="prefill + decode instances")
    add_slo_arguments(p)
    p.add_argument("--policy", default="dualmap", help="router policy")
    p.add_argument("--cost-model", type=Path, default=None, help="cost model JSON")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--prefill-chunk-tokens", type=int, default=8192)
    p.add_argument("--prefix-key-blocks", type=int, default=RouterConfig().prefix_key_blocks)
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests")
    p.add_argument(
        "--initial", choices=("best", "even"), default="best", help="the planner's starting split"
    )
    p.add_argument("--planner-interval", type=float, default=PlannerConfig().interval_s)
    p.add_argument("--planner-cooldown", type=float, default=PlannerConfig().cooldown_s)
    p.add_argument("--planner-window", type=float, default=PlannerConfig().window_s)
    p.add_argument("--planner-hysteresis", type=float, default=PlannerConfig().hysteresis)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--plot", type=Path, default=None, help="write the goodput PNG here")
    return p


def planner_config(args: argparse.Namespace) -> PlannerConfig:
    return PlannerConfig(
        enabled=True,
        interval_s=args.planner_interval,
        cooldown_s=args.planner_cooldown,
        window_s=args.planner_window,
        hysteresis=args.planner_hysteresis,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policy = parse_policies(args.policy)[0]
    if not 0 < args.attainment <= 1:
        raise ConfigError(f"--attainment must be in (0, 1], got {args.attainment}")
    planner = planner_config(args)
    cost_model = CostModel.load(args.cost_model) if args.cost_model else CostModel()
    requests = prepare_requests(load_trace(args.trace, args.limit))
    slos = resolve_slos(args, requests, cost_model)
    base = base_config(replace_instances(args, 1), cost_model, slos, policy)
    check_feasible(args.instances, requests, base, args.attainment)
    print(
        f"trace {args.trace}: {len(requests)} requests; budget {args.instances} instances; "
        f"policy {policy}; cost model {cost_model.name}; {slos.describe()}; "
        f"target {args.attainment:.0%}"
    )
    fixed: dict[str, float] = {}
    for p in range(1, args.instances):
        t0 = time.perf_counter()
        config = replace(base, num_instances=p, num_decode_instances=args.instances - p)
        fixed[split_name(p, args.instances - p)], _ = measure_goodput(
            config, requests, args.attainment
        )
        print(
            f"  fixed {split_name(p, args.instances - p)}: goodput "
            f"{fixed[split_name(p, args.instances - p)]:.3f} req/s "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    best = max(fixed, key=lambda k: fixed[k])
    if fixed[best] <= 0:
        raise ConfigError(
            f"no split of {args.instances} instances meets the SLOs ({slos.describe()}) for "
            f"{args.attainment:.0%} of requests at any rate; relax the SLOs or raise --instances"
        )
    start = int(best.split(":")[0]) if args.initial == "best" else args.instances // 2
    config = replace(
        base, num_instances=start, num_decode_instances=args.instances - start, planner=planner
    )
    planner_rps, at = measure_goodput(config, requests, args.attainment)
    ratio = planner_rps / fixed[best]
    print(_table(fixed, best, planner_rps, ratio, start, args.instances, at, slos))
    if args.json:
        out = {
            "fixed": fixed,
            "best_fixed": best,
            "planner_rps": planner_rps,
            "ratio_vs_best_fixed": ratio,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        _plot(fixed, planner_rps, args.plot)
    return 0


def replace_instances(args: argparse.Namespace, n: int) -> argparse.Namespace:
    copy = argparse.Namespace(**vars(args))
    copy.instances = n
    return copy


def _table(
    fixed: dict[str, float],
    best: str,
    planner_rps: float,
    ratio: float,
    start: int,
    instances: int,
    at: SimResult | None,
    slos: Slos,
) -> str:
    lines = [f"{'split P:D':<12} {'goodput_rps':>11} {'vs_best':>8}", "-" * 33]
    for name, rps in fixed.items():
        mark = "  <- best fixed" if name == best else ""
        lines.append(f"{name:<12} {rps:>11.3f} {rps / fixed[best]:>7.2f}x{mark}")
    lines.append(
        f"{'planner':<12} {planner_rps:>11.3f} {ratio:>7.2f}x  (started at "
        f"{split_name(start, instances - start)})"
    )
    if at is not None:
        actions = ", ".join(f"{a}@{t:.0f}s" for t, a in at.planner_actions) or "none"
        lines.append(f"planner decisions at its goodput rate: {actions}")
    return "\n".join(lines)


def _plot(fixed: dict[str, float], planner_rps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(fixed)
    ax.bar(names, [fixed[n] for n in names], color="tab:blue", label="fixed split")
    ax.axhline(planner_rps, color="tab:red", linestyle="--", label="online planner")
    ax.set_xlabel("prefill:decode instances")
    ax.set_ylabel("goodput (req/s)")
    ax.set_title("Goodput by prefill:decode split (simulated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
