"""store_kv: write new K/V rows into the paged cache by slot mapping.

Owns ``_store_kv_kernel`` (one program per token and chunk of its ``num_kv_heads * head_dim``
row, K and V together) and its typed launcher. Same contract as ``reference.store_kv``: in
place, slot ``-1`` skips the token. The copy is exact; dtypes must already match the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from splitserve.kernels.checks import (
    INDEX_DTYPES,
    check_dtype,
    check_inner_contiguous,
    check_kv_cache,
    check_range,
    check_same_device,
    check_same_dtype,
    check_shape,
    next_power_of_2,
    require,
)

Tensor = torch.Tensor

MAX_BLOCK = 4096  # row elements per program


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [T, num_kv_heads, head_dim]
    value_ptr,  # [T, num_kv_heads, head_dim]
    cache_ptr,  # [2, num_blocks * block_size, num_kv_heads * head_dim]
    slot_mapping_ptr,  # [T]
    stride_key,
    stride_value,
    stride_kv,
    row_size,
    BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:  # -1: a padding token, nothing to store
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_size
        key = tl.load(key_ptr + tok * stride_key + cols, mask=mask)
        value = tl.load(value_ptr + tok * stride_value + cols, mask=mask)
        dst = cache_ptr + slot * row_size + cols  # int64: slots * row_size passes 2**31
        tl.store(dst, key, mask=mask)
        tl.store(dst + stride_kv, value, mask=mask)


def store_kv(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Triton twin of ``reference.store_kv`` (in place)."""
    _check_inputs(key, value, kv_cache, slot_mapping)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row_size = kv_cache.shape[3] * kv_cache.shape[4]
    block = min(MAX_BLOCK, next_power_of_2(row_size))
    grid = (num_tokens, triton.cdiv(row_size, block))
    _store_kv_kernel[grid](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        kv_cache.stride(0),
        row_size,
        BLOCK=block,
        num_warps=4,
    )


def _check_inputs(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    check_kv_cache("kv_cache", kv_cache)
    check_same_dtype(key=key, value=value, kv_cache=kv_cache)
    check_same_device(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    require(key.dim() == 3, f"key must be [T, num_kv_heads, head_dim], got {tuple(key.shape)}")
    check_shape("key", key, (None, num_kv_heads, head_dim))
    check_shape("value", value, tuple(key.shape))
    check_inner_contiguous("key", key, 2)
    check_inner_contiguous("value", value, 2)
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    check_shape("slot_mapping", slot_mapping, (key.shape[0],))
    check_range("slot_mapping", slot_mapping, -1, num_blocks * block_size)
