"""Launcher-side validation shared by the Triton kernel files.

Every launcher checks its inputs here before it launches: shapes, dtypes, devices and strides
(free, host-side metadata), and index values (block tables, slot mappings, positions), which
costs a device-to-host read. The engine calls each kernel once per layer with the same index
tensors, so a value check that passed is remembered for those exact tensors (by identity and
in-place version counter, through weak references) and the other layers skip the read.
``SPLITSERVE_KERNEL_CHECKS=0`` turns the value checks off (metadata checks always run) for
callers that validate their indices themselves, e.g. under CUDA graph capture. This module owns
no kernels and never touches tensor contents beyond those reads.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from splitserve import env
from splitserve.errors import SplitserveError
from splitserve.kernels.kv_cache import FP8_KV_DTYPES

Tensor = torch.Tensor
T = TypeVar("T")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# A KV cache holds the model's float dtype, or fp8 (``kv_cache_dtype="fp8*"``, no scale): the
# kernels read and write fp8 caches as bytes (a uint8 view), see kernels/rounding.py.
KV_CACHE_DTYPES = FLOAT_DTYPES + FP8_KV_DTYPES


class KernelInputError(SplitserveError, ValueError):
    """A kernel launcher refused its inputs; nothing was launched."""


def require(condition: bool, message: str) -> None:
    """Raise ``KernelInputError(message)`` unless ``condition`` holds."""
    if not condition:
        raise KernelInputError(message)


def check_dtype(name: str, tensor: Tensor, allowed: Sequence[torch.dtype]) -> None:
    require(
        tensor.dtype in allowed, f"{name} must have dtype in {list(allowed)}, got {tensor.dtype}"
    )


def check_same_dtype(**tensors: Tensor) -> None:
    """All named tensors share one dtype (the kernels never convert silently)."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    require(len(set(dtypes.values())) == 1, f"dtypes must match, got {dtypes}")


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: str(t.device) for name, t in tensors.items()}
    require(len(set(devices.values())) == 1, f"tensors must share one device, got {devices}")


def check_ndim(name: str, tensor: Tensor, ndim: int) -> None:
    require(tensor.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")


def check_shape(name: str, tensor: Tensor, shape: Sequence[int | None]) -> None:
    """``tensor.shape`` equals ``shape``, where ``None`` matches any size."""
    ok = tensor.dim() == len(shape) and all(
        want is None or got == want for got, want in zip(tensor.shape, shape, strict=False)
    )
    require(ok, f"{name} must have shape {tuple(shape)} (None = any), got {tuple(tensor.shape)}")


def check_contiguous(name: str, tensor: Tensor) -> None:
    require(tensor.is_contiguous(), f"{name} must be contiguous (strides {tensor.stride()})")


def check_inner_contiguous(name: str, tensor: Tensor, num_inner: int) -> None:
    """The last ``num_inner`` dims are packed (row stride of the outer dims is free)."""
    expected = 1
    for dim in range(tensor.dim() - 1, tensor.dim() - 1 - num_inner, -1):
        if tensor.shape[dim] > 1:
            require(
                tensor.stride(dim) == expected,
                f"{name} must be contiguous in its last {num_inner} dims "
                f"(shape {tuple(tensor.shape)}, strides {tensor.stride()})",
            )
        expected *= tensor.shape[dim]


def check_divisible(num_heads: int, num_kv_heads: int) -> None:
    require(
        num_kv_heads > 0 and num_heads % num_kv_heads == 0,
        f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})",
    )


def values_checked() -> bool:
    """Whether launchers read index tensors back to validate them (default: yes)."""
    return env.SPLITSERVE_KERNEL_CHECKS.get()


def check_range(name: str, values: Tensor, low: int, high: int) -> None:
    """Every value lies in ``[low, high)``: one device read, skipped for unchanged tensors."""
    if not values_checked() or values.numel() == 0:
        return
    memoized(f"range:{name}", [values], (low, high), lambda: _check_range(name, values, low, high))


def _check_range(name: str, values: Tensor, low: int, high: int) -> None:
    bad = (values < low) | (values >= high)
    if bool(bad.any()):
        first = values[bad][0].item()
        raise KernelInputError(f"{name} holds {first}, outside [{low}, {high})")


# check kind -> (identities of the tensors it passed for, extra key, its result)
_PASSED: dict[str, tuple[list[tuple[Any, ...]], tuple[Any, ...], Any]] = {}


def memoized(
    kind: str, tensors: Sequence[Tensor], extra: tuple[Any, ...], check: Callable[[], T]
) -> T:
    """``check()``, unless it last passed (returned) for these very tensors, unchanged since.

    One entry per ``kind``. A tensor matches only while it is alive, at the same storage, shape
    and strides, with the same in-place version counter; inference-mode tensors keep no version
    counter and are checked every time. A check that raises is never remembered.
    """
    maybe = [_identity(t) for t in tensors]
    identities = [i for i in maybe if i is not None]
    if len(identities) < len(maybe):
        return check()
    entry = _PASSED.get(kind)
    if entry is not None and entry[1] == extra and _same(entry[0], identities):
        return entry[2]
    result = check()
    _PASSED[kind] = (identities, extra, result)
    return result


