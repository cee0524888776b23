"""Queued-request withdrawal (the cluster's migration off hotspots) and per-stage timestamps."""

from __future__ import annotations

from splitserve import SamplingParams
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _drain(engine: LLMEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def test_withdraw_only_untouched_queued_requests(tiny_model_dir) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, max_num_seqs=1))
    free = engine.kv.pool.num_free_blocks
    engine.add_request("a", list(range(10, 40)), PARAMS)
    engine.add_request("b", list(range(50, 80)), PARAMS)
    engine.step()  # "a" runs; "b" waits (one sequence at a time)
    assert not engine.withdraw_request("a")  # started: stays
    assert not engine.withdraw_request("nope")
    assert engine.withdraw_request("b")
    outs = _drain(engine)
    assert outs["b"][-1].outputs[0].finish_reason == "abort" and outs["b"][-1].finished
    assert len(sum((o.outputs[0].token_ids for o in outs["a"]), [])) == 3  # 1 before drain
    assert engine.kv.pool.num_free_blocks == free
    # a withdrawn id is free again: the request can be re-added (as migration does elsewhere)
    engine.add_request("b", list(range(50, 80)), PARAMS)
    assert _drain(engine)["b"][-1].outputs[0].finish_reason == "length"


def test_outputs_carry_stage_timestamps(tiny_model_dir) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    engine.add_request("r", list(range(10, 40)), PARAMS)
    last = _drain(engine)["r"][-1]
    m = last.metrics
    assert m["arrival_time"] <= m["first_scheduled_time"] <= m["first_token_time"]
    assert m["first_token_time"] <= m["finished_time"]
    assert "kv_load_start_time" not in m  # no remote KV on a colocated engine


def test_kv_transfer_counters_in_stats(tiny_model_dir) -> None:
    from tests.unit.test_disagg_engine import _drive, _engines

    prefill, decode = _engines(tiny_model_dir, blocks=64)
    prompts = [list(range(10, 10 + n)) for n in (20, 40, 70)]
    _drive(prefill, decode, prompts, PARAMS)
    stats = decode.stats()
    layout = decode.kv_worker.layout
    blocks = sum(-(-len(p) // decode.config.block_size) for p in prompts)
    assert stats["kv_transfers"] == 3 and stats["kv_transfer_failures"] == 0
    assert stats["kv_transfer_bytes"] == layout.staging_nbytes(layout.num_layers, blocks)
    assert stats["kv_transfer_seconds"] > 0
    assert prefill.stats()["kv_transfers"] == 0  # pulls are counted by the reader
