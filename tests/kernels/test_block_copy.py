"""Block gather / scatter (Triton) against the references: byte-exact, one launch or per layer."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels import block_copy, reference
from splitserve.kernels.block_copy import gather_blocks, scatter_blocks
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.kv_cache import allocate_kv_caches
from tests.kernels.cases import DEVICE, generator, grid_params, randn

Tensor = torch.Tensor


def _caches(
    dtype: torch.dtype,
    head_dim: int,
    num_kv_heads: int,
    block_size: int,
    num_layers: int,
    num_blocks: int,
    one_allocation: bool,
    seed: int,
) -> list[Tensor]:
    """Per-layer caches: evenly spaced views of one allocation (one launch), or unevenly
    spaced ones (one launch per layer)."""
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if one_allocation:
        return list(randn((num_layers, *shape), dtype, seed).unbind(0))
    size = math.prod(shape)
    offsets = [layer * size + 8 * layer * layer for layer in range(num_layers)]
    flat = randn((offsets[-1] + size,), dtype, seed)
    caches = [flat[o : o + size].view(shape) for o in offsets]
    assert num_layers < 3 or block_copy._layer_stride(caches) is None
    return caches


def _block_major(
    dtype: torch.dtype, head_dim: int, num_kv_heads: int, block_size: int, num_layers: int,
    num_blocks: int, seed: int,
) -> list[Tensor]:
    """Per-layer views of one block-major pool (kernels/kv_cache.py), random contents."""
    caches = allocate_kv_caches(
        num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, DEVICE
    )
    for layer, cache in enumerate(caches):
        cache.copy_(randn(tuple(cache.shape), dtype, seed + layer))
    return caches


def _ids(num_blocks: int, n: int, seed: int) -> Tensor:
    return torch.randperm(num_blocks, generator=generator(seed))[:n].to(DEVICE)


@pytest.mark.parametrize("one_allocation", [True, False], ids=["one-launch", "per-layer"])
@pytest.mark.parametrize("dtype,head_dim,ratio,block_size,full", grid_params())
def test_gather_then_scatter_exact(
    dtype: torch.dtype,
    head_dim: int,
    ratio: int,
    block_size: int,
    full: bool,
    one_allocation: bool,
) -> None:
    num_layers, num_blocks, n = (8, 160, 129) if full else (3, 7, 3)
    caches = _caches(dtype, head_dim, ratio, block_size, num_layers, num_blocks, one_allocation, 0)
    ids = _ids(num_blocks, n, seed=ratio)
    staging = gather_blocks(caches, ids)
    assert torch.equal(staging, reference.gather_blocks(caches, ids))

    targets = _caches(dtype, head_dim, ratio, block_size, num_layers, num_blocks, one_allocation, 9)
    expected = [t.clone() for t in targets]
    dest = _ids(num_blocks, n, seed=ratio + 1)
    scatter_blocks(staging, targets, dest)
    reference.scatter_blocks(staging, expected, dest)
    for got, want in zip(targets, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_block_major_pool_one_launch_exact(dtype: torch.dtype) -> None:
    """Views of the block-major pool: evenly spaced (one launch), blocks strided, exact."""
    caches = _block_major(dtype, 64, 2, 16, 3, 7, seed=1)
    assert block_copy._layer_stride(caches) == 2 * 16 * 2 * 64
    ids = _ids(7, 3, seed=2)
    staging = gather_blocks(caches, ids)
    assert torch.equal(staging, reference.gather_blocks(caches, ids))
    targets = _block_major(dtype, 64, 2, 16, 3, 7, seed=5)
    expected = [t.clone() for t in targets]
    dest = _ids(7, 3, seed=3)
    scatter_blocks(staging, targets, dest)
    reference.scatter_blocks(staging, expected, dest)
    for got, want in zip(targets, expected, strict=True):
        assert torch.equal(got, want)
    refs = _block_major(dtype, 64, 2, 16, 3, 7, seed=5)
    reference.scatter_blocks(staging, refs, dest)  # the reference on strided views
    for got, want in zip(refs, expected, strict=True):
        assert torch.equal(got, want)


def test_gather_into_out_and_empty_and_single() -> None:
    caches = _caches(torch.float16, 64, 2, 16, 2, 5, True, seed=0)
    out = torch.zeros((2, 2, 1, 16, 2, 64), dtype=torch.float16, device=DEVICE)
    ids = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    assert gather_blocks(caches, ids, out=out) is out
    assert torch.equal(out[1, 0, 0], caches[1][0, 4])
    empty = gather_blocks(caches, ids[:0])
    assert empty.shape == (2, 2, 0, 16, 2, 64)
    scatter_blocks(empty, caches, ids[:0])


def test_layers_in_reverse_order_are_evenly_spaced_too() -> None:
    caches = _caches(torch.float32, 64, 1, 16, 3, 4, True, seed=1)[::-1]
    ids = torch.tensor([3, 0], device=DEVICE)
    assert torch.equal(gather_blocks(caches, ids), reference.gather_blocks(caches, ids))


# --------------------------------------------------------------------------- bad input


def test_rejects_block_ids_past_cache() -> None:
    caches = _caches(torch.float32, 64, 2, 16, 2, 4, True, seed=0)
    with pytest.raises(KernelInputError, match="block_ids holds 4"):
        gather_blocks(caches, torch.tensor([1, 4], device=DEVICE))
    staging = gather_blocks(caches, torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(KernelInputError, match="block_ids holds -1"):
        scatter_blocks(staging, caches, torch.tensor([1, -1], device=DEVICE))


def test_rejects_duplicate_scatter_targets() -> None:
    caches = _caches(torch.float32, 64, 2, 16, 2, 4, True, seed=0)
    staging = gather_blocks(caches, torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(KernelInputError, match="distinct"):
        scatter_blocks(staging, caches, torch.tensor([3, 3], device=DEVICE))


def test_rejects_mismatched_layers_and_staging() -> None:
    caches = _caches(torch.float32, 64, 2, 16, 2, 4, False, seed=0)
    ids = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(KernelInputError, match=r"kv_caches\[1\] must have shape"):
        gather_blocks([caches[0], caches[1][:, :3].contiguous()], ids)
    with pytest.raises(KernelInputError, match="dtypes must match"):
        gather_blocks([caches[0], caches[1].half()], ids)
    with pytest.raises(KernelInputError, match="out must have shape"):
        gather_blocks(caches, ids, out=torch.empty((2, 2, 3, 16, 2, 64), device=DEVICE))
    staging = gather_blocks(caches, ids)
    with pytest.raises(KernelInputError, match="staging must be contiguous"):
        scatter_blocks(staging.transpose(0, 1).contiguous().transpose(0, 1), caches, ids)
    with pytest.raises(KernelInputError, match="dtypes must match"):
        scatter_blocks(staging.half(), caches, ids)
    with pytest.raises(KernelInputError, match="at least one layer"):
        gather_blocks([], ids)
