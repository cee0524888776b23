"""Disaggregated (1 prefill + 1 decode worker, one core each) vs one colocated engine (two cores).

The same mixed, streaming workload (a few long prompts among many short ones, Poisson
arrivals) goes through (a) the cluster and (b) a single AsyncEngine, in one run. Prints TTFT,
TPOT and ITL percentiles and throughput of each, and the TPOT p99 ratio: disaggregation should
keep decode steps free of prefill interference.

    python bench/cluster_vs_colocated.py [--model M] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from splitserve import SamplingParams
from splitserve.cluster.frontends.backend import stage_seconds

STAGES = ("queue", "prefill", "transfer", "decode")


def make_workload(n: int, long_every: int, long_len: int, short_len: int, seed: int = 0
                  ) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(long_len if i % long_every == 0 else
                                                     short_len)] for i in range(n)]


async def drive(backend: Any, prompts: list[list[int]], out_len: int, rate: float, seed: int = 1
                ) -> dict[str, float]:
    """Send every prompt at Poisson arrivals; per-request TTFT, TPOT, ITLs."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    ttft: list[float] = []
    tpot: list[float] = []
    itl: list[float] = []
    stages: dict[str, list[float]] = {}

    async def one(i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        start = time.perf_counter()
        stamps: list[float] = []
        async for delta in backend.generate(prompts[i], params, f"bench-{i}"):
            stamps += [time.perf_counter()] * max(len(delta.outputs[0].token_ids), 1)
            if delta.finished:
                for stage, secs in stage_seconds(delta.metrics).items():
                    stages.setdefault(stage, []).append(secs)
        ttft.append(stamps[0] - start)
        if len(stamps) > 1:
            tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
            itl.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))

    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        t += rng.expovariate(rate)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, d) for i, d in enumerate(delays)))
    elapsed = time.perf_counter() - t0
    out = {"throughput_tok_s": len(prompts) * out_len / elapsed}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = 1000 * _percentile(values, q)
    for stage in STAGES:  # where the time went (the workers' own timestamps)
        out[f"{stage}_p50_ms"] = 1000 * _percentile(stages.get(stage, []), 50)
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run_cluster(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.frontends.backend import ClusterBackend

    config = ClusterConfig.local(
        prefill=1, decode=1, model=args.model, kv_cache_memory_bytes=args.kv_bytes,
        roles={"prefill": {"num_threads": 1}, "decode": {"num_threads": 1}},
        router={"local_prefill_max_tokens": 0},
    )
    backend = ClusterBackend.from_config(config)
    try:
        await drive(backend, prompts[:2], 4, 100.0)  # warm-up
        return await drive(backend, prompts, args.output_len, args.rate)
    finally:
        await backend.close()


async def run_colocated(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    from splitserve.cluster.frontends.backend import EngineBackend

    backend = EngineBackend.from_config(model=args.model, kv_cache_memory_bytes=args.kv_bytes,
                                        num_threads=2)
    try:
        await drive(backend, prompts[:2], 4, 100.0)
        return await drive(backend, prompts, args.output_len, args.rate)
    finally:
        await backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--long-every", type=int, default=4, help="every k-th prompt is long")
    ap.add_argument("--long-len", type=int, default=1024)
    ap.add_argument("--short-len", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.5, help="requests per second (Poisson)")
    ap.add_argument("--kv-bytes", type=int, default=2 << 30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompts = make_workload(args.num_requests, args.long_every, args.long_len, args.short_len)
    print(f"{len(prompts)} requests ({args.num_requests // args.long_every} of {args.long_len} "
          f"tokens, the rest {args.short_len}), {args.output_len} out, {args.rate} req/s",
          flush=True)
    results = {"disaggregated": asyncio.run(run_cluster(args, prompts)),
               "colocated": asyncio.run(run_colocated(args, prompts))}
    keys = ["throughput_tok_s"] + [f"{m}_p{q}_ms" for m in ("ttft", "tpot", "itl")
                                   for q in (50, 90, 99)] + [f"{s}_p50_ms" for s in STAGES]
    print("\n| metric | 1P+1D (1 core each) | colocated (2 cores) |\n|---|---|---|")
    for k in keys:
        print(f"| {k} | {results['disaggregated'][k]:.1f} | {results['colocated'][k]:.1f} |")
    ratio = results["colocated"]["tpot_p99_ms"] / results["disaggregated"]["tpot_p99_ms"]
    results["tpot_p99_colocated_over_disaggregated"] = round(ratio, 2)
    print(f"TPOT p99: colocated / disaggregated = {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
