"""An engine's numeric formats: the activation dtype ``dtype="auto"`` resolves to, and what its
weights are stored as; both logged at start and reported by ``LLMEngine.info()`` (``/version``).

Owns ``resolve_dtype`` (``EngineConfig.dtype`` name -> torch dtype, with the reason) and
``weight_summary`` (tensor count and bytes per storage format of a loaded checkpoint). It
must not load or convert weights.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from splitserve.kernels.cpu_features import bf16_support
from splitserve.kernels.quant import QuantizedWeight

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Explicit ``EngineConfig.dtype`` names -> torch dtypes."""


@dataclass(frozen=True)
class DtypeChoice:
    """The activation / KV dtype an engine runs in, and why."""

    dtype: torch.dtype
    requested: str
    """The ``EngineConfig.dtype`` it came from."""
    reason: str
    """One line: the processor's bf16 support as seen, or 'requested'."""
    slow: bool = False
    """bfloat16 asked for on a CPU without native bf16 (emulated: very slow)."""

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def report(self) -> dict[str, Any]:
        out = {"dtype": self.name, "dtype_requested": self.requested, "dtype_reason": self.reason}
        if self.slow:
            out["dtype_warning"] = "bfloat16 without native CPU support: emulated, slow"
        return out


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> DtypeChoice:
    """``auto`` -> bfloat16 where the hardware has it natively (CPU: avx512_bf16 / amx_bf16
    flag confirmed by a matmul probe; CUDA: bf16-capable GPUs), else float32 (float16 on
    older GPUs). An explicit bfloat16 on a CPU without it warns that it will be slow."""
    kind = torch.device(device).type
    if name == "auto":
        choice = _auto(kind)
        logger.info("dtype auto -> %s (%s)", choice.name, choice.reason)
        return choice
    dtype = TORCH_DTYPES[name]
    if kind == "cpu" and dtype == torch.bfloat16:
        support = bf16_support()
        if not support.native:
            logger.warning(
                "dtype bfloat16 on a CPU without native bf16 (%s): emulated, it will be slow",
                support.describe(),
            )
            return DtypeChoice(dtype, name, f"requested; {support.describe()}", slow=True)
    return DtypeChoice(dtype, name, "requested")


def _auto(kind: str) -> DtypeChoice:
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "auto", "GPU with bf16")
        return DtypeChoice(torch.float16, "auto", "GPU without bf16")
    if kind != "cpu":
        return DtypeChoice(torch.float32, "auto", f"{kind}: float32")
    support = bf16_support()
    dtype = torch.bfloat16 if support.native else torch.float32
    verdict = "native bf16" if support.native else "no native bf16"
    return DtypeChoice(dtype, "auto", f"{verdict}: {support.describe()}")


def weight_format(t: Any) -> str:
    """Storage format name of one checkpoint tensor (``int4:Q4_1``, ``int8``, ``float32``...;
    ``:a8`` after an int4 weight asked to run with 8-bit activations, ``quantization="w4a8"``)."""
    if isinstance(t, QuantizedWeight):
        name = t.kind if t.source == "rtn" else f"{t.kind}:{t.source}"
        return name if t.act_bits == 16 else f"{name}:a{t.act_bits}"
    return str(t.dtype).removeprefix("torch.")


def weight_summary(weights: dict[str, Any]) -> dict[str, Any]:
    """``{"formats": {format: tensor count}, "weight_bytes": total}`` of a checkpoint."""
    formats: Counter[str] = Counter()
    total = 0
    for t in weights.values():
        formats[weight_format(t)] += 1
        total += t.nbytes if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()
    return {"formats": dict(sorted(formats.items())), "weight_bytes": total}
