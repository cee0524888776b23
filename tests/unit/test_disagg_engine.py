"""Prefill and decode roles of the engine, in one process over the loopback transport.

The prefill engine stops after the first token and leases its prompt blocks; the decode
engine pulls them (only what it does not have cached), continues, and the tokens equal the
single engine's. Both block pools end full.
"""

from __future__ import annotations

import random

import pytest

from splitserve import LLM, SamplingParams
from splitserve.kvtransfer.loopback import LoopbackTransport
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _engines(model_dir, blocks: int = 256) -> tuple[LLMEngine, LLMEngine]:
    prefill = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=blocks))
    decode = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=blocks))
    prefill.attach_kv_connector(LoopbackTransport(), "prefill-0", lease_ttl_s=5.0)
    decode.attach_kv_connector(LoopbackTransport(), "decode-0", lease_ttl_s=5.0)
    return prefill, decode


def _drive(prefill: LLMEngine, decode: LLMEngine, prompts, params) -> dict[str, list[int]]:
    handoff: dict[str, tuple[dict, list[int]]] = {}
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", p, params, kv_transfer_params={"do_remote_decode": True})
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            assert out.finished and out.kv_transfer_params is not None
            handoff[out.request_id] = (out.kv_transfer_params, out.outputs[0].token_ids)
    tokens = {rid: list(first) for rid, (_, first) in handoff.items()}
    for i, p in enumerate(prompts):
        kv_params, first = handoff[f"r{i}"]
        decode.add_request(f"r{i}", p, params, kv_transfer_params=kv_params,
                           resume_token_ids=first)
    for _ in range(10_000):
        if not (decode.has_unfinished_requests() or prefill.has_pending_transfers()
                or decode.has_pending_transfers()):
            break
        for out in decode.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        prefill.step()  # serves lease control (release) and expiry
    for engine in (prefill, decode):
        report = engine.check_integrity()
        assert report.ok, report.problems
    return tokens


@pytest.fixture(scope="module")
def single(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=256)


def test_prefill_decode_equals_single_engine(tiny_model_dir, single: LLM) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49000) for _ in range(rng.randint(5, 90))] for _ in range(8)]
    prefill, decode = _engines(tiny_model_dir)
    got = _drive(prefill, decode, prompts, PARAMS)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, PARAMS)]
    assert [got[f"r{i}"] for i in range(len(prompts))] == want
    assert prefill.kv.pool.num_free_blocks == prefill.num_blocks
    assert decode.kv.pool.num_free_blocks == decode.num_blocks
    assert decode.stats()["num_remote_fallbacks"] == 0


def test_decode_reuses_its_prefix_cache(tiny_model_dir, single: LLM) -> None:
    prefix = list(range(500, 564))  # 4 full blocks
    prefill, decode = _engines(tiny_model_dir)
    _drive(prefill, decode, [prefix + [1, 2, 3]], PARAMS)
    got = _drive(prefill, decode, [prefix + [7, 8]], PARAMS)
    hits = decode.stats()["prefix_cache_hits"]
    assert hits >= 64  # the second request pulled only its last block
    assert got["r0"] == single.generate([prefix + [7, 8]], PARAMS)[0].outputs[0].token_ids


def test_seeded_sampling_survives_handoff(tiny_model_dir, single: LLM) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    prompt = list(range(1000, 1040))
    prefill, decode = _engines(tiny_model_dir)
    got = _drive(prefill, decode, [prompt], params)
    assert got["r0"] == single.generate([prompt], params)[0].outputs[0].token_ids


def test_corrupted_kv_is_never_decoded(tiny_model_dir, single: LLM) -> None:
    """Every read corrupted: two checksum failures, then the decode role recomputes locally."""
    from splitserve.kvtransfer.transport import FaultInjector

    prefill = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=128))
    decode = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=128))
    fault = FaultInjector(corrupt_sends=100)
    prefill.attach_kv_connector(LoopbackTransport(fault=fault), "p-bad", lease_ttl_s=5.0)
    decode.attach_kv_connector(LoopbackTransport(), "d-bad", lease_ttl_s=5.0)
    prompt = list(range(2000, 2050))
    got = _drive(prefill, decode, [prompt], PARAMS)
    assert got["r0"] == single.generate([prompt], PARAMS)[0].outputs[0].token_ids
    assert decode.stats()["num_remote_fallbacks"] == 1
    assert prefill.kv.pool.num_free_blocks == prefill.num_blocks
    assert decode.kv.pool.num_free_blocks == decode.num_blocks


