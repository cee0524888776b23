"""``splitserve bench serve``: an OpenAI-API load generator in the conventions of ``vllm bench serve``.

Owns workload generation (random token prompts, shared-prefix prompts, Mooncake-style traces
with prefix block hashes), arrivals (Poisson / Gamma with burstiness, or trace timestamps),
streaming requests to ``/v1/completions`` and the report: TTFT, TPOT = (E2E - TTFT) /
(output tokens - 1), ITL and E2E latency at mean / median / chosen percentiles, request and
token throughput, and goodput under SLOs. It works against any OpenAI-compatible server, but
only on loopback addresses (it is a local benchmark, not a load-testing tool for other hosts),
and its sizes are bounded. Must not import server code.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

MAX_PROMPTS = 100_000
MAX_CONCURRENCY = 1024
MAX_INPUT_LEN = 1 << 20
TOKEN_ID_RANGE = (1000, 20000)
"""Random prompt token ids come from here: inside any Llama-family vocabulary, no specials."""


@dataclass
class BenchRequest:
    """One request of the workload."""

    prompt: list[int]
    output_len: int
    arrival_s: float | None = None
    """Offset from the start (trace workloads); None: drawn from the request rate."""


@dataclass
class RequestResult:
    """What one request measured (seconds)."""

    success: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


# ---------------------------------------------------------------------- workloads


def random_dataset(
    n: int, input_len: int, output_len: int, range_ratio: float, rng: random.Random
) -> list[BenchRequest]:
    """Prompts of random token ids; lengths uniform in [len * (1 - r), len * (1 + r)]."""
    lo, hi = TOKEN_ID_RANGE
    reqs = []
    for _ in range(n):
        ilen = _jitter(input_len, range_ratio, rng)
        reqs.append(
            BenchRequest(
                [rng.randrange(lo, hi) for _ in range(ilen)], _jitter(output_len, range_ratio, rng)
            )
        )
    return reqs


def prefix_repetition_dataset(
    n: int, prefix_len: int, suffix_len: int, num_prefixes: int, output_len: int, rng: random.Random
) -> list[BenchRequest]:
    """``num_prefixes`` shared prefixes, each request one of them plus a random suffix."""
    lo, hi = TOKEN_ID_RANGE
    prefixes = [[rng.randrange(lo, hi) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    reqs = []
    for i in range(n):
        suffix = [rng.randrange(lo, hi) for _ in range(suffix_len)]
        reqs.append(BenchRequest(prefixes[i % num_prefixes] + suffix, output_len))
    rng.shuffle(reqs)
    return reqs


def mooncake_dataset(
    path: Path, n: int, block_tokens: int, max_input_len: int, max_output_len: int, speedup: float
) -> list[BenchRequest]:
    """Requests of a Mooncake trace: each 512-token hash block becomes ``block_tokens`` tokens
    drawn from a generator seeded by the hash id, so equal hash prefixes are equal prompts."""
    reqs: list[BenchRequest] = []
    t0: float | None = None
    with path.open() as f:
        for line in f:
            if len(reqs) >= n:
                break
            row = json.loads(line)
            t0 = row["timestamp"] if t0 is None else t0
            scaled = max(1, row["input_length"] * block_tokens // 512)
            prompt = [tok for h in row["hash_ids"] for tok in _block(h, block_tokens)]
            prompt = prompt[: min(scaled, max_input_len)] or prompt[:1]
            output = max(1, min(int(row["output_length"]), max_output_len))
            reqs.append(BenchRequest(prompt, output, (row["timestamp"] - t0) / 1000 / speedup))
    return reqs


def _block(hash_id: int, size: int) -> list[int]:
    rng = random.Random(hash_id)
    lo, hi = TOKEN_ID_RANGE
    return [rng.randrange(lo, hi) for _ in range(size)]


def _jitter(length: int, ratio: float, rng: random.Random) -> int:
    return max(1, rng.randint(int(length * (1 - ratio)), int(length * (1 + ratio))))


def arrival_offsets(
    n: int, rate: float, burstiness: float, rng: np.random.Generator
) -> list[float]:
    """Start offsets: Gamma inter-arrivals with mean 1/rate (shape = burstiness; 1 = Poisson)."""
    if rate == float("inf"):
        return [0.0] * n
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return list(np.cumsum(gaps) - gaps[0])


# ---------------------------------------------------------------------- client side


def check_loopback(base_url: str) -> None:
    """Refuse anything but a loopback host (this benchmark is for local servers)."""
    host = urlparse(base_url).hostname or ""
    try:
        addrs = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise SystemExit(f"bench: cannot resolve {host!r}: {e}") from None
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise SystemExit(
            f"bench: {host!r} is not a loopback address; bench only targets local servers"
        )


async def send_request(
    client: httpx.AsyncClient, url: str, model: str, req: BenchRequest, ignore_eos: bool
) -> RequestResult:
    """Stream one completion; time the first token and every later chunk."""
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "stream": True,
        "temperature": 0.0,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult(False, len(req.prompt), start=time.perf_counter())
    chunks = 0
    last = result.start
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                data = line.removeprefix("data: ").strip()
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    result.error = str(obj["error"].get("message"))
                    return result
                if obj.get("usage"):
                    result.output_len = int(obj["usage"]["completion_tokens"])
                if obj.get("choices") and obj["choices"][0].get("text"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - result.start
    result.output_len = result.output_len or chunks
    result.success = chunks > 0 or result.output_len > 0
    return result


async def run_benchmark(args: argparse.Namespace, reqs: Sequence[BenchRequest]) -> dict[str, Any]:
    """Send ``reqs`` on their schedule (bounded by --max-concurrency); return the report."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or MAX_CONCURRENCY)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        model = args.model or await _first_model(client)
        offsets = _offsets(args, reqs)
        sem = asyncio.Semaphore(args.max_concurrency or MAX_CONCURRENCY)
        bar = _progress(len(reqs), args.disable_tqdm)
        start = time.perf_counter()

        async def one(req: BenchRequest, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with sem:
                res = await send_request(client, args.endpoint, model, req, args.ignore_eos)
            if bar is not None:
                bar.update(1)
            return res

        results = await asyncio.gather(*(one(r, o) for r, o in zip(reqs, offsets, strict=True)))
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    report = summarize(results, duration, args.percentiles, parse_goodput(args.goodput))
    report.update(
        model=model,
        dataset=args.dataset,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
    )
    report["_results"] = results
    return report


def _offsets(args: argparse.Namespace, reqs: Sequence[BenchRequest]) -> list[float]:
    if all(r.arrival_s is not None for r in reqs):
        return [float(r.arrival_s) for r in reqs]  # type: ignore[arg-type]
    rng = np.random.default_rng(args.seed)
    return arrival_offsets(len(reqs), args.request_rate, args.burstiness, rng)


async def _first_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


def _progress(total: int, disabled: bool) -> Any:
    if disabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="requests", file=sys.stderr)


