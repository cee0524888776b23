"""GPU check for the Triton kernels: their tests on the GPU, then each timed against torch.

One command, sized to finish inside 10 minutes on one GPU:

    python bench/kernels_gpu.py [--json PATH] [--skip-tests] [--test-timeout S]

1. runs every kernel test natively on the GPU: the ``gpu`` ones (full-size grids and a cache
   past 2**31 elements) and the default ones (features, odd shapes, bad input);
2. measures the device: copy bandwidth (bytes read + written by a 1 GiB device-to-device copy)
   and the bfloat16 matmul rate (8192^3);
3. times every kernel and its torch reference on the same inputs (CUDA events, median of
   repeats) and prints achieved GB/s (TFLOP/s for prefill) beside those device numbers, with
   the issue's targets: decode attention (batch 64, context 4096, bf16) >= 60% of copy
   bandwidth, store_kv and gather/scatter >= 70%, every kernel at least as fast as its
   reference.

Kernels are timed with ``SPLITSERVE_KERNEL_CHECKS=0`` (no index read-back); the column
``checked`` repeats the timing with the launchers' value checks on, called again and again on
the same index tensors, i.e. what every layer after the first pays in an engine step (a check
that passed is remembered until the tensor changes). Works from a bare checkout
(the package need not be installed). Owns no kernels; prints and writes JSON only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import torch

Tensor = torch.Tensor
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # "cpu" only for --smoke (plumbing check under TRITON_INTERPRET=1)
SMALL = False  # --smoke: tiny shapes


def pick(full: int, small: int) -> int:
    """A size: ``full`` on the GPU, ``small`` in a --smoke run."""
    return small if SMALL else full


def _map_checkout() -> None:
    """Import ``splitserve.kernels`` from this checkout even when nothing is installed."""
    sys.path.insert(0, str(ROOT))
    import splitserve

    if importlib.util.find_spec("splitserve.kernels") is None:
        splitserve.__path__.append(str(ROOT))


@dataclass
class Row:
    """One timed kernel against its reference."""

    name: str
    shape: str
    kernel_ms: float
    reference_ms: float
    checked_ms: float
    unit: str  # "GB/s" or "TFLOP/s"
    achieved: float
    fraction_of_device: float
    target_fraction: float | None
    meets_target: bool | None = None
    faster_than_reference: bool = field(init=False)

    def __post_init__(self) -> None:
        self.faster_than_reference = self.kernel_ms <= self.reference_ms
        if self.target_fraction is not None:
            self.meets_target = self.fraction_of_device >= self.target_fraction


# --------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` on the current stream, in milliseconds (CUDA events)."""
    if DEVICE != "cuda":
        repeats, warmup = 1, 1
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def with_checks(enabled: bool) -> None:
    os.environ["SPLITSERVE_KERNEL_CHECKS"] = "1" if enabled else "0"


def measure_device() -> dict[str, float]:
    """Copy bandwidth (read + write bytes) and bf16 matmul rate of this GPU."""
    size = pick(2**30, 2**20)
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    n = pick(8192, 64)
    a = torch.randn((n, n), dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn((n, n), dtype=torch.bfloat16, device=DEVICE)
    mm_ms = time_ms(lambda: a @ b, repeats=10)
    return {
        "copy_gbps": 2 * size / copy_ms / 1e6,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
    }


def compare(
    name: str,
    shape: str,
    kernel: Callable[[], object],
    reference: Callable[[], object],
    amount: float,
    unit: str,
    device_rate: float,
    target: float | None,
) -> Row:
    """Time kernel (checks off, then on) and reference; ``amount`` is bytes or FLOPs."""
    with_checks(False)
    kernel_ms = time_ms(kernel)
    with_checks(True)
    checked_ms = time_ms(kernel)
    reference_ms = time_ms(reference)
    scale = 1e6 if unit == "GB/s" else 1e9
    achieved = amount / kernel_ms / scale
    return Row(
        name,
        shape,
        kernel_ms,
        reference_ms,
        checked_ms,
        unit,
        achieved,
        achieved / device_rate,
        target,
    )


# --------------------------------------------------------------------------- cases


def bench_all(device: dict[str, float]) -> list[Row]:
    from splitserve.kernels import reference as ref
    from splitserve.kernels import triton_ops as tri

    bw, mm = device["copy_gbps"], device["matmul_tflops"]
    rows = [
        bench_decode(tri, ref, bw),
        *bench_prefill(tri, ref, mm),
        bench_store_kv(tri, ref, bw),
        *bench_block_copy(tri, ref, bw),
        bench_rms_norm(tri, ref, bw),
        bench_silu(tri, ref, bw),
        bench_rotary(tri, ref, bw),
    ]
    return rows


def _cache(num_blocks: int, block_size: int = 16, kv_heads: int = 8, head_dim: int = 128) -> Tensor:
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, dtype=torch.bfloat16, device=DEVICE)


