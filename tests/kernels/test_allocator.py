"""glibc malloc tuning (kernels/allocator.py): the page faults it removes, its opt-out, and
that a CPU engine applies it and reports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve import LLM
from splitserve.kernels import allocator

ROOT = Path(__file__).resolve().parents[2]

# Fresh interpreter each time: the settings are process-wide and applied once.
# - ``in_heap``: where a 30 MiB tensor lands. glibc's defaults map anything above 128 KiB
#   (or above the largest block freed so far) with its own mmap, which is unmapped on free and
#   faulted in and zeroed again on the next allocation; tuned, it comes from the heap (below
#   the program break).
# - ``faults``: minor page faults over 20 calls of the shape that suffered (a few 6-16 MiB
#   temporaries freed at the end of each call, as in the rotary embedding of a long chunk).
#   Remapped every call, that is 20 x 3 x 4,096 = 245,760 faults. Under the defaults it is
#   erratic (25,000 to 327,000 here, by heap layout); tuned it stayed at 0-25,000.
_PROBE = r"""
import ctypes, json, resource, sys
import torch
from splitserve.kernels import allocator

libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
result = allocator.tune() if sys.argv[1] == "tune" else None
big = torch.ones(30 << 20, dtype=torch.uint8)
in_heap = big.data_ptr() < libc.sbrk(0)
del big
x = torch.randn(4096, 16, 64)
c = torch.randn(4096, 1, 64)

def workload():
    swapped = torch.cat([x[..., 32:], x[..., :32]], dim=-1)
    return (x * c + swapped * c).sum().item()

workload()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    workload()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"in_heap": in_heap, "faults": faults,
                  "applied": result.applied if result else None,
                  "reason": result.reason if result else None,
                  "again": allocator.tune() is result if result else None}))
"""


def _probe(mode: str, **env: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_tuned_blocks_stay_in_the_heap_and_stop_faulting() -> None:
    default = _probe("default")
    assert not default["in_heap"], default  # glibc's own mmap: the baseline this changes
    out = _probe("tune")
    assert out["applied"], out["reason"]
    assert "M_MMAP_THRESHOLD=32 MiB" in out["reason"] and out["again"]
    assert out["in_heap"], out
    assert out["faults"] < 245_760 // 4, out  # the temporaries are not remapped per call


def test_opt_out_keeps_glibc_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*args: object, **kwargs: object) -> None:
        raise AssertionError("the C library was opened")

    monkeypatch.setenv("SPLITSERVE_MALLOC_TUNING", "0")
    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    out = allocator._apply()
    assert not out.applied and "SPLITSERVE_MALLOC_TUNING=0" in out.reason


def test_a_cpu_engine_applies_it_and_reports_it(tiny_model_dir: Path) -> None:
    info = LLM(str(tiny_model_dir), num_kv_blocks=16).engine.info()
    assert info["malloc_tuning"] is not None and "M_TRIM_THRESHOLD" in info["malloc_tuning"]
