"""check_integrity(): intact state passes at every step boundary; deliberately broken block
pools, KV managers, schedulers and lease managers are caught, with leaked blocks and
stranded leases counted; the engine's idle check (SPLITSERVE_CHECK_INTEGRITY=1) catches
corruption by itself; workers answer it."""

from __future__ import annotations

import pytest

from splitserve import AsyncEngine, SamplingParams
from splitserve.integrity import IntegrityError, IntegrityReport
from splitserve.kvtransfer.lease import LeaseManager
from splitserve.kvtransfer.loopback import LoopbackTransport
from splitserve.roles.engine.block_pool import BlockPool
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.kv_cache_manager import KVCacheManager
from splitserve.roles.engine.llm_engine import LLMEngine
from splitserve.roles.engine.request import Request
from tests.utils import wait_for

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), seed=0, max_tokens=8, block_size=4)


def _kv_with_two_requests() -> tuple[KVCacheManager, Request, Request]:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = _req("a", list(range(10))), _req("b", list(range(8)) + [50, 51])
    kv.allocate_slots(a, 10)
    hits, _ = kv.get_computed_blocks(b)
    kv.allocate_slots(b, 2, hits)  # shares a's two full blocks
    return kv, a, b


# --------------------------------------------------------------------------- block pool / KV


def test_intact_kv_manager_passes_through_alloc_share_free() -> None:
    kv, a, b = _kv_with_two_requests()
    assert kv.pool.blocks[0].ref_cnt == 2
    report = kv.check_integrity({"a", "b"})
    assert report.ok, report.problems
    kv.free(a)
    assert kv.check_integrity({"b"}).ok
    kv.free(b)
    report = kv.check_integrity(set())
    assert report.ok and report.leaked_blocks == 0
    assert kv.pool.check_integrity({}).ok  # nothing referenced, cached blocks on the free list


def test_block_taken_without_an_owner_is_a_leak() -> None:
    kv, _, _ = _kv_with_two_requests()
    kv.pool.get_new_blocks(2)  # referenced, but no request lists them
    report = kv.check_integrity({"a", "b"})
    assert report.leaked_blocks == 2
    assert any("requests hold it 0 times" in p for p in report.problems)
    with pytest.raises(IntegrityError, match="2 leaked blocks"):
        report.raise_if_bad()


def test_gone_request_holding_blocks_is_a_leak() -> None:
    kv, _, b = _kv_with_two_requests()
    report = kv.check_integrity({"b"})  # "a" left the engine without being freed
    assert any("'a' is gone but holds 3 blocks" in p for p in report.problems)
    assert report.leaked_blocks == 1  # its last block; the two shared ones b still holds


def test_referenced_block_on_the_free_list_is_caught() -> None:
    pool = BlockPool(4)
    (blk,) = pool.get_new_blocks(1)
    pool._free[blk.block_id] = blk  # a free that forgot the reference count
    report = pool.check_integrity({blk.block_id: 1})
    assert report.problems == [f"block {blk.block_id} is on the free list with ref_cnt 1"]


def test_unreferenced_block_missing_from_free_list_is_caught() -> None:
    pool = BlockPool(4)
    (blk,) = pool.get_new_blocks(1)
    blk.ref_cnt = 0  # dropped without rejoining the free list: lost for good
    report = pool.check_integrity({})
    assert report.problems == [f"block {blk.block_id} is unreferenced but not on the free list"]


def test_inconsistent_hash_map_is_caught() -> None:
    kv, a, _ = _kv_with_two_requests()
    first, second = kv.pool.blocks[0], kv.pool.blocks[1]
    first.block_hash, second.block_hash = second.block_hash, first.block_hash
    report = kv.check_integrity({"a", "b"})
    assert sum("hash map entry" in p for p in report.problems) == 2
    kv.pool.blocks[0].block_hash = None  # the map still points at block 0
    assert any("points at block 0, whose hash is None" in p
               for p in kv.check_integrity({"a", "b"}).problems)


def test_ref_count_differs_from_block_lists() -> None:
    kv, a, _ = _kv_with_two_requests()
    kv.req_to_blocks["a"].append(kv.req_to_blocks["a"][0])  # listed twice, counted once
    report = kv.check_integrity({"a", "b"})
    assert any("holds a block twice" in p for p in report.problems)
    assert any("block 0: ref_cnt 2, but requests hold it 3 times" in p for p in report.problems)


# --------------------------------------------------------------------------- leases


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lease_without_a_live_request_is_stranded() -> None:
    leases = LeaseManager(default_ttl_s=5.0, clock=_Clock())
    leases.grant("r1", [1, 2])
    assert leases.check_integrity({"r1"}).ok
    report = leases.check_integrity(set())
    assert report.stranded_leases == 1 and "no live request" in report.problems[0]


def test_lease_long_past_its_deadline_is_stranded_until_polled() -> None:
    clock = _Clock()
    leases = LeaseManager(default_ttl_s=5.0, clock=clock)
    leases.grant("r1", [1])
    clock.now += 8.0  # expired, within one ttl of grace: poll has not had its turn yet
    assert leases.check_integrity({"r1"}).ok
    clock.now += 5.0  # a whole ttl past its deadline and nobody finalized it
    report = leases.check_integrity({"r1"})
    assert report.stranded_leases == 1 and "not finalized" in report.problems[0]
    leases.poll()
    assert leases.check_integrity({"r1"}).ok and leases.num_leases == 0


# --------------------------------------------------------------------------- engine


def _step_checked(engine: LLMEngine, max_steps: int = 500) -> list:
    """Step to completion, checking integrity between every two steps."""
    outs = []
    for _ in range(max_steps):
        if not (engine.has_unfinished_requests() or engine.has_pending_transfers()):
            break
        outs += engine.step()
        report = engine.check_integrity()
        assert report.ok, report.problems
    return outs


