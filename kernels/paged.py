"""Triton device functions shared by the two paged attention kernels.

Owns the pieces both attention files need in exactly the same form: addressing rows of the
paged KV cache through a block table, widening fp8 cache tiles to the query's dtype, the tile
matmul (with the interpreter's bfloat16 workaround), the logit soft-cap and one step of the
online softmax. No kernels, no launchers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from splitserve.kernels.rounding import fp8_decode


@triton.jit
def paged_row_offsets(
    table_row_ptr,  # [max_blocks] block ids of one sequence
    pos,  # [BLOCK_N] token positions in the sequence
    mask,  # [BLOCK_N] positions that are read
    stride_block,
    stride_tok,
    head_offset,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets (int64) of the rows at ``pos`` in a [num_blocks, block_size, ...] cache."""
    block_ids = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return block_ids * stride_block + (pos % BLOCK_SIZE).to(tl.int64) * stride_tok + head_offset


@triton.jit
def widen_kv(x, dtype: tl.constexpr, KV_FP8: tl.constexpr, FP8_E5M2: tl.constexpr):
    """A tile loaded from the cache, in the dtype attention computes with: with ``KV_FP8`` the
    tile holds fp8 bytes (uint8), decoded exactly to float32 and converted to ``dtype`` (exact
    too: every e4m3fn / e5m2 value is a float16 and a bfloat16); otherwise it is returned as is,
    as ``kv_cache.widen_kv``."""
    if KV_FP8:
        x = fp8_decode(x, FP8_E5M2).to(dtype)
    return x


@triton.jit
def tile_dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32.

    UPCAST feeds float32 operands (the interpreter mis-reads bfloat16 dots); IEEE asks for
    true float32 products instead of TF32, so float32 caches match the torch reference.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def soft_cap_logits(s, soft_cap):
    """``soft_cap * tanh(s / soft_cap)``, with tanh written through sigmoid (portable)."""
    return soft_cap * (2.0 * tl.sigmoid(2.0 * s / soft_cap) - 1.0)


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One tile of the online softmax.

    s: [M, N] float32 logits, -inf where masked; m_i, l_i: [M] running max and sum.
    Returns (p [M, N], alpha [M] to rescale the accumulator by, new m_i, new l_i). Rows that
    have seen nothing but -inf keep m = -inf and contribute zeros (no NaN).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new
