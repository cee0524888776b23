"""Kernel dispatch: Triton on CUDA tensors, ``cpu_ops`` (the torch references with the native
C kernels) on CPU tensors, the references elsewhere.

``SPLITSERVE_KERNELS=triton`` forces Triton (with ``TRITON_INTERPRET=1`` it runs on CPU);
``SPLITSERVE_KERNELS=torch`` forces the pure-torch references; ``native`` forces ``cpu_ops``.
The engine asks once, at start-up.
"""

from __future__ import annotations

from types import ModuleType

import torch

from splitserve import env

BACKENDS = ("torch", "triton", "native")


def select_backend(device: torch.device | str) -> str:
    """The backend for tensors on ``device``, honouring ``SPLITSERVE_KERNELS``."""
    forced = env.SPLITSERVE_KERNELS.get().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SPLITSERVE_KERNELS must be one of {BACKENDS}, got {forced!r}")
        return forced
    kind = torch.device(device).type
    if kind == "cuda" and _triton_available():
        return "triton"
    return "native" if kind == "cpu" else "torch"


def get_ops(device: torch.device | str) -> ModuleType:
    """The module whose functions implement every kernel for ``device``."""
    backend = select_backend(device)
    if backend == "triton":
        from splitserve.kernels import triton_ops

        return triton_ops
    if backend == "native":
        from splitserve.kernels import cpu_ops

        return cpu_ops
    from splitserve.kernels import reference

    return reference


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
