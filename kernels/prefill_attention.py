"""Prefill attention over the paged cache: a varlen batch of causal query chunks.

Owns ``_prefill_attention_kernel`` (flash attention: each program takes one sequence, one query
head and one tile of its chunk's rows, and streams the sequence's cached prefix plus the chunk
itself through the block table) and its typed launcher. Same contract as
``reference.prefill_attention``: prefix caching and chunked prefill are the same case, a chunk
whose first token sits at ``context_len - q_len``. It never writes the cache. An fp8 cache
(float8_e4m3fn / float8_e5m2, any float query dtype) is read as bytes and widened exactly to the
query's dtype tile by tile (``paged.widen_kv``), as in decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    KernelInputError,
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
    memoized,
    next_power_of_2,
    require,
    upcast_dot,
    values_checked,
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


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch shape of one prefill launch."""

    block_m: int  # query rows per program
    block_n: int  # context tokens per loop iteration
    num_warps: int
    num_stages: int


# Always fits: the interpreter's tile, and the fallback when a GPU tile runs out of resources.
SAFE_CONFIG = TileConfig(64, 64, 4, 2)


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [T, num_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim] (KV_FP8: uint8 bytes)
    block_tables_ptr,  # [S, max_blocks]
    query_start_loc_ptr,  # [S + 1]
    context_lens_ptr,  # [S]
    out_ptr,  # [T, num_heads, head_dim]
    stride_qt,
    stride_qh,
    stride_bt,
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    num_heads,
    group,
    head_dim: tl.constexpr,  # == BLOCK_D for powers of two: the d mask folds away
    scale,
    soft_cap,
    sliding_window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_E5M2: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    first_pos = ctx - q_len  # position of the chunk's first token

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_mask = rows < q_len
    d_mask = d < head_dim
    q_pos = first_pos + rows  # [M]
    tok = (q_start + rows).to(tl.int64)
    q_offs = tok[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # [M, D]

    # Causal: this tile's last row sees up to its own position; the window bounds the first row.
    hi = tl.minimum(ctx, first_pos + (tile + 1) * BLOCK_M)
    hi = tl.where(tile * BLOCK_M < q_len, hi, 0)  # tiles past a short chunk do nothing
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, first_pos + tile * BLOCK_M - sliding_window + 1)
    kv_head_offset = (head // group) * stride_head
    table_row = block_tables_ptr + seq * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = (pos >= lo) & (pos < hi)
        kv_rows = paged_row_offsets(
            table_row, pos, n_mask, stride_block, stride_tok, kv_head_offset, BLOCK_SIZE
        )
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [N, D]
        k = widen_kv(k, q.dtype, KV_FP8, FP8_E5M2)
        s = tile_dot(q, tl.trans(k), UPCAST_DOT, IEEE_DOT) * scale  # [M, N]
        if USE_SOFTCAP:
            s = soft_cap_logits(s, soft_cap)
        allowed = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(cache_ptr + stride_kv + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = widen_kv(v, q.dtype, KV_FP8, FP8_E5M2)
        acc = acc * alpha[:, None] + tile_dot(
            downcast(p, v.dtype, EMULATE_RTNE), v, UPCAST_DOT, IEEE_DOT
        )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_offs = (tok[:, None] * num_heads + head) * head_dim + d[None, :]
    tl.store(
        out_ptr + o_offs,
        downcast(out, out_ptr.dtype.element_ty, EMULATE_RTNE),
        mask=r_mask[:, None] & d_mask[None, :],
    )


def prefill_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    context_lens: Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Tensor:
    """Triton twin of ``reference.prefill_attention`` (same shapes, same result).

    Rows of ``query`` outside every chunk (``query_start_loc[-1] < T``) are left unwritten, as
    in the reference.
    """
    _check_inputs(
        query, kv_cache, block_tables, query_start_loc, context_lens, sliding_window, soft_cap
    )
    num_tokens, num_heads, head_dim = query.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    num_seqs = context_lens.shape[0]
    max_q_len = _max_query_len(query_start_loc, context_lens, num_tokens)
    if num_seqs == 0 or max_q_len == 0:
        return out
    config = _tile_config(query.dtype, head_dim, query.device.type)
    args = (query, kv_cache, block_tables, query_start_loc, context_lens, out, scale,
            sliding_window, soft_cap, max_q_len)
    try:
        _launch(*args, config)
    except OutOfResources:  # this GPU cannot hold the big tiles: fall back to the safe ones
        if config == SAFE_CONFIG:
            raise
        _launch(*args, SAFE_CONFIG)
    return out


def _check_inputs(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    context_lens: Tensor,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    check_dtype("query", query, FLOAT_DTYPES)
    check_kv_cache("kv_cache", kv_cache)
    check_cache_dtype(kv_cache, query=query)
    check_same_device(
        query=query,
        kv_cache=kv_cache,
        block_tables=block_tables,
        query_start_loc=query_start_loc,
        context_lens=context_lens,
    )
    require(query.dim() == 3, f"query must be [T, num_heads, head_dim], got {tuple(query.shape)}")
    check_shape("query", query, (None, None, kv_cache.shape[4]))
    check_inner_contiguous("query", query, 1)
    check_divisible(query.shape[1], kv_cache.shape[3])
    for name, t in (
        ("block_tables", block_tables),
        ("query_start_loc", query_start_loc),
        ("context_lens", context_lens),
    ):
        check_dtype(name, t, INDEX_DTYPES)
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    check_shape("context_lens", context_lens, (num_seqs,))
    check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    check_shape("block_tables", block_tables, (num_seqs, None))
    check_inner_contiguous("block_tables", block_tables, 1)
    check_inner_contiguous("query_start_loc", query_start_loc, 1)
    require(sliding_window is None or sliding_window > 0, "sliding_window must be positive")
    require(soft_cap is None or soft_cap > 0, "soft_cap must be positive")
    check_block_tables(block_tables, context_lens, kv_cache.shape[1], kv_cache.shape[2])


def _max_query_len(query_start_loc: Tensor, context_lens: Tensor, num_tokens: int) -> int:
    """Longest chunk (the grid's extent), chunk boundaries checked: one device read per step."""
    return memoized(
        "prefill_chunks",
        [query_start_loc, context_lens],
        (num_tokens, values_checked()),
        lambda: _read_chunks(query_start_loc, context_lens, num_tokens),
    )


def _read_chunks(query_start_loc: Tensor, context_lens: Tensor, num_tokens: int) -> int:
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]
    if q_lens.numel() == 0:
        return 0
    if not values_checked():
        return int(q_lens.max())
    summary = torch.stack(
        [
            q_lens.max(),
            starts[0],
            starts[-1],
            (q_lens < 0).sum(),
            (q_lens > context_lens.long()).sum(),
        ]
    ).tolist()
    max_q_len, first, last, num_negative, num_too_long = summary
    if first != 0 or last > num_tokens or num_negative:
        raise KernelInputError(
            f"query_start_loc must rise from 0 to at most T = {num_tokens}, "
            f"got {query_start_loc.tolist()}"
        )
    if num_too_long:
        raise KernelInputError(
            "a chunk is longer than its context_len (the chunk's tokens must already be stored): "
            f"chunk lengths {q_lens.tolist()}, context_lens {context_lens.tolist()}"
        )
    return int(max_q_len)


def _tile_config(dtype: torch.dtype, head_dim: int, device_type: str) -> TileConfig:
    """Tiles for tensor cores on a GPU (float32 needs smaller, IEEE products); small elsewhere."""
    if device_type != "cuda":
        return SAFE_CONFIG
    if dtype == torch.float32:
        return TileConfig(64, 32, 4, 2)
    return TileConfig(128, 64, 8 if head_dim > 64 else 4, 3)


def _launch(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    context_lens: Tensor,
    out: Tensor,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    max_q_len: int,
    config: TileConfig,
) -> None:
    num_heads, head_dim = query.shape[1], query.shape[2]
    grid = (triton.cdiv(max_q_len, config.block_m), num_heads, context_lens.shape[0])
    cache, kv_fp8, fp8_e5m2 = kv_fp8_args(kv_cache)
    _prefill_attention_kernel[grid](
        query,
        cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_heads,
        num_heads // kv_cache.shape[3],
        head_dim,
        float(scale),
        float(soft_cap or 1.0),
        int(sliding_window or 0),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        BLOCK_SIZE=kv_cache.shape[2],
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=soft_cap is not None,
        UPCAST_DOT=upcast_dot(query.dtype),
        IEEE_DOT=query.dtype == torch.float32 or upcast_dot(query.dtype),
        EMULATE_RTNE=emulate_rtne(query.dtype),
        KV_FP8=kv_fp8,
        FP8_E5M2=fp8_e5m2,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