def bench_decode(tri: ModuleType, ref: ModuleType, bw: float) -> Row:
    batch, context = pick(64, 2), pick(4096, 64)
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    cols = context // block_size
    cache = _cache(batch * cols + 16)
    tables = torch.randperm(batch * cols, device=DEVICE).view(batch, cols).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    query = torch.randn((batch, heads, head_dim), dtype=torch.bfloat16, device=DEVICE)
    scale = head_dim**-0.5
    kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
    amount = kv_bytes + 2 * query.numel() * 2 + tables.numel() * 4
    return compare(
        "paged_decode_attention",
        f"B={batch} ctx={context} H={heads} KH={kv_heads} D={head_dim} bf16",
        lambda: tri.paged_decode_attention(query, cache, tables, lens, scale),
        lambda: ref.paged_decode_attention(query, cache, tables, lens, scale),
        amount,
        "GB/s",
        bw,
        0.60,
    )


def bench_prefill(tri: ModuleType, ref: ModuleType, mm: float) -> list[Row]:
    rows = []
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    for label, chunks in (
        ("8 prompts of 2048", [(pick(2048, 16), pick(2048, 16))] * pick(8, 1)),
        ("4 chunks of 512 on 3584 cached", [(pick(512, 16), pick(4096, 64))] * pick(4, 1)),
    ):
        cols = max(c for _, c in chunks) // block_size
        cache = _cache(len(chunks) * cols + 16)
        tables = torch.randperm(len(chunks) * cols, device=DEVICE).view(len(chunks), cols).int()
        starts = [0]
        for q_len, _ in chunks:
            starts.append(starts[-1] + q_len)
        qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([c for _, c in chunks], dtype=torch.int32, device=DEVICE)
        query = torch.randn((starts[-1], heads, head_dim), dtype=torch.bfloat16, device=DEVICE)
        # causal pairs: chunk row i (position ctx - q + i) sees ctx - q + i + 1 keys
        pairs = sum(q * (c - q) + q * (q + 1) / 2 for q, c in chunks)
        flops = 4 * heads * head_dim * pairs
        rows.append(
            compare(
                "prefill_attention",
                f"{label}, H={heads} KH={kv_heads} D={head_dim} bf16",
                lambda q=query, c=cache, t=tables, s=qsl, n=lens: tri.prefill_attention(
                    q, c, t, s, n, 0.1
                ),
                lambda q=query, c=cache, t=tables, s=qsl, n=lens: ref.prefill_attention(
                    q, c, t, s, n, 0.1
                ),
                flops,
                "TFLOP/s",
                mm,
                None,
            )
        )
    return rows


def bench_store_kv(tri: ModuleType, ref: ModuleType, bw: float) -> Row:
    tokens, kv_heads, head_dim, block_size = pick(32768, 16), 8, 128, 16
    cache = _cache(tokens // block_size + 64)
    slots = torch.randperm(cache.shape[1] * block_size, device=DEVICE)[:tokens]
    key = torch.randn((tokens, kv_heads, head_dim), dtype=torch.bfloat16, device=DEVICE)
    value = torch.randn_like(key)
    amount = 2 * 2 * key.numel() * 2 + slots.numel() * 8
    return compare(
        "store_kv",
        f"T={tokens} KH={kv_heads} D={head_dim} bf16",
        lambda: tri.store_kv(key, value, cache, slots),
        lambda: ref.store_kv(key, value, cache, slots),
        amount,
        "GB/s",
        bw,
        0.70,
    )


def bench_block_copy(tri: ModuleType, ref: ModuleType, bw: float) -> list[Row]:
    layers, num_blocks, n = pick(32, 2), pick(2048, 8), pick(512, 4)
    stacked = torch.randn((layers, 2, num_blocks, 16, 8, 128), dtype=torch.bfloat16, device=DEVICE)
    caches = list(stacked.unbind(0))
    ids = torch.randperm(num_blocks, device=DEVICE)[:n]
    staging = tri.gather_blocks(caches, ids)
    amount = 2 * staging.numel() * 2
    shape = f"L={layers} n={n} blocks of 16x8x128 bf16 ({staging.numel() * 2 / 2**30:.1f} GiB)"
    dest = torch.randperm(num_blocks, device=DEVICE)[:n]
    return [
        compare(
            "gather_blocks",
            shape,
            lambda: tri.gather_blocks(caches, ids, staging),
            lambda: ref.gather_blocks(caches, ids, staging),
            amount,
            "GB/s",
            bw,
            0.70,
        ),
        compare(
            "scatter_blocks",
            shape,
            lambda: tri.scatter_blocks(staging, caches, dest),
            lambda: ref.scatter_blocks(staging, caches, dest),
            amount,
            "GB/s",
            bw,
            0.70,
        ),
    ]


def bench_rms_norm(tri: ModuleType, ref: ModuleType, bw: float) -> Row:
    tokens, hidden = pick(8192, 4), 4096
    x = torch.randn((tokens, hidden), dtype=torch.bfloat16, device=DEVICE)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=torch.bfloat16, device=DEVICE)
    return compare(
        "rms_norm",
        f"T={tokens} H={hidden} +residual bf16",
        lambda: tri.rms_norm(x, weight, 1e-6, residual),
        lambda: ref.rms_norm(x, weight, 1e-6, residual),
        4 * x.numel() * 2,
        "GB/s",
        bw,
        None,
    )


