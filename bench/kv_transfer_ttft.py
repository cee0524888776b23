"""The KV transfer's share of TTFT for a 4,096-token prompt in 1P+1D: staged, zero-copy, and
zero-copy with layer-wise streaming.

Starts a local 1 prefill + 1 decode cluster (UCX over TCP between the Ray workers) once per
mode, each in its own process because the workers read ``SPLITSERVE_KV_ZERO_COPY`` and
``SPLITSERVE_KV_LAYERWISE`` at start:

* ``staged``    - ``SPLITSERVE_KV_ZERO_COPY=0``: the prefill side gathers the blocks into
                  staging buffers, the decode side receives into staging and scatters (the
                  path before zero-copy; the caches are block-major in both modes)
* ``zero_copy`` - one message per run of consecutive blocks, pool to pool, pulled after the
                  prefill worker's first token
* ``layerwise`` - zero-copy with ``SPLITSERVE_KV_LAYERWISE=--layers-per-group``: the params go
                  out before the last prefill forward, each layer group is pulled (one message
                  per block) as soon as it is computed, so the pull overlaps the prefill

Each mode sends ``--reps`` distinct prompts one after another (no prefix hits) with 3 output
tokens and prints TTFT (the first token comes from the prefill worker in every mode), the time
to the second token (the first the decode worker makes: it waits for the KV), the gaps between
tokens 1-2 and 2-3, and the cluster's per-stage seconds (``transfer`` is the decode worker's
pull, from its start to the verified blocks; streamed, it starts before the prefill ends). The
exposed transfer is ``gap(1,2) - gap(2,3)``: what the KV hand-off adds to a plain decode step.
Not a test: figures and ratios only; the machine may be shared, so compare the modes of one
run, not absolute times.

    python bench/kv_transfer_ttft.py [--prompt-len 4096] [--reps 3] [--layers-per-group 6]
                                     [--modes staged,zero_copy,layerwise] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = {"staged": ("0", False), "zero_copy": ("1", False), "layerwise": ("1", True)}
"""mode -> (SPLITSERVE_KV_ZERO_COPY, layer-wise streaming on)."""


async def _measure(prompt_len: int, reps: int, model: str | None) -> dict[str, float]:
    from splitserve import SamplingParams
    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.frontends.backend import ClusterBackend, stage_seconds

    config = ClusterConfig.local(
        prefill=1, decode=1, model=model, kv_cache_memory_bytes=2 << 30,
        router={"local_prefill_max_tokens": 0}, max_model_len=prompt_len + 16,
    )
    backend = ClusterBackend.from_config(config)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    rows: dict[str, list[float]] = {k: [] for k in ("ttft", "t2", "gap12", "gap23", "transfer",
                                                    "prefill")}
    try:
        for i in range(reps + 1):  # the first one warms up connections and kernels
            prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
            start = time.perf_counter()
            times: list[float] = []
            async for delta in backend.generate(prompt, params, f"ttft-{i}"):
                times += [time.perf_counter()] * len(delta.outputs[0].token_ids)
                if delta.finished:
                    stages = stage_seconds(delta.metrics)
            if i == 0:
                continue
            assert len(times) == 3, f"expected 3 tokens, got {len(times)}"
            for key, value in (("ttft", times[0] - start), ("t2", times[1] - start),
                               ("gap12", times[1] - times[0]), ("gap23", times[2] - times[1]),
                               ("transfer", stages.get("transfer", float("nan"))),
                               ("prefill", stages.get("prefill", float("nan")))):
                rows[key].append(value)
    finally:
        await backend.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    exposed = max(med["gap12"] - med["gap23"], 0.0)
    return {"ttft_ms": 1000 * med["ttft"], "second_token_ms": 1000 * med["t2"],
            "gap12_ms": 1000 * med["gap12"], "gap23_ms": 1000 * med["gap23"],
            "transfer_ms": 1000 * med["transfer"], "prefill_ms": 1000 * med["prefill"],
            "exposed_transfer_ms": 1000 * exposed,
            "transfer_share": med["transfer"] / med["ttft"],
            "exposed_share": exposed / med["t2"]}


def _run_mode(mode: str, args: argparse.Namespace) -> dict[str, float]:
    zero_copy, layerwise = MODES[mode]
    env = {**os.environ, "SPLITSERVE_KV_ZERO_COPY": zero_copy,
           "SPLITSERVE_KV_LAYERWISE": str(args.layers_per_group if layerwise else 0)}
    cmd = [sys.executable, __file__, "--_one", "--prompt-len", str(args.prompt_len),
           "--reps", str(args.reps)] + (["--model", args.model] if args.model else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"{mode} run failed:\n{res.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers-per-group", type=int, default=6,
                    help="layer-wise mode: layers per streamed group")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated subset of " + ", ".join(MODES))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        result = asyncio.run(_measure(args.prompt_len, args.reps, args.model))
        print("RESULT " + json.dumps(result), flush=True)
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    results = {mode: _run_mode(mode, args) for mode in modes}
    print(f"1P+1D, one {args.prompt_len}-token prompt at a time, median of {args.reps}; "
          f"layer-wise groups of {args.layers_per_group} layers")
    print("| mode | TTFT ms | 2nd token ms | gap 1-2 ms | gap 2-3 ms | exposed transfer ms "
          "| exposed / 2nd token | prefill ms | pull ms | pull / TTFT |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['ttft_ms']:.0f} | {r['second_token_ms']:.0f} | {r['gap12_ms']:.0f} "
              f"| {r['gap23_ms']:.0f} | {r['exposed_transfer_ms']:.0f} "
              f"| {100 * r['exposed_share']:.1f}% | {r['prefill_ms']:.0f} "
              f"| {r['transfer_ms']:.0f} | {100 * r['transfer_share']:.1f}% |")
    summary: dict[str, Any] = dict(results)
    for a, b in (("staged", "zero_copy"), ("zero_copy", "layerwise")):
        if a in results and b in results:
            ratio = results[a]["second_token_ms"] / results[b]["second_token_ms"]
            print(f"time to 2nd token: {a} / {b} = {ratio:.2f}x")
            summary[f"second_token_{a}_over_{b}"] = ratio
    if "staged" in results and "zero_copy" in results:
        speedup = results["staged"]["transfer_ms"] / results["zero_copy"]["transfer_ms"]
        print(f"pull: staged / zero-copy = {speedup:.2f}x")
        summary["transfer_staged_over_zero_copy"] = speedup
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
