"""Kernel-test set-up: run Triton through its interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, at
import time, before any test module imports ``splitserve.kernels.*``. When the package is not
installed (a bare checkout on a GPU machine), the checkout's folders are mapped onto the
``splitserve`` namespace the way pyproject's package-dir mapping does.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _map_checkout() -> None:
    import splitserve

    if importlib.util.find_spec("splitserve.kernels") is None:
        splitserve.__path__.append(str(Path(__file__).resolve().parents[2]))


_map_checkout()
