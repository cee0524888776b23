"""Batch throughput: OpenAI batch chat requests as a Ray job vs ``LLM.generate`` in one process.

The same greedy chat requests (``ignore_eos``, so both sides generate the same tokens) run
(a) through ``LLM.generate`` on one in-process engine and (b) as ``ray job submit -- python -m
splitserve.batch`` against a ``ray start --head`` this script starts on loopback (token auth
on, stopped at the end), in one run. Prints req/s and tok/s of each and their ratio, both for
the requests alone (the batch runner's own clock; LLM.generate after the model load) and for
the whole job (submit to success, including the job's driver, cluster and model start).

    python bench/batch_throughput.py [--model M] [--num-requests 200] [--max-tokens 32]
        [--max-concurrency 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from splitserve import LLM, SamplingParams
from splitserve.cluster.config import LOCAL_CPU_WORKER_RESOURCE

BIN = Path(sys.executable).parent
TOPICS = ["the sea", "volcanoes", "bread", "trains", "owls", "glass", "rivers", "chess",
          "tea", "bridges", "comets", "maps", "bees", "clocks", "salt", "kites"]


def make_requests(n: int, max_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` OpenAI batch lines: short distinct chat questions, greedy, fixed output length."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = f"Request {i}: tell me {rng.choice(['one', 'two', 'three'])} facts about " \
                   f"{rng.choice(TOPICS)}."
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        rows.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": body})
    return rows


def run_llm(model: str | None, rows: list[dict[str, Any]], max_tokens: int,
            num_threads: int | None = None) -> dict[str, float]:
    """LLM.generate on the chat-templated prompts; the clock starts after the model load and
    one warm-up request."""
    llm = LLM(model, num_threads=num_threads)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template(r["body"]["messages"], True) for r in rows]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    gc.collect()
    return _rates(len(rows), tokens, elapsed)


def _rates(requests: int, tokens: int, elapsed: float) -> dict[str, float]:
    return {"requests": requests, "completion_tokens": tokens, "elapsed_s": round(elapsed, 2),
            "req_s": round(requests / elapsed, 3), "tok_s": round(tokens / elapsed, 2)}


class RayHead:
    """``ray start --head --block`` on loopback with token auth; ``stop`` SIGTERMs that process
    (it stops its node's processes), never ``ray stop`` (which would stop any Ray here)."""

    def __init__(self, temp_dir: str) -> None:
        self.temp_dir = temp_dir
        gcs, dash, agent, client, metrics = _free_ports(5)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.setdefault("UCX_TLS", "tcp,self")
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host",
               "127.0.0.1", "--dashboard-port", str(dash), "--dashboard-agent-listen-port",
               str(agent), "--ray-client-server-port", str(client), "--metrics-export-port",
               str(metrics), "--num-cpus", "2", "--resources",
               json.dumps({LOCAL_CPU_WORKER_RESOURCE: 8}), "--temp-dir", temp_dir,
               "--disable-usage-stats"]
        self.log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def job(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray"), "job", args[0], "--address", self.dashboard, *args[1:]]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.job("list", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head failed; see its log in the temp dir")
            time.sleep(1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_job(args: argparse.Namespace, rows: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    """Submit the batch as a Ray job and wait; rates from the output file and the job's log."""
    inp, out = work / "in.jsonl", work / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = RayHead(tempfile.mkdtemp(prefix="ssb-bench-", dir="/tmp"))
    try:
        head.wait_ready()
        entry = [str(BIN / "python"), "-m", "splitserve.batch", "--input", str(inp), "--output",
                 str(out), "--max-concurrency", str(args.max_concurrency)]
        if args.model:
            entry += ["--model", str(Path(args.model).resolve())]
        start = time.perf_counter()
        res = head.job("submit", "--submission-id", "batch-bench", "--", *entry, check=False)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"the batch job failed:\n{res.stdout[-4000:]}")
        logs = head.job("logs", "batch-bench").stdout
    finally:
        head.stop()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [r for r in records if r["response"] and r["response"]["status_code"] == 200]
    if len(ok) != len(rows):
        raise RuntimeError(f"{len(rows) - len(ok)} requests failed; see {out}")
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in ok)
    match = re.search(r"batch: wrote \d+ lines .* in ([0-9.]+)s", logs)
    run_s = float(match.group(1)) if match else wall
    return {"requests_only": _rates(len(ok), tokens, run_s),
            "whole_job": _rates(len(ok), tokens, wall)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=64, help="of the batch job")
    ap.add_argument("--llm-num-threads", type=int, default=None,
                    help="torch threads of the LLM.generate baseline (default: torch's, 2 here; "
                         "Ray runs each worker with OMP_NUM_THREADS=1)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    rows = make_requests(args.num_requests, args.max_tokens)
    print(f"{len(rows)} chat requests, {args.max_tokens} tokens out each, model "
          f"{args.model or 'SmolLM2-135M-Instruct (embedded)'}", flush=True)
    llm = run_llm(args.model, rows, args.max_tokens, args.llm_num_threads)
    print(f"LLM.generate (one process): {llm['req_s']:.2f} req/s, {llm['tok_s']:.1f} tok/s "
          f"({llm['elapsed_s']}s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as work:
        job = run_job(args, rows, Path(work))
    for name, r in job.items():
        ratio = r["tok_s"] / llm["tok_s"]
        r["ratio_to_llm_generate"] = round(ratio, 3)
        print(f"ray job batch ({name.replace('_', ' ')}): {r['req_s']:.2f} req/s, "
              f"{r['tok_s']:.1f} tok/s ({r['elapsed_s']}s) = {ratio:.2f}x LLM.generate")
    results = {"num_requests": len(rows), "max_tokens": args.max_tokens,
               "model": args.model or "SmolLM2-135M-Instruct", "max_concurrency":
               args.max_concurrency, "llm_num_threads": args.llm_num_threads,
               "llm_generate": llm, "ray_job": job}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
