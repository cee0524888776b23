"""Paged decode attention: one query token per sequence over its paged KV context.

Owns ``_paged_decode_attention_kernel`` (flash-decoding: each program takes one sequence, one KV
head with all its GQA query heads, and one partition of the context) and
``_paged_decode_reduce_kernel`` (merges the partitions' partial softmaxes), plus the typed
launcher. Same contract as ``reference.paged_decode_attention``; it never writes the cache. An
fp8 cache (float8_e4m3fn / float8_e5m2, any float query dtype) is read as bytes and widened
exactly to the query's dtype tile by tile (``paged.widen_kv``); the math is then that of a
cache of the query's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_block_tables,
    check_cache_dtype,
    check_divisible,
    check_dtype,
    check_inner_contiguous,
    check_kv_cache,
    check_same_device,
    check_shape,
    emulate_rtne,
    kv_fp8_args,
    next_power_of_2,
    require,
    upcast_dot,
)
from splitserve.kernels.paged import (
    online_softmax_step,
    paged_row_offsets,
    soft_cap_logits,
    tile_dot,
    widen_kv,
)
from splitserve.kernels.rounding import downcast

Tensor = torch.Tensor

BLOCK_N = 64  # context tokens per loop iteration
PARTITION_SIZE = 512  # context tokens per program; longer contexts are split and reduced


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr,  # [B, num_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim] (KV_FP8: uint8 bytes)
    block_tables_ptr,  # [B, max_blocks]
    context_lens_ptr,  # [B]
    out_ptr,  # [B, num_heads, head_dim]; USE_SPLIT: [B, num_heads, num_splits, head_dim] fp32
    max_ptr,  # [B, num_heads, num_splits] float32 (USE_SPLIT only)
    sum_ptr,  # [B, num_heads, num_splits] float32 (USE_SPLIT only)
    stride_qb,
    stride_qh,
    stride_bt,
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    num_heads,
    num_splits,
    group,
    head_dim: tl.constexpr,  # == BLOCK_D for powers of two: the d mask folds away
    scale,
    soft_cap,
    sliding_window,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PARTITION: tl.constexpr,
    USE_SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_E5M2: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    start = split * PARTITION
    end = tl.minimum(ctx, start + PARTITION)
    if USE_WINDOW:
        start = tl.maximum(start, ctx - sliding_window)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    g_mask = g < group
    d_mask = d < head_dim
    q_offs = seq * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G, D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq * stride_bt
    for n0 in range((start // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = (pos >= start) & (pos < end)
        rows = paged_row_offsets(
            table_row, pos, n_mask, stride_block, stride_tok, kv_head * stride_head, BLOCK_SIZE
        )
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [N, D]
        k = widen_kv(k, q.dtype, KV_FP8, FP8_E5M2)
        s = tile_dot(q, tl.trans(k), UPCAST_DOT, IEEE_DOT) * scale  # [G, N]
        if USE_SOFTCAP:
            s = soft_cap_logits(s, soft_cap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(cache_ptr + stride_kv + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = widen_kv(v, q.dtype, KV_FP8, FP8_E5M2)
        acc = acc * alpha[:, None] + tile_dot(
            downcast(p, v.dtype, EMULATE_RTNE), v, UPCAST_DOT, IEEE_DOT
        )

    o_mask = g_mask[:, None] & d_mask[None, :]
    if USE_SPLIT:
        row = (seq * num_heads + heads) * num_splits + split  # [G]
        tl.store(out_ptr + row[:, None] * head_dim + d[None, :], acc, mask=o_mask)
        tl.store(max_ptr + row, m_i, mask=g_mask)
        tl.store(sum_ptr + row, l_i, mask=g_mask)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_offs = (seq * num_heads + heads[:, None]) * head_dim + d[None, :]
        tl.store(
            out_ptr + o_offs, downcast(out, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=o_mask
        )


@triton.jit
def _paged_decode_reduce_kernel(
    partial_ptr,  # [B, num_heads, num_splits, head_dim] float32, unnormalized
    max_ptr,  # [B, num_heads, num_splits] float32
    sum_ptr,  # [B, num_heads, num_splits] float32
    out_ptr,  # [B, num_heads, head_dim]
    num_splits,
    head_dim: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # seq * num_heads + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    m = tl.load(max_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
    l_part = tl.load(sum_ptr + row * num_splits + s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # [S]; 0 for empty splits
    offs = (row * num_splits + s[:, None]) * head_dim + d[None, :]
    part = tl.load(partial_ptr + offs, mask=s_mask[:, None] & (d < head_dim)[None, :], other=0.0)
    total = tl.sum(l_part * weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + row * head_dim + d,
        downcast(out, out_ptr.dtype.element_ty, EMULATE_RTNE),
        mask=d < head_dim,
    )


def paged_decode_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """Triton twin of ``reference.paged_decode_attention`` (same shapes, same result)."""
    return decode_attention_partitioned(
        query, kv_cache, block_tables, context_lens, scale, sliding_window, soft_cap
    )


def decode_attention_partitioned(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    partition_size: int = PARTITION_SIZE,
) -> Tensor:
    """``paged_decode_attention`` with an explicit context partition (tests use small ones)."""
    _check_inputs(query, kv_cache, block_tables, context_lens, sliding_window, soft_cap)
    require(partition_size % BLOCK_N == 0, f"partition_size must be a multiple of {BLOCK_N}")
    num_seqs, num_heads, head_dim = query.shape
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    max_context = block_tables.shape[1] * kv_cache.shape[2]
    num_splits = max(1, triton.cdiv(max_context, partition_size))
    if num_splits == 1:
        _launch(
            query,
            kv_cache,
            block_tables,
            context_lens,
            out,
            None,
            scale,
            sliding_window,
            soft_cap,
            partition_size,
        )
        return out
    partial = torch.empty(
        (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
    )
    _launch(
        query,
        kv_cache,
        block_tables,
        context_lens,
        partial,
        out,
        scale,
        sliding_window,
        soft_cap,
        partition_size,
    )
    return out


def _check_inputs(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    check_dtype("query", query, FLOAT_DTYPES)
    check_kv_cache("kv_cache", kv_cache)
    check_cache_dtype(kv_cache, query=query)
    check_same_device(
        query=query, kv_cache=kv_cache, block_tables=block_tables, context_lens=context_lens
    )
    num_seqs, num_heads, head_dim = _query_shape(query)
    check_shape("query", query, (num_seqs, num_heads, kv_cache.shape[4]))
    check_inner_contiguous("query", query, 1)
    check_divisible(num_heads, kv_cache.shape[3])
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    check_dtype("context_lens", context_lens, INDEX_DTYPES)
    check_shape("block_tables", block_tables, (num_seqs, None))
    check_inner_contiguous("block_tables", block_tables, 1)
    check_shape("context_lens", context_lens, (num_seqs,))
    require(sliding_window is None or sliding_window > 0, "sliding_window must be positive")
    require(soft_cap is None or soft_cap > 0, "soft_cap must be positive")
    check_block_tables(block_tables, context_lens, kv_cache.shape[1], kv_cache.shape[2])


def _query_shape(query: Tensor) -> tuple[int, int, int]:
    require(query.dim() == 3, f"query must be [B, num_heads, head_dim], got {tuple(query.shape)}")
    return query.shape[0], query.shape[1], query.shape[2]


def _launch(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    dest: Tensor,
    out: Tensor | None,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    partition_size: int,
) -> None:
    """Run the attention kernel into ``dest``; with ``out`` given, dest is the partial buffer."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    use_split = out is not None
    num_splits = dest.shape[2] if use_split else 1
    stats = (
        torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
        if use_split
        else dest
    )
    sums = torch.empty_like(stats) if use_split else dest
    block_d = max(16, next_power_of_2(head_dim))
    cache, kv_fp8, fp8_e5m2 = kv_fp8_args(kv_cache)
    _paged_decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        cache,
        block_tables,
        context_lens,
        dest,
        stats,
        sums,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_heads,
        num_splits,
        group,
        head_dim,
        float(scale),
        float(soft_cap or 1.0),
        int(sliding_window or 0),
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        BLOCK_SIZE=kv_cache.shape[2],
        PARTITION=partition_size,
        USE_SPLIT=use_split,
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=soft_cap is not None,
        UPCAST_DOT=upcast_dot(query.dtype),
        IEEE_DOT=query.dtype == torch.float32 or upcast_dot(query.dtype),
        EMULATE_RTNE=emulate_rtne(query.dtype),
        KV_FP8=kv_fp8,
        FP8_E5M2=fp8_e5m2,
        num_warps=4,
    )
    if out is not None:
        _paged_decode_reduce_kernel[(num_seqs * num_heads,)](
            dest,
            stats,
            sums,
            out,
            num_splits,
            head_dim,
            BLOCK_S=next_power_of_2(num_splits),
            BLOCK_D=block_d,
            EMULATE_RTNE=emulate_rtne(query.dtype),
            num_warps=4,
        )
