"""The CPU implementation of every kernel: the torch references, with paged decode attention
from the native C kernel (``native.py``; the reference wherever that kernel is unavailable or
does not take the operands).

``ops.get_ops`` returns this module for CPU tensors unless ``SPLITSERVE_KERNELS`` forces one.
"""

from __future__ import annotations

from splitserve.kernels.native import paged_decode_attention
from splitserve.kernels.reference import (
    fused_moe,
    gather_blocks,
    gelu_tanh_and_mul,
    int4_weight_only_mm,
    moe_combine,
    moe_groups,
    moe_route,
    prefill_attention,
    rms_norm,
    rope_cos_sin_cache,
    rotary_embedding,
    scatter_blocks,
    silu_and_mul,
    store_kv,
)

__all__ = [
    "fused_moe",
    "gather_blocks",
    "gelu_tanh_and_mul",
    "int4_weight_only_mm",
    "moe_combine",
    "moe_groups",
    "moe_route",
    "paged_decode_attention",
    "prefill_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "scatter_blocks",
    "silu_and_mul",
    "store_kv",
]
