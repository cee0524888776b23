"""A KV cache of more than 2**31 elements per K/V half: offsets must be computed in int64.

GPU only (about 24 GiB of device memory). Every kernel that indexes the cache touches its last
blocks, where a 32-bit offset would wrap and read or write the wrong place.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.block_copy import gather_blocks, scatter_blocks
from splitserve.kernels.decode_attention import paged_decode_attention
from splitserve.kernels.prefill_attention import prefill_attention
from splitserve.kernels.store_kv import store_kv
from tests.kernels.cases import assert_close

pytestmark = pytest.mark.gpu

Tensor = torch.Tensor

BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
NUM_BLOCKS = 140_000  # 140_000 * 16 * 8 * 128 = 2.29e9 elements per half > 2**31
NEEDED_BYTES = 26 * 2**30


@pytest.fixture(scope="module")
def cache() -> Iterator[Tensor]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.mem_get_info()[0] < NEEDED_BYTES:
        pytest.skip("needs about 26 GiB of free GPU memory")
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kv_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    assert kv_cache[0].numel() > 2**31
    yield kv_cache
    del kv_cache
    torch.cuda.empty_cache()


def _top_tables(num_seqs: int, cols: int) -> Tensor:
    """Block tables made of the cache's last blocks, shuffled."""
    ids = torch.arange(NUM_BLOCKS - num_seqs * cols, NUM_BLOCKS, device="cuda")
    return ids[torch.randperm(ids.numel(), device="cuda")].view(num_seqs, cols).int()


def test_store_kv_into_last_slots(cache: Tensor) -> None:
    num_slots = NUM_BLOCKS * BLOCK_SIZE
    slots = torch.arange(num_slots - 300, num_slots, device="cuda")[
        torch.randperm(300, device="cuda")
    ]
    key = torch.randn((300, NUM_KV_HEADS, HEAD_DIM), dtype=torch.bfloat16, device="cuda")
    value = torch.randn_like(key)
    store_kv(key, value, cache, slots)
    flat = cache.view(2, num_slots, NUM_KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[0][slots], key)
    assert torch.equal(flat[1][slots], value)


def test_decode_attention_on_last_blocks(cache: Tensor) -> None:
    contexts = [1, 777, 2048, 4093]
    tables = _top_tables(len(contexts), 256)
    lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")
    query = torch.randn((4, 32, HEAD_DIM), dtype=torch.bfloat16, device="cuda")
    out = paged_decode_attention(query, cache, tables, lens, HEAD_DIM**-0.5)
    expected = reference.paged_decode_attention(query, cache, tables, lens, HEAD_DIM**-0.5)
    assert_close(out, expected, attention=True)


def test_prefill_attention_on_last_blocks(cache: Tensor) -> None:
    chunks = [(1, 1), (300, 1000), (517, 517)]
    tables = _top_tables(len(chunks), 64)
    starts = torch.tensor([0, 1, 301, 818], dtype=torch.int32, device="cuda")
    lens = torch.tensor([c for _, c in chunks], dtype=torch.int32, device="cuda")
    query = torch.randn((818, 16, HEAD_DIM), dtype=torch.bfloat16, device="cuda")
    out = prefill_attention(query, cache, tables, starts, lens, 0.1)
    assert_close(out, reference.prefill_attention(query, cache, tables, starts, lens, 0.1), True)


def test_gather_and_scatter_past_32_bit_offsets(cache: Tensor) -> None:
    # 70_000 blocks: the staging buffer itself holds 2 * 70_000 * 16_384 > 2**31 elements.
    ids = torch.arange(NUM_BLOCKS - 70_000, NUM_BLOCKS, device="cuda")
    ids = ids[torch.randperm(ids.numel(), device="cuda")]
    staging = gather_blocks([cache], ids)
    assert staging.numel() > 2**31
    assert torch.equal(staging, reference.gather_blocks([cache], ids))
    dest = ids.roll(1)
    scatter_blocks(staging, [cache], dest)
    assert torch.equal(cache.index_select(1, dest), staging[0])
