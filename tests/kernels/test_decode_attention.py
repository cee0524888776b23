"""Paged decode attention (Triton) against ``reference.paged_decode_attention``."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.decode_attention import (
    decode_attention_partitioned,
    paged_decode_attention,
)
from tests.kernels.cases import (
    DEVICE,
    assert_close,
    block_major_view,
    grid_params,
    int_tensor,
    randn,
    random_block_tables,
)

Tensor = torch.Tensor

# empty, single token, odd, exactly one 64-token tile, odd past a tile
SMALL_CONTEXTS = [0, 1, 37, 64, 77]
FULL_CONTEXTS = [0, 1, 17, 255, 1000, 2049, 4093, 64]
NUM_KV_HEADS = 2


def _inputs(
    dtype: torch.dtype, head_dim: int, ratio: int, block_size: int, contexts: list[int], seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    num_blocks = sum(-(-c // block_size) for c in contexts) + 8
    tables = random_block_tables(contexts, num_blocks, block_size, seed)
    cache = randn((2, num_blocks, block_size, NUM_KV_HEADS, head_dim), dtype, seed + 1)
    query = randn((len(contexts), ratio * NUM_KV_HEADS, head_dim), dtype, seed + 2)
    return query, cache, tables, int_tensor(contexts)


@pytest.mark.parametrize("dtype,head_dim,ratio,block_size,full", grid_params())
def test_matches_reference(
    dtype: torch.dtype, head_dim: int, ratio: int, block_size: int, full: bool
) -> None:
    contexts = FULL_CONTEXTS if full else SMALL_CONTEXTS
    query, cache, tables, lens = _inputs(dtype, head_dim, ratio, block_size, contexts, seed=ratio)
    scale = head_dim**-0.5
    out = paged_decode_attention(query, cache, tables, lens, scale)
    assert_close(out, reference.paged_decode_attention(query, cache, tables, lens, scale), True)
    assert torch.all(out[0] == 0), "a sequence with no context must get zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "window,soft_cap,partition",
    [(None, None, 64), (5, None, 64), (40, None, 128), (None, 20.0, 512), (33, 10.0, 64)],
)
def test_window_softcap_and_partitions(
    dtype: torch.dtype, window: int | None, soft_cap: float | None, partition: int
) -> None:
    contexts = [0, 1, 4, 65, 130, 200]
    query, cache, tables, lens = _inputs(dtype, 64, 3, 16, contexts, seed=7)
    out = decode_attention_partitioned(query, cache, tables, lens, 0.3, window, soft_cap, partition)
    expected = reference.paged_decode_attention(query, cache, tables, lens, 0.3, window, soft_cap)
    assert_close(out, expected, attention=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_block_major_view_matches_contiguous(dtype: torch.dtype) -> None:
    """A layer view of the block-major pool reads exactly what the contiguous cache holds."""
    query, cache, tables, lens = _inputs(dtype, 64, 3, 16, SMALL_CONTEXTS, seed=11)
    view = block_major_view(cache)
    out = paged_decode_attention(query, view, tables, lens, 0.125)
    assert torch.equal(out, paged_decode_attention(query, cache, tables, lens, 0.125))
    expected = reference.paged_decode_attention(query, cache, tables, lens, 0.125)
    assert torch.equal(reference.paged_decode_attention(query, view, tables, lens, 0.125), expected)
    assert_close(out, expected, attention=True)


def test_strided_query_view() -> None:
    """A query sliced out of a fused qkv projection (token stride > heads * head_dim)."""
    contexts = [3, 50]
    _, cache, tables, lens = _inputs(torch.float32, 64, 2, 16, contexts, seed=3)
    qkv = randn((2, 8 * 64), torch.float32, seed=4)
    query = qkv[:, : 4 * 64].view(2, 4, 64)
    assert not query.is_contiguous()
    out = paged_decode_attention(query, cache, tables, lens, 0.125)
    assert_close(out, reference.paged_decode_attention(query, cache, tables, lens, 0.125), True)


def test_empty_batch() -> None:
    query, cache, tables, lens = _inputs(torch.float32, 64, 1, 16, [5], seed=0)
    out = paged_decode_attention(query[:0], cache, tables[:0], lens[:0], 1.0)
    assert out.shape == (0, 2, 64)


@pytest.mark.gpu
def test_bench_shape_bf16() -> None:
    """Batch 64 at context 4096 in bfloat16: the shape the benchmark times."""
    contexts = [4096] * 63 + [4095]
    query, cache, tables, lens = _inputs(torch.bfloat16, 128, 4, 16, contexts, seed=11)
    out = paged_decode_attention(query, cache, tables, lens, 128**-0.5)
    expected = reference.paged_decode_attention(query, cache, tables, lens, 128**-0.5)
    assert_close(out, expected, attention=True)


# --------------------------------------------------------------------------- bad input


def _good() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _inputs(torch.float32, 64, 2, 16, [5, 20], seed=0)


def test_rejects_mismatched_dtypes() -> None:
    query, cache, tables, lens = _good()
    with pytest.raises(KernelInputError, match="dtypes must match"):
        paged_decode_attention(query.half(), cache, tables, lens, 1.0)


def test_rejects_non_contiguous_cache() -> None:
    query, cache, tables, lens = _good()
    strided = torch.empty_like(cache).transpose(2, 3).contiguous().transpose(2, 3)
    strided.copy_(cache)
    with pytest.raises(KernelInputError, match="contiguous"):
        paged_decode_attention(query, strided, tables, lens, 1.0)


def test_rejects_block_table_past_cache() -> None:
    query, cache, tables, lens = _good()
    tables[1, 1] = cache.shape[1]
    with pytest.raises(KernelInputError, match=r"block_tables\[1, 1\]"):
        paged_decode_attention(query, cache, tables, lens, 1.0)


def test_ignores_unused_table_entries_but_not_context_overflow() -> None:
    query, cache, tables, lens = _good()
    tables[0, -1] = -1  # column never read for a 5-token context
    paged_decode_attention(query, cache, tables, lens, 1.0)
    lens[0] = tables.shape[1] * 16 + 1
    with pytest.raises(KernelInputError, match=r"context_lens\[0\]"):
        paged_decode_attention(query, cache, tables, lens, 1.0)


def test_rejects_heads_that_do_not_divide() -> None:
    _, cache, tables, lens = _good()
    query = randn((2, 5, 64), torch.float32, seed=1)
    with pytest.raises(KernelInputError, match="multiple of num_kv_heads"):
        paged_decode_attention(query, cache, tables, lens, 1.0)


def test_rejects_wrong_head_dim_and_table_rows() -> None:
    query, cache, tables, lens = _good()
    with pytest.raises(KernelInputError, match="query must have shape"):
        paged_decode_attention(query[..., :32], cache, tables, lens, 1.0)
    with pytest.raises(KernelInputError, match="block_tables must have shape"):
        paged_decode_attention(query, cache, tables[:1], lens, 1.0)
    with pytest.raises(KernelInputError, match="block_tables must have dtype"):
        paged_decode_attention(query, cache, tables.float(), lens, 1.0)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU-without-interpreter guard")
def test_rejects_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    query, cache, tables, lens = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET"):
        paged_decode_attention(query, cache, tables, lens, 1.0)
