"""Blocks that left every layer's window go back to the pool (windowed-only models).

KV manager level (exact block ids, torch-free): holes appear exactly when a block's last
position is before the next query's window, in prefill, chunked prefill and decode; a freed
block keeps the hash it was published under, a block never published is never published
after it is freed; P/D prefill requests keep every block; the pool stays consistent. Engine
level: a windowed-only family (Phi-3, Mixtral with a window on every layer) frees blocks in
the single engine and still equals transformers (``test_model_families.py`` asserts that
too); in 1P+1D the prefill side frees nothing before the hand-off and the decode side frees
after the load, with the single engine's tokens.
"""

from __future__ import annotations

import random

import pytest

from splitserve import LLM, SamplingParams
from splitserve.roles.engine.kv_cache_manager import NULL_BLOCK_ID, KVCacheManager
from splitserve.roles.engine.request import Request
from splitserve.sampling_params import SamplingParams as Params

BS, WINDOW = 4, 6


def _req(rid: str, n: int, sink: bool = False) -> Request:
    return Request(rid, list(range(100, 100 + n)), Params(), seed=0, max_tokens=8,
                   block_size=BS, remote_kv_sink=sink)


def _step(kv: KVCacheManager, req: Request, n: int, cache: bool = True) -> None:
    assert kv.allocate_slots(req, n, cache=cache) is not None
    req.num_computed_tokens += n


def test_blocks_before_the_window_are_freed_in_chunked_prefill_and_decode() -> None:
    kv = KVCacheManager(32, BS, sliding_window=WINDOW)
    req = _req("a", 20)
    _step(kv, req, 8)  # chunk 1: positions 0-7 (blocks 0, 1)
    assert kv.num_holes("a") == 0
    _step(kv, req, 8)  # chunk 2 at position 8 sees keys > 8 - 6 = 2: block 0 (0-3) stays
    assert kv.num_holes("a") == 0
    _step(kv, req, 4)  # chunk 3 at 16 sees keys >= 11: blocks 0, 1 (0-7) left the window
    assert kv.num_holes("a") == 2 and kv.num_window_freed == 2
    assert kv.get_block_ids("a")[:2] == [NULL_BLOCK_ID, NULL_BLOCK_ID]
    free_before = kv.pool.num_free_blocks
    _step(kv, req, 1)  # decode at 20 sees keys >= 15: block 2 (8-11) goes too
    assert kv.num_holes("a") == 3
    assert kv.pool.num_free_blocks == free_before + 1 - 1  # one freed, one new block taken
    assert kv.check_integrity({"a"}).ok
    kv.free(req)
    assert kv.pool.num_free_blocks == 32 and kv.check_integrity(set()).ok


def test_freed_blocks_keep_published_hashes_and_never_publish_holes() -> None:
    kv = KVCacheManager(32, BS, sliding_window=WINDOW)
    req = _req("a", 16)
    _step(kv, req, 16)  # all four blocks full and published
    assert len(kv.pool.cached_hashes()) == 4
    _step(kv, req, 1)  # decode at 16: blocks 0-1 freed, still cached (their KV is intact)
    assert kv.num_holes("a") == 2 and len(kv.pool.cached_hashes()) == 4
    other = _req("b", 16)
    hits, n = kv.get_computed_blocks(other)
    assert n == 12 and [b.block_id for b in hits[:2]] == [0, 1]  # reusable while not reused
    # a remote load (cache=False) whose blocks leave the window before cache_blocks
    loading = KVCacheManager(32, BS, sliding_window=WINDOW)
    req = _req("c", 16)
    _step(loading, req, 16, cache=False)
    _step(loading, req, 1, cache=False)
    assert loading.num_holes("c") == 2
    loading.cache_blocks(req, 16)
    assert len(loading.pool.cached_hashes()) == 2  # only the blocks still held
    assert set(loading.pool.cached_hashes()) == set(req.block_hashes[2:4])


def test_prefill_side_of_a_handoff_and_full_attention_keep_every_block() -> None:
    sink = KVCacheManager(32, BS, sliding_window=WINDOW)
    req = _req("a", 20, sink=True)
    for _ in range(5):
        _step(sink, req, 4)
    assert sink.num_holes("a") == 0 and sink.num_window_freed == 0
    assert NULL_BLOCK_ID not in sink.get_block_ids("a")[1:]
    full = KVCacheManager(32, BS)
    req = _req("b", 20)
    for _ in range(5):
        _step(full, req, 4)
    assert full.num_holes("b") == 0


_rng = random.Random(3)
PROMPTS = [[_rng.randrange(3, 4096) for _ in range(n)] for n in (70, 95)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, tokenizer_dir):
    from tests.families import make_family_model

    return make_family_model("phi3", tmp_path_factory.mktemp("phi3") / "phi3", tokenizer_dir)


def test_windowed_model_frees_blocks_and_equals_transformers(phi3) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.families import count_near_ties, hf_greedy

    llm = LLM(str(phi3), num_kv_blocks=64, max_num_batched_tokens=16)  # chunked prefill
    assert llm.engine.kv.sliding_window == 24
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    stats = llm.engine.stats()
    # 70 + 24 and 95 + 24 tokens under a 24-token window: most of their blocks were freed
    assert stats["num_window_freed_blocks"] >= 8
    assert stats["num_free_blocks"] == 64 and llm.engine.check_integrity().ok
    hf = AutoModelForCausalLM.from_pretrained(str(phi3), dtype=torch.float32).eval()
    with torch.inference_mode():
        count_near_ties(got, [hf_greedy(hf, p, 24) for p in PROMPTS])


def test_handoff_sends_no_freed_block_and_decode_equals_single(phi3) -> None:
    from tests.unit.test_disagg_engine import _drive, _engines

    single = LLM(str(phi3), num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in single.generate(PROMPTS, GREEDY)]
    prefill, decode = _engines(phi3, blocks=64)
    got = _drive(prefill, decode, PROMPTS, GREEDY)
    assert [got["r0"], got["r1"]] == want
    assert prefill.stats()["num_window_freed_blocks"] == 0  # the sink request kept its blocks
    assert decode.stats()["num_window_freed_blocks"] > 0  # freed after the verified load
