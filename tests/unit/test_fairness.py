"""Fairness counts sequences, not requests: the ``n`` samples of a request form a group, a
waiting group below its share of ``max_num_seqs`` takes slots from a group above it (its
newest sequences are preempted and recomputed later), KV-pressure preemption hits the
biggest group first, and ``n`` above ``max_n`` is refused naming ``n``. On the tiny model a
short request's latency beside an n=128 request stays within 3x of its idle latency
(measured as a ratio in one run)."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from splitserve import AsyncEngine, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.roles.engine.config import EngineConfig, SchedulerConfig
from splitserve.roles.engine.kv_cache_manager import KVCacheManager
from splitserve.roles.engine.llm_engine import LLMEngine
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.scheduler import Scheduler
from tests.utils import wait_for

# --------------------------------------------------------------------------- scheduler


def _seq(rid: str, group: str, n_tokens: int = 6) -> Request:
    return Request(rid, list(range(1, n_tokens + 1)), SamplingParams(), seed=0, max_tokens=50,
                   block_size=4, group_id=group)


def _step(sched: Scheduler) -> list[str]:
    """Schedule one step and pretend the model ran it; the ids scheduled."""
    out = sched.schedule()
    sched.update(out, {s.request_id: 7 for s in out.scheduled})
    return [s.request_id for s in out.scheduled]


def _scheduler(max_num_seqs: int, num_blocks: int = 256) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size=4)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs), kv, max_model_len=1024)


def test_a_new_group_gets_a_slot_at_once_from_a_group_above_its_share() -> None:
    sched = _scheduler(max_num_seqs=4)
    for i in range(10):
        sched.add_request(_seq(f"big{i}", "big"))
    assert _step(sched) == ["big0", "big1", "big2", "big3"]  # alone, it takes every slot
    _step(sched)
    sched.add_request(_seq("short", "short"))
    out = sched.schedule()
    assert out.preempted == ["big3"]  # the big group's newest sequence gives its slot up
    assert [s.request_id for s in out.scheduled] == ["big0", "big1", "big2", "short"]
    assert sched.num_fair_preemptions == 1
    sched.update(out, {s.request_id: 7 for s in out.scheduled})
    assert sched.check_integrity().ok
    # next steps: no ping-pong; the short request keeps its slot until it finishes
    for _ in range(3):
        assert "short" in _step(sched)
    assert sched.num_fair_preemptions == 1


def test_waiting_groups_are_admitted_least_served_first() -> None:
    sched = _scheduler(max_num_seqs=8)
    for i in range(6):
        sched.add_request(_seq(f"a{i}", "a"))
    sched.add_request(_seq("b0", "b"))
    sched.add_request(_seq("c0", "c"))
    # FIFO would admit a0..a5 then b0, c0; fair admission interleaves the groups
    assert _step(sched) == ["a0", "b0", "c0", "a1", "a2", "a3", "a4", "a5"]


def test_single_requests_stay_first_come_first_served() -> None:
    sched = _scheduler(max_num_seqs=3)
    for i in range(5):
        sched.add_request(_seq(f"r{i}", f"r{i}"))
    assert _step(sched) == ["r0", "r1", "r2"]
    assert sched.num_fair_preemptions == 0


def test_kv_pressure_preempts_the_biggest_group_first() -> None:
    """Not simply the newest sequence (which would be the lone request admitted last)."""
    sched = _scheduler(max_num_seqs=8, num_blocks=6)

    def add(i: int, group: str) -> None:
        sched.add_request(Request(f"{group}{i}", list(range(10 * i + 1, 10 * i + 8)),
                                  SamplingParams(), seed=0, max_tokens=50, block_size=4,
                                  group_id=group))

    add(0, "g"), add(1, "g")
    assert _step(sched) == ["g0", "g1"]  # 7 prompt tokens: 2 blocks each
    add(2, "solo")
    assert _step(sched) == ["g0", "g1", "solo2"]  # 6 blocks in use; g's 8th token fits
    out = sched.schedule()  # g's 9th token needs a third block: the pool is dry
    assert out.preempted == ["g1"]  # the newest sequence (solo2) would starve the lone request
    assert [s.request_id for s in out.scheduled] == ["g0", "solo2"]


# --------------------------------------------------------------------------- n cap


def test_n_above_the_cap_is_refused_naming_n(tiny_model_dir) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    assert engine.config.max_n == 16
    with pytest.raises(InvalidRequestError, match=r"n=17 .* limit of 16") as err:
        engine.add_request("r", [1, 2, 3], SamplingParams(n=17))
    assert err.value.field == "n"
    assert not engine.has_unfinished_requests()
    engine.add_request("ok", [1, 2, 3], SamplingParams(n=16, max_tokens=1))
    raised = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, max_n=32))
    raised.add_request("r", [1, 2, 3], SamplingParams(n=32, max_tokens=1))


def test_max_n_must_be_positive() -> None:
    from splitserve.errors import ConfigError

    with pytest.raises(ConfigError, match="max_n"):
        EngineConfig(max_n=0)


# --------------------------------------------------------------------------- latency ratio


async def _latency(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(prompt, params):
        pass
    return time.perf_counter() - start


async def test_short_request_beside_n128_stays_within_3x_of_idle(tiny_model_dir) -> None:
    """Idle and loaded latencies of the same short request, medians of 7, in one run (a
    run takes ~15 ms idle: single samples swing widely with the machine's noise).

    Four slots: the ratio should measure the wait for a slot (without fairness: behind 120
    samples of 128 tokens), not how a step's cost grows with the batch on this CPU; with 8
    slots the tiny model's 8-sequence steps alone made it 2.2-3.3x here (a rehearsal failed
    at 3.28x, on code before and after this session's changes)."""
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=512,
                                      max_num_seqs=4, max_n=128))
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    big = SamplingParams(n=128, temperature=0.8, seed=3, max_tokens=128, ignore_eos=True)
    prompt = list(range(40, 60))
    try:
        await _latency(engine, prompt, short)  # warm-up
        idle = statistics.median([await _latency(engine, prompt, short) for _ in range(7)])
        got_tokens = asyncio.Event()

        async def run_big() -> None:
            async for _ in engine.generate(list(range(100, 120)), big, request_id="big"):
                got_tokens.set()

        task = asyncio.create_task(run_big())
        await asyncio.wait_for(got_tokens.wait(), 60)
        await wait_for(lambda: engine.engine.scheduler.num_running == 4)  # every slot is big's
        # a guard against the old behaviour (queued behind 120 samples): fail, not hang
        loaded = statistics.median([
            await asyncio.wait_for(_latency(engine, prompt, short), 50 * idle + 30)
            for _ in range(7)
        ])
        assert not task.done()  # the big request ran all along
        assert engine.stats()["num_fair_preemptions"] >= 1  # a slot was taken from big
        task.cancel()
        print(f"short request: idle {idle:.3f}s, beside n=128 {loaded:.3f}s, "
              f"ratio {loaded / idle:.2f}")
        assert loaded / idle <= 3.0
    finally:
        engine.shutdown()
