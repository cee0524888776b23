"""Float downcasts that round the same way under Triton's interpreter as on a GPU.

On a GPU, ``x.to(tl.bfloat16)`` rounds to nearest even; Triton's interpreter (3.9) truncates
instead, which would make CPU results of the kernels differ from their references by one
bfloat16 ulp. ``downcast`` adds the round-to-nearest-even bias by hand when ``EMULATE_RTNE`` is
set (interpreter and bfloat16 only), so compiled GPU code is untouched. No kernels here.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def downcast(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``x`` (float32) converted to ``dtype``, rounding to nearest even."""
    if EMULATE_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # truncation of this = RTNE of x (finite x)
        # zeros and subnormals keep their value: the interpreter mangles subnormal inputs
        x = tl.where(tl.abs(x) < 1.1754943508222875e-38, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
