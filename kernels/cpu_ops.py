"""The CPU implementation of every kernel: the torch references, with paged decode and
(short-span) prefill attention, RMSNorm, the rotary + K/V store step, logit soft-capping and
the gated MLP activations from the native C kernels (``native.py``; the reference wherever a
kernel is unavailable or does not take the operands).

``ops.get_ops`` returns this module for CPU tensors unless ``SPLITSERVE_KERNELS`` forces one.
"""

from __future__ import annotations

from splitserve.kernels.native import (
    gelu_tanh_and_mul,
    paged_decode_attention,
    prefill_attention,
    rms_norm,
    rotary_store_kv,
    silu_and_mul,
    softcap,
)
from splitserve.kernels.reference import (
    fused_moe,
    gather_blocks,
    int4_weight_only_mm,
    moe_combine,
    moe_groups,
    moe_route,
    rope_cos_sin_cache,
    rotary_embedding,
    scatter_blocks,
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
    "rotary_store_kv",
    "scatter_blocks",
    "silu_and_mul",
    "softcap",
    "store_kv",
]
