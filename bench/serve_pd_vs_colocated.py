"""`splitserve bench serve` against `splitserve serve` (1 prefill + 1 decode) and against a
colocated single-engine server, same workload, in one run (issue [F]'s benchmark).

Each server is started as its own process on a free port, benchmarked through the OpenAI API
(the same load generator any OpenAI-compatible server can be measured with), then stopped with
SIGTERM. Prints TTFT / TPOT / ITL percentiles, throughput and goodput side by side.

    python bench/serve_pd_vs_colocated.py [--num-prompts 24] [--request-rate 0.5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SPLITSERVE = [sys.executable, "-m", "splitserve.cluster.cli"]
KEYS = ["request_throughput", "output_throughput", "request_goodput"] + [
    f"{p}_{m}_ms" for m in ("ttft", "tpot", "itl") for p in ("median", "p90", "p99")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(extra: list[str], port: int) -> subprocess.Popen:
    cmd = SPLITSERVE + ["serve", "--port", str(port), "--grpc-port", "-1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited early: {' '.join(cmd)}")
        time.sleep(1)
    proc.kill()
    raise SystemExit("server did not become healthy in 300 s")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _bench(port: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = SPLITSERVE + [
        "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--dataset", "random",
        "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "0.9",
        "--request-rate", str(args.request_rate), "--ignore-eos", "--disable-tqdm",
        "--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}", "--json", str(out),
        "--plot", str(out.with_suffix(".png")),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=0.5)
    ap.add_argument("--slo-ttft-ms", type=float, default=5000)
    ap.add_argument("--slo-tpot-ms", type=float, default=300)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    for name, extra in (("1P+1D", []), ("colocated", ["--single-engine"])):
        port = _free_port()
        proc = _serve(extra, port)
        try:
            results[name] = _bench(port, args, Path(f"/tmp/splitserve-bench-{name}.json"))
        finally:
            _stop(proc)
    print(f"{args.num_prompts} prompts of ~{args.input_len} tokens, {args.output_len} out, "
          f"{args.request_rate} req/s; goodput SLOs ttft {args.slo_ttft_ms} ms, tpot "
          f"{args.slo_tpot_ms} ms")
    print("\n| metric | 1P+1D | colocated |\n|---|---|---|")
    for k in KEYS:
        print(f"| {k} | {results['1P+1D'].get(k, float('nan')):.2f} | "
              f"{results['colocated'].get(k, float('nan')):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
