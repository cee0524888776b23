"""KvLayout, compatibility hash, handshake field naming, per-(layer, block) checksums."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from splitserve.errors import IncompatibleKVLayoutError
from splitserve.kernels.kv_cache import (
    BLOCK_MAJOR,
    LAYER_MAJOR,
    allocate_kv_caches,
    kv_pool,
    layout_kind,
)
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


def _caches(dtype: torch.dtype = torch.float32, kind: str = BLOCK_MAJOR) -> list[torch.Tensor]:
    """Three layers of random KV, views of one block-major pool or one tensor each."""
    g = torch.Generator().manual_seed(0)
    caches = allocate_kv_caches(3, 10, 4, 2, 8, dtype, "cpu", kind)
    for cache in caches:
        cache.copy_(torch.randn(2, 10, 4, 2, 8, generator=g).to(dtype))
    return caches


def test_from_kv_caches_and_sizes() -> None:
    layout = KvLayout.from_kv_caches(_caches(), "tiny")
    assert layout == BASE
    assert layout.bytes_per_block_half == 4 * 2 * 8 * 4
    assert layout.staging_shape(3, 5) == (3, 2, 5, 4, 2, 8)
    assert layout.staging_nbytes(3, 5) == gather_blocks(_caches(), torch.arange(5)).nbytes


def test_layer_major_caches_name_their_kind() -> None:
    layout = KvLayout.from_kv_caches(_caches(kind=LAYER_MAJOR), "tiny")
    assert layout == dataclasses.replace(BASE, layout_kind=LAYER_MAJOR)
    with pytest.raises(ValueError, match="layout_kind"):
        dataclasses.replace(BASE, layout_kind="interleaved")


def test_block_offset_matches_tensor_memory() -> None:
    caches = _caches(kind=LAYER_MAJOR)
    layout = dataclasses.replace(BASE, layout_kind=LAYER_MAJOR)
    raw = byte_view(caches[1])
    off = layout.block_offset(1, 1, 7)
    expected = bytes(byte_view(caches[1][1, 7].contiguous()))
    assert bytes(raw[off : off + layout.bytes_per_block_half]) == expected


def test_block_major_block_is_one_region_in_the_pool() -> None:
    """Block b of every layer, K then V, is bytes [b * bytes_per_block, +bytes_per_block) of
    the pool, and the per-layer views read exactly those bytes."""
    caches = _caches()
    assert layout_kind(caches) == BLOCK_MAJOR
    pool = kv_pool(caches)
    assert pool is not None and pool.data_ptr() == caches[0].data_ptr()
    raw = byte_view(pool)
    block = raw[7 * BASE.bytes_per_block : 8 * BASE.bytes_per_block]
    want = b"".join(bytes(byte_view(c[kv, 7].contiguous())) for c in caches for kv in (0, 1))
    assert bytes(block) == want
    off = BASE.block_offset(2, 1, 7)
    assert bytes(raw[off : off + BASE.bytes_per_block_half]) == bytes(
        byte_view(caches[2][1, 7].contiguous())
    )


def test_other_strides_are_refused() -> None:
    caches = [torch.zeros(2, 10, 4, 2, 8)[:, ::2] for _ in range(3)]
    with pytest.raises(ValueError, match="layer_major.*block_major"):
        KvLayout.from_kv_caches(caches, "tiny")


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "other"),
        ("dtype", "float16"),
        ("num_layers", 4),
        ("num_kv_heads", 1),
        ("head_dim", 16),
        ("block_size", 16),
        ("layout_version", 99),
        ("layout_kind", LAYER_MAJOR),
        ("layer_windows", "4096,0"),
        ("model_signature", "Gemma2ForCausalLM;softcap=50.0"),
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


@pytest.mark.parametrize("kind", [BLOCK_MAJOR, LAYER_MAJOR])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_and_staging_checksums_agree_and_detect_one_flipped_byte(
    dtype: torch.dtype, kind: str
) -> None:
    caches = _caches(dtype, kind)
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


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping of this process that holds ``address``."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="Linux only")
def test_host_pool_asks_for_huge_pages_and_is_zeroed_and_owned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The block-major host pool is a mapping advised MADV_HUGEPAGE (its VMA carries the
    kernel's ``hg`` flag), reads as zeros, and keeps its memory alive through every view;
    ``SPLITSERVE_KV_HUGE_PAGES=0`` and pools under 2 MiB stay on ordinary allocations."""
    caches = allocate_kv_caches(4, 512, 16, 2, 64, torch.bfloat16, "cpu")  # 8 MiB
    pool = kv_pool(caches)
    assert pool is not None and layout_kind(caches) == BLOCK_MAJOR
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():  # a THP kernel
        assert "hg" in _vm_flags(pool.data_ptr())
    assert int(pool.abs().sum()) == 0
    view = caches[3]
    del caches, pool
    import gc

    gc.collect()
    view[1, 511].fill_(2.0)  # the mapping outlives the list and the pool tensor
    assert float(view.sum()) == 2.0 * 16 * 2 * 64

    import splitserve.kernels.kv_cache as kv_cache

    def no_mapping(*args: object, **kwargs: object) -> None:
        raise AssertionError("host_pool mapped memory it should have left to torch.zeros")

    # (the flags of a torch.zeros buffer are the heap's, which other code may have advised)
    monkeypatch.setattr(kv_cache.mmap, "mmap", no_mapping)
    small = kv_pool(allocate_kv_caches(2, 8, 16, 2, 64, torch.bfloat16, "cpu"))  # 64 KiB
    assert small is not None and int(small.abs().sum()) == 0
    monkeypatch.setenv("SPLITSERVE_KV_HUGE_PAGES", "0")
    plain = kv_pool(allocate_kv_caches(4, 512, 16, 2, 64, torch.bfloat16, "cpu"))
    assert plain is not None and int(plain.abs().sum()) == 0
