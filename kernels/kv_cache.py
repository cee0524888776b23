"""Paged KV cache allocation: the block-major pool and the per-layer views the kernels read.

Owns the two layout kinds and how to tell them apart:

- ``block_major`` (what the engine allocates): one tensor per worker,
  ``pool: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so that one
  block of every layer, K and V, is one contiguous region of
  ``num_layers * 2 * block_size * num_kv_heads * head_dim`` elements, and a run of
  consecutive block ids is one contiguous region too: the KV transfer sends and receives
  such runs in place, one message each, with no gather or scatter. Layer ``l``'s cache is
  the strided view ``pool[:, l].transpose(0, 1)``: ``[2, num_blocks, block_size,
  num_kv_heads, head_dim]`` with strides ``(E, num_layers * 2 * E, num_kv_heads * head_dim,
  head_dim, 1)`` where ``E = block_size * num_kv_heads * head_dim``.
- ``layer_major`` (the previous layout, still accepted everywhere): one contiguous
  ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` tensor per layer.

Every kernel reads a layer's cache through its strides; a block's
``[block_size, num_kv_heads, head_dim]`` rows are packed in both kinds (what the kernels
need for row loads and what the CPU decode's ``index_select`` over
``[num_blocks, block_elems]`` rows needs). This module must not launch kernels or move
bytes between processes.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch

from splitserve import env

Tensor = torch.Tensor

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
"""Cache dtypes of ``kv_cache_dtype="fp8_e4m3"`` / ``"fp8_e5m2"``: K/V stored with no scale."""


def to_cache_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` as stored in a cache of ``dtype``: a plain cast, except into an fp8 cache, where
    values are first clamped to the format's largest finite value (a cast alone makes NaN of
    e4m3's overflow and inf of e5m2's), then rounded to nearest even from float32. Every
    backend's store (native C, Triton) writes exactly these bytes."""
    if dtype in FP8_KV_DTYPES:
        big = torch.finfo(dtype).max
        return x.float().clamp(-big, big).to(dtype)
    return x.to(dtype)


def widen_kv(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Cache rows ``x`` in the dtype attention computes with: fp8 rows widened to ``dtype``
    (exact: every e4m3 / e5m2 value is a bfloat16 and a float32); others as they are."""
    return x.to(dtype) if x.dtype in FP8_KV_DTYPES else x


BLOCK_MAJOR = "block_major"
LAYER_MAJOR = "layer_major"
LAYOUT_KINDS = (BLOCK_MAJOR, LAYER_MAJOR)


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    kind: str = BLOCK_MAJOR,
) -> list[Tensor]:
    """Zeroed per-layer caches ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` of
    ``kind``; for ``block_major`` all are views of one allocation (see ``kv_pool``)."""
    if kind not in LAYOUT_KINDS:
        raise ValueError(f"kind must be one of {LAYOUT_KINDS}, got {kind!r}")
    for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                        ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    block = (block_size, num_kv_heads, head_dim)
    if kind == LAYER_MAJOR:
        return [
            torch.zeros((2, num_blocks, *block), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
    # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    shape = (num_blocks, num_layers, 2, *block)
    if torch.device(device).type == "cpu":
        pool = host_pool(shape, dtype)
    else:
        pool = torch.zeros(shape, dtype=dtype, device=device)
    return [pool[:, layer].transpose(0, 1) for layer in range(num_layers)]


HUGE_PAGE = 2 << 20


def host_pool(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A zeroed host tensor of ``shape`` that asks the kernel for transparent huge pages.

    The pool is an anonymous mapping with ``MADV_HUGEPAGE`` (honoured where THP is
    ``madvise`` or ``always``; a no-op where it is ``never``), touched here so its pages are
    committed at start as ``torch.zeros`` would. 2 MiB pages matter twice: a cross-process
    read of a run of blocks (UCX's CMA path pins the sender's pages one page at a time)
    moved 256 MB at a median 6.6 GB/s (5.3-11.4) against 4.8 (2.9-5.6) on 4 KiB pages over
    five alternating runs (docs/serving.md), and decode attention,
    which reads a block's K and V from all over the pool, takes fewer TLB misses. Pools
    under 2 MiB, and ``SPLITSERVE_KV_HUGE_PAGES=0``, get plain ``torch.zeros``.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if (nbytes < HUGE_PAGE or not env.SPLITSERVE_KV_HUGE_PAGES.get()
            or not hasattr(mmap, "MADV_HUGEPAGE")):
        return torch.zeros(tuple(shape), dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without THP (EINVAL): ordinary pages, same pool
        pass
    # frombuffer holds the mapping (a buffer export) for as long as the tensor lives.
    pool = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(tuple(shape))
    pool.zero_()  # commit the pages now (the mapping reads as zeros already)
    return pool


def layout_kind(kv_caches: Sequence[Tensor]) -> str:
    """``block_major`` or ``layer_major``; ``ValueError`` for anything else."""
    if not kv_caches:
        raise ValueError("kv_caches is empty: need one tensor per layer")
    if kv_pool(kv_caches) is not None:
        return BLOCK_MAJOR
    if all(cache.is_contiguous() for cache in kv_caches):
        return LAYER_MAJOR
    raise ValueError(
        "KV caches must be contiguous per layer (layer_major) or views of one "
        "[num_blocks, num_layers, 2, block_size, kv_heads, head_dim] tensor (block_major); "
        f"got strides {[c.stride() for c in kv_caches[:2]]}"
    )


def kv_pool(kv_caches: Sequence[Tensor]) -> Tensor | None:
    """The ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` tensor that
    block-major ``kv_caches`` are views of (rebuilt from layer 0's storage), else None."""
    first = kv_caches[0]
    if first.dim() != 5 or first.shape[0] != 2:
        return None
    _, num_blocks, block_size, num_kv_heads, head_dim = first.shape
    elems = block_size * num_kv_heads * head_dim
    num_layers = len(kv_caches)
    want = (elems, num_layers * 2 * elems, num_kv_heads * head_dim, head_dim, 1)
    base = first.data_ptr()
    size = first.element_size()
    for layer, cache in enumerate(kv_caches):
        if cache.shape != first.shape or cache.dtype != first.dtype:
            return None
        if cache.device != first.device or cache.stride() != want:
            return None
        if cache.data_ptr() != base + layer * 2 * elems * size:
            return None
        if cache.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    return first.as_strided(shape, _contiguous_strides(shape), first.storage_offset())


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