# ---------------------------------------------------------------------- report


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> SLOs in milliseconds (keys ttft, tpot, e2el)."""
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"bench: --goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[key] = float(value)
    return slos


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2e}
    return all(measured[k] * 1000 <= v for k, v in slos.items())


def _stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1000 if len(values_s) else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    percentiles: Sequence[float],
    slos: dict[str, float],
) -> dict[str, Any]:
    """vLLM-named result fields (``completed``, ``request_throughput``, ``p99_ttft_ms``, ...)."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    report: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    if slos:
        report["goodput_slos_ms"] = slos
        report["request_goodput"] = sum(_meets(r, slos) for r in ok) / duration if duration else 0
    report.update(_stats("ttft", [r.ttft for r in ok], percentiles))
    report.update(_stats("tpot", [t for r in ok if (t := r.tpot) is not None], percentiles))
    report.update(_stats("itl", [x for r in ok for x in r.itl], percentiles))
    report.update(_stats("e2el", [r.e2e for r in ok], percentiles))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table, in vllm bench serve's layout."""
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, key: str, fmt: str = "{:<10.2f}") -> None:
        if key in report:
            lines.append(f"{label:<44}" + fmt.format(report[key]))

    row("Successful requests:", "completed", "{:<10}")
    row("Failed requests:", "failed", "{:<10}")
    row("Benchmark duration (s):", "duration")
    row("Total input tokens:", "total_input_tokens", "{:<10}")
    row("Total generated tokens:", "total_output_tokens", "{:<10}")
    row("Request throughput (req/s):", "request_throughput")
    row("Request goodput (req/s):", "request_goodput")
    row("Output token throughput (tok/s):", "output_throughput")
    row("Total token throughput (tok/s):", "total_token_throughput")
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        for key in [k for k in report if k.endswith(f"_{name}_ms") and not k.startswith("std")]:
            stat = key.split("_")[0].capitalize()
            row(f"{stat} {name.upper()} (ms):", key)
    lines.append("=" * 60)
    return "\n".join(lines)


