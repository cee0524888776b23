"""Shared builders for the kernel tests: devices, tolerances, random paged caches.

On a CPU the kernels run under Triton's interpreter (see conftest.py), so CPU cases stay
small; the ``gpu`` cases reuse the same builders at full size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

Tensor = torch.Tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)
GQA_RATIOS = (1, 3, 8)
BLOCK_SIZES = (16, 32)

# (atol, rtol) per dtype for kernels that round like their reference but sum in another order.
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
# Attention rounds its probabilities to the cache dtype at other points than the reference.
ATTENTION_TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (4e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def assert_close(actual: Tensor, expected: Tensor, attention: bool = False) -> None:
    table = ATTENTION_TOLERANCES if attention else TOLERANCES
    atol, rtol = table[expected.dtype]
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    """Seeded random normal values, made on DEVICE (full-size GPU cases are large)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEVICE).to(dtype)


def random_block_tables(
    context_lens: list[int], num_blocks: int, block_size: int, seed: int, extra_cols: int = 1
) -> Tensor:
    """[B, max_blocks] int32 of distinct random block ids per sequence (unused columns valid)."""
    cols = max(1, -(-max(context_lens, default=0) // block_size)) + extra_cols
    assert cols <= num_blocks
    g = generator(seed)
    rows = [torch.randperm(num_blocks, generator=g)[:cols] for _ in context_lens]
    return torch.stack(rows).to(device=DEVICE, dtype=torch.int32)


def int_tensor(values: list[int], dtype: torch.dtype = torch.int32) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def shape_grid(full: bool) -> Iterator[tuple[torch.dtype, int, int, int]]:
    """(dtype, head_dim, gqa_ratio, block_size) cases.

    Full: the whole product. Lean (CPU): every dtype with every GQA ratio, head dims and block
    sizes alternating so each dtype meets both of each.
    """
    if full:
        yield from itertools.product(DTYPES, HEAD_DIMS, GQA_RATIOS, BLOCK_SIZES)
        return
    for i, (dtype, ratio) in enumerate(itertools.product(DTYPES, GQA_RATIOS)):
        yield dtype, HEAD_DIMS[i % 2], ratio, BLOCK_SIZES[(i // 2) % 2]


def grid_params() -> list:
    """The lean grid for every device plus the full grid marked ``gpu``.

    Each case is (dtype, head_dim, gqa_ratio, block_size, full): ``full`` asks for full sizes.
    """
    lean = [pytest.param(*case, False, id=case_id(*case)) for case in shape_grid(full=False)]
    full = [
        pytest.param(*case, True, id="full-" + case_id(*case), marks=pytest.mark.gpu)
        for case in shape_grid(full=True)
    ]
    return lean + full


def case_id(dtype: torch.dtype, head_dim: int, ratio: int, block_size: int) -> str:
    return f"{str(dtype).removeprefix('torch.')}-d{head_dim}-gqa{ratio}-bs{block_size}"


def dtype_params() -> list:
    return [pytest.param(d, id=str(d).removeprefix("torch.")) for d in DTYPES]


def block_major_view(cache: Tensor, num_layers: int = 3, layer: int = 1) -> Tensor:
    """``cache`` [2, num_blocks, block_size, kv_heads, head_dim] copied into layer ``layer`` of
    a block-major pool (kernels/kv_cache.py) whose other layers hold other values: the strided
    view the engine's kernels read."""
    from splitserve.kernels.kv_cache import allocate_kv_caches

    _, num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    views = allocate_kv_caches(
        num_layers, num_blocks, block_size, num_kv_heads, head_dim, cache.dtype, cache.device
    )
    for i, view in enumerate(views):
        view.copy_(cache if i == layer else -cache - i)
    assert not views[layer].is_contiguous()
    return views[layer]
