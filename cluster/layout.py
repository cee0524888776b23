"""Which workers ``splitserve serve`` starts on this machine when no ``--config`` says so.

Owns the one-machine default: prefill/decode disaggregation only pays for itself when each
role has a device of its own. With fewer devices than the two roles (a CPU-only machine with
one memory domain, a single GPU), splitting them halves each role's compute, adds a KV hop
and per-token streaming between processes, so the default runs decode workers that prefill
every prompt themselves (``router.local_prefill_max_tokens: all``: conditional
disaggregation with no prefill role); with a device per role (two or more GPUs, or CPU NUMA
nodes) it keeps one prefill and one decode worker. Explicit ``--config`` or
``--prefill-workers`` / ``--decode-workers`` are never second-guessed.

Must not: start anything (Ray, workers) or import torch at import time; it only reads the
machine (``/sys`` NUMA nodes, CUDA device count when ``device`` is ``cuda``) and says what
to start, with the reason in words for the log, ``status()`` and the startup line.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DISAGGREGATED_ROLES = 2
"""Devices a prefill/decode split needs on one machine: one per role."""

_NODE_DIR = Path("/sys/devices/system/node")


@dataclass(frozen=True)
class Devices:
    """What this machine offers the local cluster's workers."""

    kind: str
    """``cpu`` (devices are NUMA nodes: memory domains whose cores a role could own) or
    ``cuda`` (devices are GPUs)."""
    count: int
    """How many such devices the workers may use (>= 1 on CPU)."""
    cores: int
    """CPU cores this process may run on."""

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"Devices.kind must be 'cpu' or 'cuda', got {self.kind!r}")
        if self.count < 0 or self.cores < 1:
            raise ValueError(f"Devices needs count >= 0 and cores >= 1, got {self}")

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"{self.count} GPU{'s' if self.count != 1 else ''}"
        nodes = f"{self.count} NUMA node{'s' if self.count != 1 else ''}"
        return f"{self.cores} CPU core{'s' if self.cores != 1 else ''} in {nodes}, no GPU"


@dataclass(frozen=True)
class LocalLayout:
    """Workers per role for a local cluster, and why."""

    prefill: int
    decode: int
    num_gpus_per_worker: float
    """0 on CPU; 1 when each worker owns a GPU."""
    reason: str
    """One line for the log, the startup output and ``status()``."""

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 1:
            raise ValueError(f"LocalLayout needs prefill >= 0 and decode >= 1, got {self}")

    @property
    def colocated(self) -> bool:
        """Decode workers prefill every prompt (no prefill role)."""
        return self.prefill == 0


def detect_devices(device: str = "cpu") -> Devices:
    """This machine's devices for ``device`` (``cpu`` or ``cuda``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = cores or os.cpu_count() or 1
    if device.startswith("cuda"):
        import torch  # only when GPUs are asked for

        return Devices("cuda", int(torch.cuda.device_count()), cores)
    return Devices("cpu", numa_nodes(), cores)


def numa_nodes(node_dir: Path = _NODE_DIR) -> int:
    """NUMA nodes with CPUs (1 when ``/sys`` does not say: one memory domain)."""
    try:
        nodes = [p for p in node_dir.iterdir() if re.fullmatch(r"node\d+", p.name)]
    except OSError:
        return 1
    with_cpus = 0
    for node in nodes:
        try:
            cpulist = (node / "cpulist").read_text().strip()
        except OSError:
            continue
        with_cpus += bool(cpulist)
    return max(1, with_cpus)


def choose_layout(devices: Devices) -> LocalLayout:
    """1 prefill + 1 decode worker when every role has a device of its own; otherwise one
    decode worker that prefills every prompt itself (per device, so a GPU's worker owns it)."""
    have = devices.describe()
    gpu = 1.0 if devices.kind == "cuda" else 0.0
    if devices.kind == "cuda" and devices.count == 0:
        raise ValueError("--device cuda: no CUDA device is visible")
    if devices.count >= DISAGGREGATED_ROLES:
        return LocalLayout(
            1, 1, gpu,
            f"disaggregated: 1 prefill + 1 decode worker ({have}: a device per role)",
        )
    return LocalLayout(
        0, 1, gpu,
        f"colocated: 1 decode worker prefills every prompt ({have}: fewer devices than the "
        f"{DISAGGREGATED_ROLES} roles, where a prefill/decode split only halves each role's "
        "compute; --prefill-workers 1 asks for the split)",
    )