def _identity(tensor: Tensor) -> tuple[Any, ...] | None:
    """What must stay equal for a check of ``tensor`` to still hold (None: cannot tell)."""
    try:
        version = tensor._version
    except RuntimeError:  # inference-mode tensors track no version
        return None
    base = tensor._base if tensor._base is not None else tensor
    return (weakref.ref(base), tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), version)


def _same(old: list[tuple[Any, ...]], new: list[tuple[Any, ...]]) -> bool:
    # compare referents by identity: == on tensors is elementwise
    return len(old) == len(new) and all(
        a[0]() is not None and a[0]() is b[0]() and a[1:] == b[1:]
        for a, b in zip(old, new, strict=True)
    )


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether kernels must feed ``tl.dot`` float32: the interpreter mis-reads bfloat16 dots."""
    return interpreting() and dtype == torch.bfloat16


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_runnable(name: str, tensor: Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors only under ``TRITON_INTERPRET=1``."""
    require(
        tensor.device.type == "cuda" or interpreting(),
        f"{name} is on {tensor.device}: Triton kernels need CUDA tensors "
        "(or TRITON_INTERPRET=1, set before importing the kernels, to run them on the CPU)",
    )


def check_kv_cache(name: str, kv_cache: Tensor) -> None:
    """One layer's cache: [2, num_blocks, block_size, num_kv_heads, head_dim], read through its
    strides (a view of the block-major pool, see kernels/kv_cache.py, or a contiguous tensor);
    each block's [block_size, num_kv_heads, head_dim] rows must be packed."""
    require(
        kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
        f"{name} must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
        f"got {tuple(kv_cache.shape)}",
    )
    check_dtype(name, kv_cache, KV_CACHE_DTYPES)
    check_inner_contiguous(name, kv_cache, 3)
    block_elems = kv_cache.shape[2] * kv_cache.shape[3] * kv_cache.shape[4]
    require(
        kv_cache.stride(0) > 0 and kv_cache.stride(1) >= block_elems,
        f"{name} must have positive K/V strides and blocks that do not overlap, "
        f"got strides {kv_cache.stride()}",
    )
    check_runnable(name, kv_cache)


def check_cache_dtype(kv_cache: Tensor, **tensors: Tensor) -> None:
    """The named float tensors share one dtype, and the cache holds it too or is fp8 (its
    values are then converted: rounded on store, widened exactly on load)."""
    if kv_cache.dtype in FP8_KV_DTYPES:
        check_same_dtype(**tensors)
    else:
        check_same_dtype(**tensors, kv_cache=kv_cache)


def kv_fp8_args(kv_cache: Tensor) -> tuple[Tensor, bool, bool]:
    """(what a kernel gets for ``kv_cache``, KV_FP8, FP8_E5M2): an fp8 cache travels as its
    ``torch.uint8`` view (same shape and strides) and the kernel converts the bytes itself
    (kernels/rounding.py); any other cache as it is, with both flags off."""
    if kv_cache.dtype in FP8_KV_DTYPES:
        return kv_cache.view(torch.uint8), True, kv_cache.dtype == torch.float8_e5m2
    return kv_cache, False, False


def check_block_tables(
    block_tables: Tensor, context_lens: Tensor, num_blocks: int, block_size: int
) -> None:
    """Context lengths fit the tables and every block a context covers exists: one device read
    (skipped for unchanged tensors)."""
    if not values_checked() or block_tables.shape[0] == 0:
        return
    memoized(
        "block_tables",
        [block_tables, context_lens],
        (num_blocks, block_size),
        lambda: _check_block_tables(block_tables, context_lens, num_blocks, block_size),
    )


def _check_block_tables(
    block_tables: Tensor, context_lens: Tensor, num_blocks: int, block_size: int
) -> None:
    max_blocks = block_tables.shape[1]
    ctx = context_lens.long()
    bad_ctx = (ctx < 0) | (ctx > max_blocks * block_size)
    used_cols = (ctx.clamp(min=0) + block_size - 1) // block_size  # [B]
    cols = torch.arange(max_blocks, device=block_tables.device)
    used = cols[None, :] < used_cols[:, None]
    bad_ids = ((block_tables < 0) | (block_tables >= num_blocks)) & used
    if not bool(bad_ctx.any() | bad_ids.any()):
        return
    if bool(bad_ctx.any()):
        seq = int(bad_ctx.nonzero()[0, 0])
        raise KernelInputError(
            f"context_lens[{seq}] = {int(ctx[seq])} is outside [0, {max_blocks * block_size}] "
            f"(block_tables has {max_blocks} columns of {block_size} tokens)"
        )
    seq, col = (int(i) for i in bad_ids.nonzero()[0])
    raise KernelInputError(
        f"block_tables[{seq}, {col}] = {int(block_tables[seq, col])} points past the cache "
        f"(num_blocks = {num_blocks})"
    )


def emulate_rtne(dtype: torch.dtype) -> bool:
    """Whether kernels must round float32 -> bfloat16 by hand (the interpreter truncates)."""
    return interpreting() and dtype == torch.bfloat16
