"""The Triton implementation of every kernel, under the names and signatures of ``reference``.

``ops.get_ops`` returns this module on CUDA (or when ``SPLITSERVE_KERNELS=triton``). It only
gathers the launchers, one file per kernel; ``rope_cos_sin_cache`` is a table builder, not a
kernel, and is shared with the reference. Importing it needs Triton; nothing imports it on the
torch path.
"""

from __future__ import annotations

from splitserve.kernels.activation import silu_and_mul
from splitserve.kernels.block_copy import gather_blocks, scatter_blocks
from splitserve.kernels.decode_attention import paged_decode_attention
from splitserve.kernels.prefill_attention import prefill_attention
from splitserve.kernels.reference import rope_cos_sin_cache
from splitserve.kernels.rms_norm import rms_norm
from splitserve.kernels.rotary import rotary_embedding
from splitserve.kernels.store_kv import store_kv

__all__ = [
    "gather_blocks",
    "paged_decode_attention",
    "prefill_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "scatter_blocks",
    "silu_and_mul",
    "store_kv",
]
