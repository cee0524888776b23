"""Prefill attention over the paged cache (Triton) against ``reference.prefill_attention``."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.prefill_attention import TileConfig, _launch, prefill_attention
from tests.kernels.cases import (
    assert_close,
    block_major_view,
    grid_params,
    int_tensor,
    randn,
    random_block_tables,
)

Tensor = torch.Tensor

# (chunk length, context after the chunk): empty chunk, single-token prompt, one new token on a
# cached prefix, a whole odd prompt, an odd chunk on an odd cached prefix (chunked prefill).
SMALL_CHUNKS = [(0, 3), (1, 1), (1, 40), (37, 37), (29, 93)]
FULL_CHUNKS = [(0, 5), (1, 1), (517, 517), (300, 2000), (1, 1000), (1023, 3071), (64, 64)]
NUM_KV_HEADS = 2


def _inputs(
    dtype: torch.dtype,
    head_dim: int,
    ratio: int,
    block_size: int,
    chunks: list[tuple[int, int]],
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    contexts = [ctx for _, ctx in chunks]
    num_blocks = sum(-(-c // block_size) for c in contexts) + 8
    tables = random_block_tables(contexts, num_blocks, block_size, seed)
    cache = randn((2, num_blocks, block_size, NUM_KV_HEADS, head_dim), dtype, seed + 1)
    starts = [0]
    for q_len, _ in chunks:
        starts.append(starts[-1] + q_len)
    query = randn((starts[-1], ratio * NUM_KV_HEADS, head_dim), dtype, seed + 2)
    return query, cache, tables, int_tensor(starts), int_tensor(contexts)


@pytest.mark.parametrize("dtype,head_dim,ratio,block_size,full", grid_params())
def test_matches_reference(
    dtype: torch.dtype, head_dim: int, ratio: int, block_size: int, full: bool
) -> None:
    chunks = FULL_CHUNKS if full else SMALL_CHUNKS
    args = _inputs(dtype, head_dim, ratio, block_size, chunks, seed=ratio)
    scale = head_dim**-0.5
    out = prefill_attention(*args, scale)
    assert_close(out, reference.prefill_attention(*args, scale), attention=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("window,soft_cap", [(7, None), (None, 15.0), (50, 5.0)])
def test_window_and_softcap(dtype: torch.dtype, window: int | None, soft_cap: float | None) -> None:
    args = _inputs(dtype, 64, 3, 16, [(1, 1), (70, 70), (23, 90)], seed=5)
    out = prefill_attention(*args, 0.2, window, soft_cap)
    assert_close(out, reference.prefill_attention(*args, 0.2, window, soft_cap), attention=True)


@pytest.mark.parametrize("config", [TileConfig(16, 16, 4, 2), TileConfig(128, 32, 8, 3)])
def test_other_tile_sizes(config: TileConfig) -> None:
    """The GPU's tiles differ from the interpreter's; the result must not depend on them."""
    query, cache, tables, starts, lens = _inputs(torch.float16, 64, 3, 16, SMALL_CHUNKS, seed=4)
    out = torch.zeros_like(query)
    _launch(query, cache, tables, starts, lens, out, 0.2, None, None, 37, config)
    assert_close(out, reference.prefill_attention(query, cache, tables, starts, lens, 0.2), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_block_major_view_matches_contiguous(dtype: torch.dtype) -> None:
    """A layer view of the block-major pool reads exactly what the contiguous cache holds."""
    query, cache, tables, starts, lens = _inputs(dtype, 64, 3, 16, SMALL_CHUNKS, seed=12)
    view = block_major_view(cache)
    out = prefill_attention(query, view, tables, starts, lens, 0.2)
    assert torch.equal(out, prefill_attention(query, cache, tables, starts, lens, 0.2))
    expected = reference.prefill_attention(query, cache, tables, starts, lens, 0.2)
    assert torch.equal(reference.prefill_attention(query, view, tables, starts, lens, 0.2), expected)
    assert_close(out, expected, attention=True)


def test_int64_indices_and_strided_query() -> None:
    query, cache, tables, starts, lens = _inputs(torch.float32, 64, 1, 16, [(9, 30)], seed=2)
    qkv = randn((9, 3 * 2 * 64), torch.float32, seed=9)
    query = qkv[:, : 2 * 64].view(9, 2, 64)
    args = (query, cache, tables.long(), starts.long(), lens.long())
    assert_close(prefill_attention(*args, 0.1), reference.prefill_attention(*args, 0.1), True)


def test_no_sequences() -> None:
    query, cache, tables, starts, lens = _inputs(torch.float32, 64, 1, 16, [(3, 3)], seed=0)
    out = prefill_attention(query[:0], cache, tables[:0], starts[:1], lens[:0], 1.0)
    assert out.shape == (0, 2, 64)


# --------------------------------------------------------------------------- bad input


def _good() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _inputs(torch.float32, 64, 2, 16, [(5, 5), (3, 20)], seed=0)


def test_rejects_mismatched_dtypes() -> None:
    query, *rest = _good()
    with pytest.raises(KernelInputError, match="dtypes must match"):
        prefill_attention(query.bfloat16(), *rest, 1.0)


def test_rejects_block_table_past_cache() -> None:
    query, cache, tables, starts, lens = _good()
    tables[1, 0] = -3
    with pytest.raises(KernelInputError, match=r"block_tables\[1, 0\] = -3"):
        prefill_attention(query, cache, tables, starts, lens, 1.0)


def test_rejects_heads_that_do_not_divide() -> None:
    _, cache, tables, starts, lens = _good()
    query = randn((8, 3, 64), torch.float32, seed=1)
    with pytest.raises(KernelInputError, match="multiple of num_kv_heads"):
        prefill_attention(query, cache, tables, starts, lens, 1.0)


def test_rejects_non_contiguous_head_dim() -> None:
    query, *rest = _good()
    strided = torch.empty(query.shape[0], query.shape[1], 128, device=query.device)[..., ::2]
    with pytest.raises(KernelInputError, match="contiguous in its last 1 dims"):
        prefill_attention(strided, *rest, 1.0)


def test_rejects_bad_chunk_boundaries() -> None:
    query, cache, tables, starts, lens = _good()
    with pytest.raises(KernelInputError, match="rise from 0"):
        prefill_attention(query, cache, tables, starts + 1, lens, 1.0)
    with pytest.raises(KernelInputError, match="rise from 0"):
        prefill_attention(query, cache, tables, int_tensor([0, 6, 3]), lens, 1.0)
    with pytest.raises(KernelInputError, match="longer than its context_len"):
        prefill_attention(query, cache, tables, starts, int_tensor([4, 20]), 1.0)
    with pytest.raises(KernelInputError, match="query_start_loc must have shape"):
        prefill_attention(query, cache, tables, starts[:2], lens, 1.0)
