"""What the processor does natively: bfloat16 arithmetic (AVX512_BF16 / AMX), read once.

Owns the choice ``dtype="auto"`` makes on a CPU: bfloat16 activations when the processor
has native bf16 (the ``avx512_bf16`` or ``amx_bf16`` flag in /proc/cpuinfo) *and* a short
matmul probe at start confirms it (bf16 no slower than a few times fp32: emulated bf16 runs
hundreds of times slower), float32 otherwise. The probe's figures and the reason are kept
so the engine can log and report them. It must not pick kernels (``linear.py`` does).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_PROBE_SIZE = 256  # square matmul of the probe: ~34 MFLOP, well under a millisecond when native
_PROBE_SLOWDOWN = 10.0  # bf16 slower than fp32 by more than this: emulated (~500x), not native


@dataclass(frozen=True)
class Bf16Support:
    """Native bfloat16 on this CPU, as the flags and the probe saw it."""

    flags: tuple[str, ...]
    """The bf16 flags /proc/cpuinfo lists (empty when none)."""
    fp32_gflops: float
    """Probe matmul rate in float32."""
    bf16_gflops: float
    """Probe matmul rate in bfloat16."""

    @property
    def native(self) -> bool:
        return bool(self.flags) and self.bf16_gflops * _PROBE_SLOWDOWN >= self.fp32_gflops

    def describe(self) -> str:
        flags = ",".join(self.flags) or "no avx512_bf16/amx_bf16 flag"
        return (
            f"{flags}; probe matmul bf16 {self.bf16_gflops:.0f} GFLOP/s vs fp32 "
            f"{self.fp32_gflops:.0f} GFLOP/s"
        )


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _gflops(dtype: torch.dtype) -> float:
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE).to(dtype)
    b = torch.randn(_PROBE_SIZE, _PROBE_SIZE).to(dtype)
    a @ b  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * _PROBE_SIZE**3 / max(best, 1e-9) / 1e9


@functools.cache
def bf16_support() -> Bf16Support:
    """Flags and probe, measured once per process."""
    flags = tuple(f for f in BF16_FLAGS if f in cpu_flags())
    return Bf16Support(flags, _gflops(torch.float32), _gflops(torch.bfloat16))
