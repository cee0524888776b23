"""Dense projections with weights prepared once at load: oneDNN-packed on CPU, plain elsewhere.

On CPU, ``F.linear`` goes to MKL's sgemm, which on this class of machine (AMD, AVX-512)
runs a generic path: ~16 GB/s of weight streaming at one token (one core, whatever the
thread count) and ~220 GFLOP/s when batched. oneDNN's inner product over a weight
reordered once into its blocked layout streams at memory bandwidth on every core
(~60 GB/s at one token) and reaches ~480 GFLOP/s batched, 2-4x faster at every batch
size (``bench/engine_throughput.py``). The result equals ``F.linear`` to float32
rounding (different summation order), so it is used for float32 only.

``SPLITSERVE_CPU_LINEAR=dense`` keeps plain ``F.linear`` (the reference).

    proj = Linear(weight, bias)   # weight [N, K], bias [N] or None
    y = proj(x)                   # x [T, K] -> [T, N]
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_PACK_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; fastest at every T measured


def packed_linear_available(weight: Tensor) -> bool:
    """True when ``weight`` will be served by the oneDNN-packed path."""
    if os.environ.get("SPLITSERVE_CPU_LINEAR", "").strip().lower() == "dense":
        return False
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """``y = x @ weight.T + bias`` with the weight laid out for the device once."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"Linear weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(
                f"Linear bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        self.dtype, self.device = weight.dtype, weight.device
        self.bias = bias
        self.packed = packed_linear_available(weight)
        if self.packed:
            with torch.no_grad():
                self.weight = torch.ops.mkldnn._reorder_linear_weight(
                    weight.contiguous(), _PACK_BATCH_HINT
                )
        else:
            self.weight = weight

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects {self.in_features} input features, got {x.shape[-1]}")
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.dtype:
            raise TypeError(f"Linear input dtype {x.dtype} does not match weight dtype {self.dtype}")
        if x.shape[0] == 0 or x.dim() != 2:
            lead = x.shape[:-1]
            out = self(x.reshape(-1, self.in_features)) if x.numel() else x.new_empty(0, self.out_features)
            return out.reshape(*lead, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.weight, self.bias, "none", [], ""
        )