def test_engine_stays_intact_through_preemption_and_abort(tiny_model_dir) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=12, block_size=16))
    for i in range(4):  # 4 x (40 + 30) tokens do not fit 12 x 16: preemption by recompute
        engine.add_request(f"r{i}", list(range(100 + i, 140 + i)),
                           SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    engine.add_request("gone", list(range(7, 30)), PARAMS)
    engine.step()
    engine.abort_request("gone")
    assert engine.check_integrity().ok
    _step_checked(engine)
    assert engine.scheduler.num_preemptions > 0
    assert engine.check_integrity().ok and engine.kv.pool.num_free_blocks == engine.num_blocks


def test_engine_catches_a_request_lost_by_the_scheduler(tiny_model_dir) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=32))
    engine.add_request("x", list(range(40, 80)), PARAMS)
    engine.step()
    req = engine.scheduler.requests.pop("x")  # dropped without finish(): blocks never freed
    engine.scheduler.running.remove(req)
    report = engine.check_integrity()
    assert report.leaked_blocks == engine.kv.blocks_for(req.num_computed_tokens)
    assert any("'x' is gone but holds" in p for p in report.problems)
    assert any("tracked by only one of engine and scheduler" in p for p in report.problems)


def _pd_engines(model_dir) -> tuple[LLMEngine, LLMEngine]:
    prefill = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64))
    decode = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64))
    prefill.attach_kv_connector(LoopbackTransport(), "prefill-i", lease_ttl_s=5.0)
    decode.attach_kv_connector(LoopbackTransport(), "decode-i", lease_ttl_s=5.0)
    return prefill, decode


def test_handoff_and_pull_stay_intact_on_both_sides(tiny_model_dir) -> None:
    prefill, decode = _pd_engines(tiny_model_dir)
    prefill.add_request("p", list(range(200, 250)), PARAMS,
                        kv_transfer_params={"do_remote_decode": True})
    (out,) = _step_checked(prefill)
    assert prefill.scheduler.connector.held and prefill.kv_worker.leases.num_leases == 1
    decode.add_request("p", list(range(200, 250)), PARAMS, kv_transfer_params=out.kv_transfer_params,
                       resume_token_ids=out.outputs[0].token_ids)
    for _ in range(500):
        if not (decode.has_unfinished_requests() or prefill.has_pending_transfers()):
            break
        decode.step()
        prefill.step()
        for engine in (prefill, decode):
            report = engine.check_integrity()
            assert report.ok, report.problems
    assert prefill.kv.pool.num_free_blocks == prefill.num_blocks


def test_lease_whose_request_was_dropped_is_stranded(tiny_model_dir) -> None:
    prefill, _ = _pd_engines(tiny_model_dir)
    prefill.add_request("p", list(range(300, 340)), PARAMS,
                        kv_transfer_params={"do_remote_decode": True})
    _step_checked(prefill)
    held = prefill.scheduler.connector.release("p")  # forgets a hold whose lease is live
    prefill.kv.free(held)  # ...and frees blocks a reader may still be gathering
    report = prefill.check_integrity()
    assert report.stranded_leases == 1
    assert any("no live request" in p for p in report.problems)


def test_failed_offer_releases_the_hold_everywhere(tiny_model_dir, monkeypatch) -> None:
    """An offer that raises frees the blocks and the connector forgets the hold too (it
    used to keep the request id in its held set forever)."""
    prefill, _ = _pd_engines(tiny_model_dir)

    def refuse(*args, **kwargs):
        raise RuntimeError("offer failed (injected)")

    monkeypatch.setattr(prefill.kv_worker, "offer", refuse)
    prefill.add_request("p", list(range(300, 340)), PARAMS,
                        kv_transfer_params={"do_remote_decode": True})
    (out,) = _step_checked(prefill)
    assert out.outputs[0].finish_reason == "error"
    assert prefill.scheduler.connector.num_held == 0
    assert prefill.check_integrity().ok


# --------------------------------------------------------------------------- async engine / worker


async def test_idle_check_catches_a_broken_pool(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CHECK_INTEGRITY", "1")
    engine = AsyncEngine(model=str(tiny_model_dir), num_kv_blocks=64)
    try:
        _ = [d async for d in engine.generate([5, 6, 7, 8, 9], PARAMS)]
        await wait_for(lambda: engine.num_integrity_checks >= 1)
        assert engine.num_integrity_failures == 0 and engine.last_integrity_report.ok

        def corrupt(eng: LLMEngine) -> None:
            eng.kv.pool.get_new_blocks(1)  # a block taken and never given to a request

        await engine.call(corrupt)
        _ = [d async for d in engine.generate([9, 8, 7, 6], PARAMS)]
        await wait_for(lambda: engine.num_integrity_checks >= 2)
        assert engine.num_integrity_failures == 1
        assert engine.last_integrity_report.leaked_blocks == 1
        assert engine.stats()["num_integrity_failures"] == 1
        report = await engine.check_integrity()
        assert report.leaked_blocks == 1
    finally:
        engine.shutdown()


async def test_worker_answers_check_integrity(tiny_model_dir) -> None:
    from splitserve.roles.workers import DecodeWorker

    worker = DecodeWorker("d-int", EngineConfig(model=str(tiny_model_dir), num_kv_blocks=32),
                          transport="loopback")
    try:
        out = [d async for d in worker.generate("w", [3, 4, 5, 6], PARAMS)]
        assert out[-1].finished
        report = await worker.check_integrity()
        assert report == IntegrityReport().to_dict() and report["ok"]
    finally:
        await worker.shutdown()
