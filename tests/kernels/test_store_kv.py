"""store_kv (Triton) against ``reference.store_kv``: exact equality, padding slots skipped."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.store_kv import store_kv
from tests.kernels.cases import DEVICE, block_major_view, generator, grid_params, randn

Tensor = torch.Tensor

NUM_KV_HEADS = 2


def _inputs(
    dtype: torch.dtype,
    head_dim: int,
    num_kv_heads: int,
    block_size: int,
    num_tokens: int,
    num_blocks: int,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cache = randn((2, num_blocks, block_size, num_kv_heads, head_dim), dtype, seed)
    key = randn((num_tokens, num_kv_heads, head_dim), dtype, seed + 1)
    value = randn((num_tokens, num_kv_heads, head_dim), dtype, seed + 2)
    slots = torch.randperm(num_blocks * block_size, generator=generator(seed))[:num_tokens]
    slots[::3] = -1  # padding tokens
    return key, value, cache, slots.to(DEVICE)


@pytest.mark.parametrize("dtype,head_dim,ratio,block_size,full", grid_params())
def test_matches_reference_exactly(
    dtype: torch.dtype, head_dim: int, ratio: int, block_size: int, full: bool
) -> None:
    num_kv_heads = ratio  # the cache's head count is what matters here
    num_tokens, num_blocks = (4097, 300) if full else (37, 9)
    key, value, cache, slots = _inputs(
        dtype, head_dim, num_kv_heads, block_size, num_tokens, num_blocks, seed=ratio
    )
    expected = cache.clone()
    reference.store_kv(key, value, expected, slots)
    store_kv(key, value, cache, slots)
    assert torch.equal(cache, expected)
    kept = slots >= 0
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[0][slots[kept]], key[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_block_major_view_matches_contiguous(dtype: torch.dtype) -> None:
    """A layer view of the block-major pool gets exactly the rows a contiguous cache gets,
    and the pool's other layers are left alone."""
    key, value, cache, slots = _inputs(dtype, 64, 2, 16, 37, 9, seed=3)
    view = block_major_view(cache, num_layers=3, layer=1)
    pool = view._base  # [num_blocks, 3, 2, block_size, kv_heads, head_dim]
    assert pool is not None
    others_before = pool[:, [0, 2]].clone()
    expected = cache.clone()
    reference.store_kv(key, value, expected, slots)
    store_kv(key, value, view, slots)
    assert torch.equal(view, expected)
    assert torch.equal(pool[:, [0, 2]], others_before)
    ref_view = block_major_view(cache)
    reference.store_kv(key, value, ref_view, slots)  # the reference's strided path
    assert torch.equal(ref_view, expected)


def test_single_and_empty_batches_and_int32_slots() -> None:
    key, value, cache, _ = _inputs(torch.float16, 64, 2, 16, 1, 4, seed=0)
    expected = cache.clone()
    store_kv(key[:0], value[:0], cache, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(cache, expected)
    slot = torch.tensor([63], dtype=torch.int32, device=DEVICE)
    store_kv(key, value, cache, slot)
    reference.store_kv(key, value, expected, slot.long())
    assert torch.equal(cache, expected)


def test_key_and_value_views_of_fused_qkv() -> None:
    qkv = randn((5, 4 * 64 + 2 * 2 * 64), torch.bfloat16, seed=1)
    key = qkv[:, 4 * 64 : 6 * 64].view(5, 2, 64)
    value = qkv[:, 6 * 64 :].view(5, 2, 64)
    cache = torch.zeros((2, 3, 16, 2, 64), dtype=torch.bfloat16, device=DEVICE)
    expected = cache.clone()
    slots = torch.tensor([0, 17, -1, 47, 5], device=DEVICE)
    store_kv(key, value, cache, slots)
    reference.store_kv(key, value, expected, slots)
    assert torch.equal(cache, expected)


# --------------------------------------------------------------------------- bad input


def _good() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _inputs(torch.float32, 64, 2, 16, 5, 4, seed=0)


def test_rejects_slot_past_cache() -> None:
    key, value, cache, slots = _good()
    slots[1] = 4 * 16
    with pytest.raises(KernelInputError, match="slot_mapping holds 64, outside"):
        store_kv(key, value, cache, slots)
    slots[1] = -2
    with pytest.raises(KernelInputError, match="slot_mapping holds -2"):
        store_kv(key, value, cache, slots)


def test_rejects_mismatched_dtypes_and_shapes() -> None:
    key, value, cache, slots = _good()
    with pytest.raises(KernelInputError, match="dtypes must match"):
        store_kv(key, value.half(), cache, slots)
    with pytest.raises(KernelInputError, match="key must have shape"):
        store_kv(key[:, :1], value[:, :1], cache, slots)
    with pytest.raises(KernelInputError, match="slot_mapping must have shape"):
        store_kv(key, value, cache, slots[:3])


def test_rejects_non_contiguous_rows() -> None:
    key, value, cache, slots = _good()
    transposed = key.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(KernelInputError, match="key must be contiguous in its last 2 dims"):
        store_kv(transposed, value, cache, slots)
    with pytest.raises(KernelInputError, match="kv_cache must be contiguous in its last 3 dims"):
        store_kv(key, value, cache.transpose(3, 4), slots)
