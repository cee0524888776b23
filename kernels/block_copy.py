"""Block gather / scatter: the KV transfer layer's copy path.

Owns ``_block_copy_kernel`` (one program per (layer, K|V, block) and chunk of the block's
``block_size * num_kv_heads * head_dim`` elements; ``USE_SCATTER`` picks the direction) and the
typed launchers ``gather_blocks`` / ``scatter_blocks``. Same contract as their references:
staging is [num_layers, 2, n, block_size, num_kv_heads, head_dim], copies are exact.

Layers are reached from layer 0's pointer plus a constant stride, so when the engine's
per-layer caches are evenly spaced (views of one allocation: the block-major pool, where
layers are ``2 * block_elems`` apart and blocks ``num_layers * 2 * block_elems``) the whole
transfer is one launch; otherwise it falls back to one launch per layer. K/V and blocks are
addressed through the cache's strides, so both layout kinds of kernels/kv_cache.py work. fp8
caches (and their staging buffers) are copied as bytes, through ``torch.uint8`` views: Triton
needs no fp8 support for that, on any GPU or in the interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import (
    FP8_KV_DTYPES,
    INDEX_DTYPES,
    KernelInputError,
    check_contiguous,
    check_dtype,
    check_kv_cache,
    check_range,
    check_same_device,
    check_same_dtype,
    check_shape,
    memoized,
    next_power_of_2,
    require,
    values_checked,
)

Tensor = torch.Tensor

MAX_BLOCK = 4096  # elements per program (beat whole-block programs of 16384 on an H200)


@triton.jit
def _block_copy_kernel(
    cache_ptr,  # layer 0 of num_layers x [2, num_blocks, block_elems] (strided), layer_stride apart
    staging_ptr,  # [num_layers, 2, num_ids, block_elems]
    block_ids_ptr,  # [num_ids]
    num_ids,
    layer_stride,
    kv_stride,
    block_stride,
    block_elems,
    BLOCK: tl.constexpr,
    USE_SCATTER: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (layer * 2 + kv) * num_ids + i
    i = row % num_ids
    layer_kv = row // num_ids
    block_id = tl.load(block_ids_ptr + i).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < block_elems
    cache_off = (layer_kv // 2) * layer_stride + (layer_kv % 2) * kv_stride + block_id * block_stride
    cache = cache_ptr + cache_off + cols
    staging = staging_ptr + row * block_elems + cols
    if USE_SCATTER:
        tl.store(cache, tl.load(staging, mask=mask), mask=mask)
    else:
        tl.store(staging, tl.load(cache, mask=mask), mask=mask)


def gather_blocks(kv_caches: list[Tensor], block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Triton twin of ``reference.gather_blocks``: returns (or fills) the staging buffer."""
    _check_caches(kv_caches, block_ids)
    shape = (len(kv_caches), 2, block_ids.numel(), *kv_caches[0].shape[2:])
    if out is None:
        out = torch.empty(shape, dtype=kv_caches[0].dtype, device=kv_caches[0].device)
    _check_staging("out", out, kv_caches[0], shape)
    _copy(kv_caches, out, block_ids, scatter=False)
    return out


def scatter_blocks(staging: Tensor, kv_caches: list[Tensor], block_ids: Tensor) -> None:
    """Triton twin of ``reference.scatter_blocks`` (in place); block ids must be distinct."""
    _check_caches(kv_caches, block_ids)
    shape = (len(kv_caches), 2, block_ids.numel(), *kv_caches[0].shape[2:])
    _check_staging("staging", staging, kv_caches[0], shape)
    _check_distinct(block_ids)
    _copy(kv_caches, staging, block_ids, scatter=True)


def _check_caches(kv_caches: Sequence[Tensor], block_ids: Tensor) -> None:
    require(len(kv_caches) > 0, "kv_caches must hold at least one layer")
    first = kv_caches[0]
    for layer, cache in enumerate(kv_caches):
        check_kv_cache(f"kv_caches[{layer}]", cache)
        check_shape(f"kv_caches[{layer}]", cache, tuple(first.shape))
        check_same_dtype(**{"kv_caches[0]": first, f"kv_caches[{layer}]": cache})
        check_same_device(**{"kv_caches[0]": first, f"kv_caches[{layer}]": cache})
    check_dtype("block_ids", block_ids, INDEX_DTYPES)
    require(block_ids.dim() == 1, f"block_ids must be [n], got {tuple(block_ids.shape)}")
    check_contiguous("block_ids", block_ids)
    check_same_device(kv_caches=first, block_ids=block_ids)
    check_range("block_ids", block_ids, 0, first.shape[1])


def _check_staging(name: str, staging: Tensor, cache: Tensor, shape: tuple[int, ...]) -> None:
    check_shape(name, staging, shape)
    check_same_dtype(**{name: staging, "kv_caches": cache})
    check_same_device(**{name: staging, "kv_caches": cache})
    check_contiguous(name, staging)


def _check_distinct(block_ids: Tensor) -> None:
    if values_checked():
        memoized("distinct_block_ids", [block_ids], (), lambda: _read_distinct(block_ids))


def _read_distinct(block_ids: Tensor) -> None:
    if torch.unique(block_ids).numel() != block_ids.numel():
        raise KernelInputError(f"block_ids must be distinct to scatter, got {block_ids.tolist()}")


def _layer_stride(kv_caches: Sequence[Tensor]) -> int | None:
    """Elements between consecutive layers when they are evenly spaced with equal strides,
    else None."""
    if len(kv_caches) == 1:
        return 0
    if len({cache.stride() for cache in kv_caches}) != 1:
        return None
    size = kv_caches[0].element_size()
    ptrs = [cache.data_ptr() for cache in kv_caches]
    steps = {b - a for a, b in zip(ptrs, ptrs[1:], strict=False)}
    if len(steps) != 1:
        return None
    step = steps.pop()
    return step // size if step % size == 0 else None


def _copy(kv_caches: Sequence[Tensor], staging: Tensor, block_ids: Tensor, scatter: bool) -> None:
    if block_ids.numel() == 0:
        return
    stride = _layer_stride(kv_caches)
    if stride is not None:
        _launch(kv_caches[0], staging, block_ids, len(kv_caches), stride, scatter)
        return
    for layer, cache in enumerate(kv_caches):
        _launch(cache, staging[layer], block_ids, 1, 0, scatter)


def _launch(
    cache: Tensor,
    staging: Tensor,
    block_ids: Tensor,
    num_layers: int,
    layer_stride: int,
    scatter: bool,
) -> None:
    block_elems = cache.shape[2] * cache.shape[3] * cache.shape[4]
    block = min(MAX_BLOCK, next_power_of_2(block_elems))
    if cache.dtype in FP8_KV_DTYPES:  # bytes: same element size, shapes and strides
        cache, staging = cache.view(torch.uint8), staging.view(torch.uint8)
    grid = (num_layers * 2 * block_ids.numel(), triton.cdiv(block_elems, block))
    _block_copy_kernel[grid](
        cache,
        staging,
        block_ids,
        block_ids.numel(),
        layer_stride,
        cache.stride(0),
        cache.stride(1),
        block_elems,
        BLOCK=block,
        USE_SCATTER=scatter,
        num_warps=4,
    )