def bench_silu(tri: ModuleType, ref: ModuleType, bw: float) -> Row:
    tokens, inter = pick(8192, 4), 14336
    x = torch.randn((tokens, 2 * inter), dtype=torch.bfloat16, device=DEVICE)
    return compare(
        "silu_and_mul",
        f"T={tokens} I={inter} bf16",
        lambda: tri.silu_and_mul(x),
        lambda: ref.silu_and_mul(x),
        3 * tokens * inter * 2,
        "GB/s",
        bw,
        None,
    )


def bench_rotary(tri: ModuleType, ref: ModuleType, bw: float) -> Row:
    tokens, heads, kv_heads, head_dim = pick(8192, 4), 32, 8, 128
    table = ref.rope_cos_sin_cache(head_dim, 8192, 500000.0).to(DEVICE)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    query = torch.randn((tokens, heads, head_dim), dtype=torch.bfloat16, device=DEVICE)
    key = torch.randn((tokens, kv_heads, head_dim), dtype=torch.bfloat16, device=DEVICE)
    amount = 2 * (query.numel() + key.numel()) * 2 + tokens * head_dim * 4
    return compare(
        "rotary_embedding",
        f"T={tokens} H={heads} KH={kv_heads} D={head_dim} bf16",
        lambda: tri.rotary_embedding(positions, query, key, table),
        lambda: ref.rotary_embedding(positions, query, key, table),
        amount,
        "GB/s",
        bw,
        None,
    )


# --------------------------------------------------------------------------- report


def run_gpu_tests(timeout_s: int) -> dict[str, object]:
    """All kernel tests, ``gpu`` ones included, in a child process (xdist when installed)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "not slow",
        "tests/kernels",
        "-q",
        "-rf",
        "--durations=8",
        "-p",
        "no:benchmark",
        "-o",
        "addopts=-p no:cacheprovider",
    ]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        rc, output = -1, f"{partial}\ntimed out after {timeout_s} s"
    lines = [line for line in output.splitlines() if line.strip() and "Warning" not in line]
    print("\n".join(lines[-25:]))
    return {
        "returncode": rc,
        "seconds": round(time.perf_counter() - started, 1),
        "summary": next((line for line in reversed(lines) if _is_summary(line)), ""),
    }


def _is_summary(line: str) -> bool:
    """pytest's closing line, e.g. ``1 failed, 334 passed, 1 skipped in 23.78s``."""
    return " in " in line and any(word in line for word in ("passed", "failed", "error"))


def print_table(device: dict[str, float], rows: list[Row]) -> None:
    print(
        f"\ndevice: {device_name()}  copy {device['copy_gbps']:.0f} GB/s "
        f"(read+write)  bf16 matmul {device['matmul_tflops']:.0f} TFLOP/s"
    )
    header = (
        f"{'kernel':<24}{'triton ms':>10}{'checked':>9}{'torch ms':>10}{'speedup':>9}"
        f"{'achieved':>18}{'of device':>10}{'target':>8}  shape"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        target = "-" if r.target_fraction is None else f"{r.target_fraction:.0%}"
        verdict = "" if r.meets_target is None else (" ok" if r.meets_target else " MISS")
        slower = "" if r.faster_than_reference else " SLOWER"
        print(
            f"{r.name:<24}{r.kernel_ms:>10.3f}{r.checked_ms:>9.3f}{r.reference_ms:>10.3f}"
            f"{r.reference_ms / r.kernel_ms:>8.2f}x{r.achieved:>10.1f} {r.unit:<7}"
            f"{r.fraction_of_device:>10.0%}{target:>8}{verdict}{slower}  {r.shape}"
        )


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--skip-tests", action="store_true", help="time only")
    parser.add_argument("--test-timeout", type=int, default=240, help="seconds for pytest")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (plumbing only)",
    )
    args = parser.parse_args()
    global DEVICE, SMALL
    if args.smoke:
        DEVICE, SMALL = "cpu", True
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU", file=sys.stderr)
        return 2
    _map_checkout()
    import triton

    print(f"{device_name()}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
    tests = {"skipped": True} if args.skip_tests else run_gpu_tests(args.test_timeout)
    device = measure_device()
    rows = bench_all(device)
    print_table(device, rows)
    result = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tests": tests,
        **device,
        "kernels": [asdict(r) for r in rows],
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    tests_ok = args.skip_tests or tests.get("returncode") == 0
    targets_ok = all(r.meets_target is not False and r.faster_than_reference for r in rows)
    return 0 if tests_ok and targets_ok else 1


if __name__ == "__main__":
    sys.exit(main())
