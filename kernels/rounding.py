"""Float conversions that round the same way under Triton's interpreter as on a GPU.

On a GPU, ``x.to(tl.bfloat16)`` rounds to nearest even; Triton's interpreter (3.9) truncates
instead, which would make CPU results of the kernels differ from their references by one
bfloat16 ulp. ``downcast`` adds the round-to-nearest-even bias by hand when ``EMULATE_RTNE`` is
set (interpreter and bfloat16 only), so compiled GPU code is untouched.

fp8 KV caches (``float8_e4m3fn`` / ``float8_e5m2``, no scale) are handled in software on their
bytes: the kernels get the cache as a ``torch.uint8`` view and ``fp8_encode`` / ``fp8_decode``
convert with integer ops only. Native fp8 casts are no option here: the interpreter rounds
``.to(tl.float8e5, fp_downcast_rounding="rtne")`` wrongly (it drops the carry into the
exponent), e4m3fn (``tl.float8e4nv``) has no conversions before sm_89, and the store must write
exactly ``kv_cache.to_cache_dtype``'s bytes: saturate at the largest finite value, round to
nearest even from float32, subnormals included. Integer code does the same on every GPU and
under the interpreter, and costs a few ALU ops per element of a memory-bound kernel. No kernels
here.
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


# fp8 formats as (mantissa bits, exponent bias, float32 bits of the largest finite value,
# value of one subnormal step): e4m3fn (448 = 0x43E00000, step 2^-9) and e5m2 (57344 =
# 0x47600000, step 2^-16).


@triton.jit
def fp8_encode(x, E5M2: tl.constexpr):
    """``x`` (float32) as an fp8 byte (uint8): ``E5M2`` picks float8_e5m2, else float8_e4m3fn.

    Bit-exact with ``x.clamp(-max, max).to(fp8)`` in torch: magnitudes past the largest finite
    value (infinities too) saturate to it, the rest round to nearest even (ties to an even
    mantissa, carries into the exponent, subnormals on the format's fixed step); zeros keep
    their sign; NaN becomes 0x7F with its sign.
    """
    if E5M2:
        byte = _fp8_encode(x, 2, 15, 0x47600000)
    else:
        byte = _fp8_encode(x, 3, 7, 0x43E00000)
    return byte


@triton.jit
def _fp8_encode(x, MANT: tl.constexpr, BIAS: tl.constexpr, MAX_BITS: tl.constexpr):
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    is_nan = mag > 0x7F800000
    mag = tl.minimum(mag, MAX_BITS)  # saturate (inf included); NaN is patched below
    exp32 = mag >> 23  # float32 biased exponent
    # normal in fp8 (exp32 - 127 + BIAS >= 1): round the float32 mantissa to MANT bits, to
    # nearest even, by integer add; a carry moves into the exponent field by itself
    shift: tl.constexpr = 23 - MANT
    rounded = mag + ((1 << (shift - 1)) - 1) + ((mag >> shift) & 1)
    normal = (rounded >> shift) - ((127 - BIAS) << MANT)
    # subnormal in fp8: the 24-bit significand shifted down to the format's step, to nearest
    # even; rounding up to 1 << MANT gives the smallest normal's byte, as it should
    sig = (mag & 0x7FFFFF) | 0x800000
    sub_shift = tl.minimum(shift + (128 - BIAS) - exp32, 25)  # >= shift + 1 where used
    sub_shift = tl.maximum(sub_shift, 1)  # (normal lanes: any valid shift)
    q = sig >> sub_shift
    rem = sig & ((1 << sub_shift) - 1)
    half = 1 << (sub_shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    byte = tl.where(exp32 >= 128 - BIAS, normal, q)
    byte = tl.where(is_nan, 0x7F, byte) | sign
    return byte.to(tl.uint8)


@triton.jit
def fp8_decode(byte, E5M2: tl.constexpr):
    """fp8 bytes (uint8) as the float32 values they encode, exactly: ``E5M2`` picks
    float8_e5m2, else float8_e4m3fn (with their infinities and NaNs)."""
    if E5M2:
        x = _fp8_decode(byte, 2, 15, 0.0000152587890625)
    else:
        x = _fp8_decode(byte, 3, 7, 0.001953125)
    return x


@triton.jit
def _fp8_decode(byte, MANT: tl.constexpr, BIAS: tl.constexpr, STEP: tl.constexpr):
    b = byte.to(tl.int32) & 0xFF
    mag = b & 0x7F
    exp8 = mag >> MANT
    # normal: exponent re-biased, mantissa moved to the top of float32's; subnormal: m * step
    normal = ((mag << (23 - MANT)) + ((127 - BIAS) << 23)).to(tl.float32, bitcast=True)
    x = tl.where(exp8 == 0, mag.to(tl.float32) * STEP, normal)
    if MANT == 2:  # e5m2: IEEE-style top exponent, inf or NaN
        special = tl.where(mag == 0x7C, float("inf"), float("nan"))
        x = tl.where(exp8 == 31, special, x)
    else:  # e4m3fn: only S.1111.111 is NaN, no infinities
        x = tl.where(mag == 0x7F, float("nan"), x)
    return tl.where(b >= 0x80, -x, x)
