"""store_kv: write new K/V rows into the paged cache by slot mapping.

Owns ``_store_kv_kernel`` (one program per tile of tokens x ``num_kv_heads * head_dim``
columns, K and V together) and its typed launcher. Same contract as ``reference.store_kv``: in
place, slot ``-1`` skips the token. Into a float cache the copy is exact and key/value must
already have its dtype; into an fp8 cache (float32/float16/bfloat16 key and value) each value is
saturated and rounded to nearest even in software on the cache's bytes (``fp8_encode``), the
bytes of ``kv_cache.to_cache_dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_cache_dtype,
    check_dtype,
    check_inner_contiguous,
    check_kv_cache,
    check_range,
    check_same_device,
    check_shape,
    kv_fp8_args,
    next_power_of_2,
    require,
)
from splitserve.kernels.rounding import fp8_encode

Tensor = torch.Tensor

MAX_BLOCK = 4096  # row elements per program
TILE_ELEMS = 1024  # per program: one token per program from 1024-element rows up (measured
# faster than 8-token tiles on an H200), several tokens per program when rows are shorter


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [T, num_kv_heads, head_dim]
    value_ptr,  # [T, num_kv_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads * head_dim], strided K/V and blocks
    # (KV_FP8: the uint8 view of an fp8 cache)
    slot_mapping_ptr,  # [T]
    num_tokens,
    stride_key,
    stride_value,
    stride_kv,
    stride_block,
    row_size,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_E5M2: tl.constexpr,
):
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    # -1 (padding) and rows past T store nothing
    slots = tl.load(slot_mapping_ptr + toks, mask=toks < num_tokens, other=-1).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (slots >= 0)[:, None] & (cols < row_size)[None, :]  # [BLOCK_T, BLOCK]
    key = tl.load(key_ptr + toks[:, None] * stride_key + cols[None, :], mask=mask)
    value = tl.load(value_ptr + toks[:, None] * stride_value + cols[None, :], mask=mask)
    if KV_FP8:
        key = fp8_encode(key.to(tl.float32), FP8_E5M2)
        value = fp8_encode(value.to(tl.float32), FP8_E5M2)
    # int64: block * stride_block passes 2**31 in large caches
    rows = (slots // BLOCK_SIZE) * stride_block + (slots % BLOCK_SIZE) * row_size
    dst = cache_ptr + rows[:, None] + cols[None, :]
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
    block_t = max(1, min(TILE_ELEMS // block, next_power_of_2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(row_size, block))
    cache, kv_fp8, fp8_e5m2 = kv_fp8_args(kv_cache)
    _store_kv_kernel[grid](
        key,
        value,
        cache,
        slot_mapping,
        num_tokens,
        key.stride(0),
        value.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        row_size,
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_T=block_t,
        BLOCK=block,
        KV_FP8=kv_fp8,
        FP8_E5M2=fp8_e5m2,
        num_warps=4,
    )


def _check_inputs(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    check_kv_cache("kv_cache", kv_cache)
    check_dtype("key", key, FLOAT_DTYPES)
    check_cache_dtype(kv_cache, key=key, value=value)
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
