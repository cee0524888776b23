"""The Triton implementation of every kernel, under the names and signatures of ``reference``.

``ops.get_ops`` returns this module on CUDA (or when ``SPLITSERVE_KERNELS=triton``). It only
gathers the launchers, one file per kernel; ``rope_cos_sin_cache`` (a table builder), the
MoE routing (``moe_route`` / ``moe_groups`` / ``moe_combine``: softmax, top-k, the weighted
sum of the k experts) are shared with the reference. Every cache argument may be fp8
(float8_e4m3fn / float8_e5m2) where it may be a float dtype: the kernels convert as
``kv_cache.to_cache_dtype`` / ``widen_kv`` do, in kernels/rounding.py. Importing it needs Triton; nothing imports it on the torch path.
"""

from __future__ import annotations

from splitserve.kernels.activation import gelu_tanh_and_mul, silu_and_mul
from splitserve.kernels.block_copy import gather_blocks, scatter_blocks
from splitserve.kernels.decode_attention import paged_decode_attention
from splitserve.kernels.fused_moe import fused_moe
from splitserve.kernels.int4_gemm import int4_weight_only_mm
from splitserve.kernels.prefill_attention import prefill_attention
from splitserve.kernels.reference import (
    _compose_rotary_store_kv,
    moe_combine,
    moe_groups,
    moe_route,
    rope_cos_sin_cache,
    softcap,
)
from splitserve.kernels.rms_norm import rms_norm
from splitserve.kernels.rotary import rotary_embedding
from splitserve.kernels.store_kv import store_kv

rotary_store_kv = _compose_rotary_store_kv(rms_norm, rotary_embedding, store_kv)

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