def test_abort_while_loading_frees_both_sides(tiny_model_dir) -> None:
    prefill, decode = _engines(tiny_model_dir, blocks=64)
    prefill.add_request("a", list(range(100, 150)), PARAMS,
                        kv_transfer_params={"do_remote_decode": True})
    outs = []
    while prefill.has_unfinished_requests():
        outs += prefill.step()
    decode.add_request("a", list(range(100, 150)), PARAMS,
                       kv_transfer_params=outs[0].kv_transfer_params,
                       resume_token_ids=outs[0].outputs[0].token_ids)
    decode.abort_request("a")
    final = decode.step()
    assert final and final[0].outputs[0].finish_reason == "abort"
    for _ in range(200):
        prefill.step()
        decode.step()
        if prefill.kv.pool.num_free_blocks == prefill.num_blocks:
            break
    assert prefill.kv.pool.num_free_blocks == prefill.num_blocks
    assert decode.kv.pool.num_free_blocks == decode.num_blocks
    assert not decode.has_unfinished_requests()


def test_hand_off_is_its_own_state_not_a_finish(tiny_model_dir) -> None:
    """The KV source hands the request off (HANDED_OFF, no finish reason); it did not end by
    length, and its blocks stay held for the remote KV sink."""
    from splitserve.request import RequestStatus

    prefill, _ = _engines(tiny_model_dir, blocks=64)
    prefill.add_request("h", list(range(300, 340)), PARAMS,
                        kv_transfer_params={"do_remote_decode": True})
    outs = []
    while prefill.has_unfinished_requests():
        outs += prefill.step()
    assert len(outs) == 1 and outs[0].kv_transfer_params is not None
    assert outs[0].outputs[0].finish_reason is None
    held = prefill.scheduler.connector.held["h"]
    assert held.remote_kv_sink and held.remote_kv_source is None
    assert held.status == RequestStatus.HANDED_OFF and held.is_finished
    assert held.status.finish_reason is None
    assert prefill.kv.pool.num_free_blocks < prefill.num_blocks  # held for the pull


def test_lease_of_a_request_queued_for_blocks_is_kept_alive(tiny_model_dir) -> None:
    """A KV sink request that waits for blocks is the connector's from arrival: its lease on
    the KV source is renewed by heartbeats while it queues, and it runs once blocks free."""
    prefill = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    prefill.attach_kv_connector(LoopbackTransport(), "prefill-q", lease_ttl_s=5.0)
    decode_small = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=8))
    decode_small.attach_kv_connector(LoopbackTransport(), "decode-small", lease_ttl_s=5.0)
    prompt = list(range(600, 640))
    prefill.add_request("b", prompt, PARAMS, kv_transfer_params={"do_remote_decode": True})
    outs = []
    while prefill.has_unfinished_requests():
        outs += prefill.step()
    decode_small.add_request("busy", list(range(700, 810)), PARAMS)  # 7 of its 8 blocks
    decode_small.step()
    decode_small.add_request("b", prompt, PARAMS, kv_transfer_params=outs[0].kv_transfer_params,
                             resume_token_ids=outs[0].outputs[0].token_ids)
    deadline = prefill.kv_worker.leases.get("b").expires_at
    decode_small.step()
    assert decode_small.scheduler.num_waiting == 1  # no blocks for "b" yet
    assert decode_small.stats()["num_loading_kv"] == 0
    assert prefill.kv_worker.leases.get("b").expires_at > deadline  # a heartbeat renewed it
    tokens: list[int] = []
    for _ in range(500):
        if not (decode_small.has_unfinished_requests() or prefill.has_pending_transfers()):
            break
        for out in decode_small.step():
            if out.request_id == "b":
                tokens += out.outputs[0].token_ids
        prefill.step()
    assert len(tokens) == PARAMS.max_tokens - 1
    assert decode_small.stats()["num_remote_fallbacks"] == 0
    for engine in (prefill, decode_small):
        assert engine.check_integrity().ok
        assert engine.kv.pool.num_free_blocks == engine.num_blocks
