"""Rotary embedding, neox style (rotate halves), for query and key in one launch.

Owns ``_rotary_embedding_kernel`` (one program per token, all heads of q and k) and its typed
launcher. The frequencies (Llama-3 scaling included) live in the [cos | sin] table built by
``reference.rope_cos_sin_cache``; this file only applies them. Out of place, math in float32,
like ``reference.rotary_embedding``; dims past ``rotary_dim`` are copied unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_inner_contiguous,
    check_range,
    check_runnable,
    check_same_device,
    check_same_dtype,
    check_shape,
    emulate_rtne,
    next_power_of_2,
    require,
)
from splitserve.kernels.rounding import downcast

Tensor = torch.Tensor


@triton.jit
def _rotate_heads(
    src_ptr,  # [num_heads, head_dim] rows of one token
    dst_ptr,  # [num_heads, head_dim] contiguous
    stride_head,
    num_heads,
    head_dim,
    half,
    cos,  # [BLOCK_HALF] float32
    sin,  # [BLOCK_HALF] float32
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    USE_TAIL: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < half)
    src = src_ptr + h * stride_head + d
    dst = dst_ptr + h * head_dim + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        dst,
        downcast(x1 * cos[None, :] - x2 * sin[None, :], dst_ptr.dtype.element_ty, EMULATE_RTNE),
        mask=mask,
    )
    tl.store(
        dst + half,
        downcast(x2 * cos[None, :] + x1 * sin[None, :], dst_ptr.dtype.element_ty, EMULATE_RTNE),
        mask=mask,
    )
    if USE_TAIL:
        t = 2 * half + tl.arange(0, BLOCK_TAIL)[None, :]
        t_mask = (h < num_heads) & (t < head_dim)
        tail = tl.load(src_ptr + h * stride_head + t, mask=t_mask)
        tl.store(dst_ptr + h * head_dim + t, tail, mask=t_mask)


@triton.jit
def _rotary_embedding_kernel(
    positions_ptr,  # [T]
    query_ptr,  # [T, num_heads, head_dim]
    key_ptr,  # [T, num_kv_heads, head_dim]
    cos_sin_ptr,  # [max_position, rotary_dim] float32
    query_out_ptr,  # [T, num_heads, head_dim]
    key_out_ptr,  # [T, num_kv_heads, head_dim]
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_heads,
    num_kv_heads,
    head_dim,
    half,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    USE_TAIL: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cache + d, mask=d < half, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cache + half + d, mask=d < half, other=0.0)
    _rotate_heads(
        query_ptr + tok * stride_qt,
        query_out_ptr + tok * num_heads * head_dim,
        stride_qh,
        num_heads,
        head_dim,
        half,
        cos,
        sin,
        BLOCK_Q_HEADS,
        BLOCK_HALF,
        BLOCK_TAIL,
        USE_TAIL,
        EMULATE_RTNE,
    )
    _rotate_heads(
        key_ptr + tok * stride_kt,
        key_out_ptr + tok * num_kv_heads * head_dim,
        stride_kh,
        num_kv_heads,
        head_dim,
        half,
        cos,
        sin,
        BLOCK_K_HEADS,
        BLOCK_HALF,
        BLOCK_TAIL,
        USE_TAIL,
        EMULATE_RTNE,
    )


def rotary_embedding(
    positions: Tensor, query: Tensor, key: Tensor, cos_sin_cache: Tensor
) -> tuple[Tensor, Tensor]:
    """Triton twin of ``reference.rotary_embedding``: query [T, H, D], key [T, KH, D]."""
    _check_inputs(positions, query, key, cos_sin_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    query_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    key_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return query_out, key_out
    half = cos_sin_cache.shape[1] // 2
    tail = head_dim - 2 * half
    _rotary_embedding_kernel[(num_tokens,)](
        positions,
        query,
        key,
        cos_sin_cache,
        query_out,
        key_out,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        num_kv_heads,
        head_dim,
        half,
        BLOCK_Q_HEADS=next_power_of_2(num_heads),
        BLOCK_K_HEADS=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half),
        BLOCK_TAIL=next_power_of_2(max(tail, 1)),
        USE_TAIL=tail > 0,
        EMULATE_RTNE=emulate_rtne(query.dtype),
        num_warps=4,
    )
    return query_out, key_out


def _check_inputs(positions: Tensor, query: Tensor, key: Tensor, cos_sin_cache: Tensor) -> None:
    require(query.dim() == 3, f"query must be [T, num_heads, head_dim], got {tuple(query.shape)}")
    check_dtype("query", query, FLOAT_DTYPES)
    check_runnable("query", query)
    check_same_dtype(query=query, key=key)
    check_same_device(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    num_tokens, _, head_dim = query.shape
    check_shape("key", key, (num_tokens, None, head_dim))
    check_inner_contiguous("query", query, 1)
    check_inner_contiguous("key", key, 1)
    check_dtype("positions", positions, INDEX_DTYPES)
    check_shape("positions", positions, (num_tokens,))
    check_dtype("cos_sin_cache", cos_sin_cache, (torch.float32,))
    require(cos_sin_cache.dim() == 2, "cos_sin_cache must be [max_position, rotary_dim]")
    rotary_dim = cos_sin_cache.shape[1]
    require(
        rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim,
        f"rotary_dim ({rotary_dim}) must be even and at most head_dim ({head_dim})",
    )
    check_inner_contiguous("cos_sin_cache", cos_sin_cache, 1)
    check_range("positions", positions, 0, cos_sin_cache.shape[0])
