"""BlockPool and KVCacheManager: exact block ids, free-list order, prefix hits, LRU eviction."""

from __future__ import annotations

import pytest

from splitserve.hashing import hash_block_tokens
from splitserve.roles.engine.block_pool import BlockPool
from splitserve.roles.engine.kv_cache_manager import KVCacheManager
from splitserve.roles.engine.request import Request
from splitserve.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int], block_size: int = 4) -> Request:
    return Request(rid, tokens, SamplingParams(), seed=0, max_tokens=8, block_size=block_size)


def test_allocation_takes_head_and_free_appends_tail() -> None:
    pool = BlockPool(6)
    a = pool.get_new_blocks(2)
    b = pool.get_new_blocks(3)
    assert [x.block_id for x in a] == [0, 1] and [x.block_id for x in b] == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    pool.free_blocks(list(reversed(a)))
    assert pool.free_block_ids() == [5, 1, 0]
    assert pool.get_new_blocks(4) is None  # too few: nothing taken
    assert pool.free_block_ids() == [5, 1, 0]
    pool.free_blocks(b)
    assert pool.num_free_blocks == 6


def test_double_free_is_refused() -> None:
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    pool.free_blocks([blk])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([blk])


def test_prefix_hit_reuses_blocks_and_events() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    r1 = _req("r1", tokens)
    assert [b.block_id for b in kv.allocate_slots(r1, 10)] == [0, 1, 2]
    events = kv.pool.take_events()
    assert [e.kind for e in events] == ["stored", "stored"]
    assert [e.block_hashes[0] for e in events] == hash_block_tokens(tokens, 4)
    r2 = _req("r2", tokens[:8] + [99, 98, 97])
    hits, num = kv.get_computed_blocks(r2)
    assert [b.block_id for b in hits] == [0, 1] and num == 8
    r2.num_computed_tokens = 0
    new = kv.allocate_slots(r2, 11 - 8, hits)
    assert [b.block_id for b in new] == [3]
    assert kv.get_block_ids("r2") == [0, 1, 3]
    assert kv.pool.blocks[0].ref_cnt == 2
    kv.free(r1)
    kv.free(r2)
    assert kv.pool.num_free_blocks == 8


def test_cached_blocks_evicted_lru_and_hit_leaves_free_list() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r1 = _req("r1", list(range(9)))
    kv.allocate_slots(r1, 9)  # blocks 0,1 cached, 2 partial
    kv.free(r1)  # freed tail first: order 3, 2, 1, 0
    assert kv.pool.free_block_ids() == [3, 2, 1, 0]
    r2 = _req("r2", list(range(8)) + [5])
    hits, num = kv.get_computed_blocks(r2)
    assert [b.block_id for b in hits] == [0, 1] and num == 8
    kv.allocate_slots(r2, 1, hits)
    assert kv.get_block_ids("r2") == [0, 1, 3]
    assert kv.pool.free_block_ids() == [2]
    kv.free(r2)
    r3 = _req("r3", [7] * 16)  # needs all 4 blocks: evicts cached ones
    kv.allocate_slots(r3, 16)
    assert kv.pool.get_cached_block(hash_block_tokens(list(range(8)), 4)[0]) is None
    removed = [e for e in kv.pool.take_events() if e.kind == "removed"]
    assert removed
    kv.free(r3)
    assert kv.pool.num_free_blocks == 4


def test_full_prompt_hit_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r1 = _req("r1", list(range(8)))
    kv.allocate_slots(r1, 8)
    r2 = _req("r2", list(range(8)))
    hits, num = kv.get_computed_blocks(r2)
    assert num == 4 and len(hits) == 1


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r1 = _req("r1", list(range(8)))
    kv.allocate_slots(r1, 8)
    r2 = _req("r2", list(range(100, 112)))
    assert kv.allocate_slots(r2, 12) is None
    assert kv.get_block_ids("r2") == []
    assert kv.pool.free_block_ids() == [2]
