"""KvLayout, compatibility hash, handshake field naming, per-(layer, block) checksums."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.errors import IncompatibleKVLayoutError
from splitserve.kernels.reference import gather_blocks
from splitserve.kvtransfer.layout import (
    KvLayout,
    byte_view,
    cache_checksums,
    staging_checksums,
)

BASE = KvLayout(
    model_id="tiny",
    dtype="float32",
    num_layers=3,
    num_kv_heads=2,
    head_dim=8,
    block_size=4,
    num_blocks=10,
)


def _caches(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 10, 4, 2, 8, generator=g).to(dtype) for _ in range(3)]


def test_from_kv_caches_and_sizes() -> None:
    layout = KvLayout.from_kv_caches(_caches(), "tiny")
    assert layout == BASE
    assert layout.bytes_per_block_half == 4 * 2 * 8 * 4
    assert layout.staging_shape(3, 5) == (3, 2, 5, 4, 2, 8)
    assert layout.staging_nbytes(3, 5) == gather_blocks(_caches(), torch.arange(5)).nbytes


def test_block_offset_matches_tensor_memory() -> None:
    caches = _caches()
    raw = byte_view(caches[1])
    off = BASE.block_offset(1, 1, 7)
    expected = bytes(byte_view(caches[1][1, 7].contiguous()))
    assert bytes(raw[off : off + BASE.bytes_per_block_half]) == expected


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "other"),
        ("dtype", "float16"),
        ("num_layers", 4),
        ("num_kv_heads", 1),
        ("head_dim", 16),
        ("block_size", 16),
        ("layout_version", 2),
    ],
)
def test_mismatch_names_the_field(field: str, value: object) -> None:
    other = dataclasses.replace(BASE, **{field: value})
    assert other.compatibility_hash() != BASE.compatibility_hash()
    with pytest.raises(IncompatibleKVLayoutError, match=field) as info:
        BASE.check_compatible(other.to_wire())
    assert info.value.field == field


def test_num_blocks_is_local_only() -> None:
    other = dataclasses.replace(BASE, num_blocks=99)
    assert other.compatibility_hash() == BASE.compatibility_hash()
    BASE.check_compatible(other)


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(BASE, dtype="float64")
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(BASE, head_dim=0)
    with pytest.raises(ValueError, match="num_blocks, block_size"):
        KvLayout.from_kv_caches([torch.zeros(10, 4, 2, 8)], "tiny")
    with pytest.raises(ValueError, match="out of range"):
        BASE.check_block_ids([3, 10])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_and_staging_checksums_agree_and_detect_one_flipped_byte(dtype: torch.dtype) -> None:
    caches = _caches(dtype)
    ids = [7, 2, 5]
    staging = gather_blocks(caches, torch.tensor(ids))
    sums = cache_checksums(caches, ids)
    assert sums == staging_checksums(staging)
    assert len(sums) == 3 and all(len(row) == 3 for row in sums)
    staging.view(-1).view(torch.uint8)[staging.nbytes // 2] ^= 1
    bad = staging_checksums(staging)
    diffs = [(layer, i) for layer in range(3) for i in range(3) if bad[layer][i] != sums[layer][i]]
    assert len(diffs) == 1


def test_staging_pool_reuses_buffers_within_budget() -> None:
    from splitserve.kvtransfer.staging import StagingPool

    pool = StagingPool(max_cached_bytes=4096)
    a = pool.take((2, 4, 8), torch.float32, torch.device("cpu"))
    assert a.shape == (2, 4, 8) and a.is_contiguous()
    pool.give(a)
    b = pool.take((8, 8), torch.float32, torch.device("cpu"))  # same bytes, other shape
    assert b.data_ptr() == a.data_ptr() and pool.cached_bytes == 0
    pool.give(b)
    big = pool.take((4096,), torch.float32, torch.device("cpu"))
    pool.give(big)  # over budget: dropped
    assert pool.cached_bytes == 256