def save_plot(results: Sequence[RequestResult], path: Path) -> None:
    """TTFT and E2E latency of every request against its start time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    t0 = min((r.start for r in ok), default=0.0)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter([r.start - t0 for r in ok], [r.ttft * 1000 for r in ok], s=8, label="TTFT")
    ax.scatter([r.start - t0 for r in ok], [r.e2e * 1000 for r in ok], s=8, label="E2E")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``splitserve bench serve`` (vllm bench serve's names)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="loopback server URL")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--dataset",
        "--dataset-name",
        dest="dataset",
        default="random",
        choices=["random", "prefix-repetition", "mooncake-trace"],
    )
    p.add_argument("--trace", type=Path, default=None, help="Mooncake JSONL (mooncake-trace)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=32)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--prefix-len", type=int, default=256, help="prefix-repetition")
    p.add_argument("--suffix-len", type=int, default=32, help="prefix-repetition")
    p.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition")
    p.add_argument(
        "--trace-block-tokens",
        type=int,
        default=512,
        help="tokens per 512-token trace block (shrink for small machines)",
    )
    p.add_argument("--trace-speedup", type=float, default=1.0, help="divide trace timestamps")
    p.add_argument("--max-input-len", type=int, default=MAX_INPUT_LEN)
    p.add_argument("--max-output-len", type=int, default=4096)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="req/s (inf: all)")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="SLO",
        help="SLOs such as ttft:500 tpot:50 e2el:2000 (milliseconds)",
    )
    p.add_argument(
        "--percentiles",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[50.0, 90.0, 99.0],
        help="comma-separated, e.g. 50,90,99",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of latencies here")
    p.add_argument("--disable-tqdm", action="store_true")


def _check_bounds(args: argparse.Namespace) -> None:
    if not 1 <= args.num_prompts <= MAX_PROMPTS:
        raise SystemExit(f"bench: --num-prompts must be in [1, {MAX_PROMPTS}]")
    if args.max_concurrency is not None and not 1 <= args.max_concurrency <= MAX_CONCURRENCY:
        raise SystemExit(f"bench: --max-concurrency must be in [1, {MAX_CONCURRENCY}]")
    if not 1 <= args.random_input_len <= MAX_INPUT_LEN or args.random_output_len < 1:
        raise SystemExit("bench: input / output lengths must be positive and bounded")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise SystemExit("bench: --request-rate and --burstiness must be positive")


def build_dataset(args: argparse.Namespace) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    if args.dataset == "random":
        return random_dataset(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            rng,
        )
    if args.dataset == "prefix-repetition":
        return prefix_repetition_dataset(
            args.num_prompts,
            args.prefix_len,
            args.suffix_len,
            args.num_prefixes,
            args.random_output_len,
            rng,
        )
    if args.trace is None:
        raise SystemExit("bench: --dataset mooncake-trace needs --trace PATH")
    return mooncake_dataset(
        args.trace,
        args.num_prompts,
        args.trace_block_tokens,
        args.max_input_len,
        args.max_output_len,
        args.trace_speedup,
    )


def main(args: argparse.Namespace) -> int:
    """Run ``bench serve``; prints the table, writes --json / --plot; 0 when all succeeded."""
    _check_bounds(args)
    check_loopback(args.base_url)
    reqs = build_dataset(args)
    report = asyncio.run(run_benchmark(args, reqs))
    results = report.pop("_results")
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        save_plot(results, args.plot)
    if report["failed"]:
        print(f"bench: {report['failed']} request(s) failed: {report['errors']}", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1
