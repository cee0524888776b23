"""A failing engine step never kills the engine thread silently: open streams end with
EngineFailedError naming the cause, a single failure is survived (the next request runs and
no KV leaks), steps that keep failing make the engine unhealthy (it refuses requests and
its worker reports ``healthy: False``), and shutdown ends every open stream.

The faults are injected into the runner / scheduler (a broken step cannot be produced on
purpose otherwise). Each stream is awaited under a generous ``wait_for`` only so that the
old behaviour (a dead thread, streams hanging forever) fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from splitserve import LLM, AsyncEngine, SamplingParams
from splitserve.errors import EngineFailedError
from splitserve.roles.engine.config import EngineConfig
from tests.utils import wait_for

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
HANG_GUARD_S = 60.0


async def _tokens(engine: AsyncEngine, prompt: list[int], params=PARAMS) -> list[int]:
    async def run() -> list[int]:
        return [t async for d in engine.generate(prompt, params) for t in d.outputs[0].token_ids]

    return await asyncio.wait_for(run(), HANG_GUARD_S)


class _Faulty:
    """Wraps a method: raises for the next ``times`` calls (forever with None)."""

    def __init__(self, real, times: int | None) -> None:
        self.real, self.times, self.calls = real, times, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.times is None or self.calls <= self.times:
            raise RuntimeError("injected step fault")
        return self.real(*args, **kwargs)


@pytest.fixture
def engine(tiny_model_dir):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    yield eng
    eng.shutdown()


async def test_one_failed_step_fails_open_streams_and_the_engine_goes_on(
    engine: AsyncEngine, tiny_model_dir
) -> None:
    runner = engine.engine.runner
    await engine.call(lambda e: setattr(runner, "execute", _Faulty(runner.execute, 1)))
    gate, inside = threading.Event(), threading.Event()
    paused = asyncio.create_task(engine.call(lambda e: inside.set() or gate.wait(HANG_GUARD_S)))
    await asyncio.to_thread(inside.wait, HANG_GUARD_S)  # the engine thread waits on the gate
    streams = [asyncio.create_task(_tokens(engine, p))
               for p in (list(range(10, 40)), list(range(50, 60)))]
    await wait_for(lambda: len(engine._streams) == 2)
    gate.set()  # both requests join the next step, which fails
    await paused
    results = await asyncio.gather(*streams, return_exceptions=True)
    assert all(isinstance(r, EngineFailedError) for r in results), results
    assert "RuntimeError: injected step fault" in str(results[0])
    health = engine.health()
    assert health == {"healthy": True, "error": "", "num_step_failures": 1}
    prompt = list(range(70, 90))
    got = await _tokens(engine, prompt)
    want = LLM(str(tiny_model_dir), num_kv_blocks=64).generate([prompt], PARAMS)
    assert got == want[0].outputs[0].token_ids
    report = await engine.check_integrity()
    assert report.ok, report.problems
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"]


async def test_steps_that_keep_failing_make_the_engine_unhealthy(engine: AsyncEngine) -> None:
    scheduler = engine.engine.scheduler
    await engine.call(lambda e: setattr(scheduler, "schedule", _Faulty(scheduler.schedule, None)))
    with pytest.raises(EngineFailedError, match="injected step fault"):
        await _tokens(engine, list(range(10, 40)))
    # the recovery step failed as well: unhealthy at once, and the thread still answers
    await wait_for(lambda: not engine.healthy)
    health = engine.health()
    assert health["healthy"] is False and "keep failing" in health["error"]
    assert engine.stats()["healthy"] is False
    with pytest.raises(EngineFailedError, match="unhealthy"):
        await _tokens(engine, [1, 2, 3])
    assert await engine.call(lambda e: "still answering") == "still answering"


async def test_failures_in_a_row_with_work_make_the_engine_unhealthy(engine: AsyncEngine) -> None:
    from splitserve.roles.engine.async_engine import MAX_STEP_FAILURES

    runner = engine.engine.runner
    await engine.call(lambda e: setattr(runner, "execute", _Faulty(runner.execute, None)))
    for i in range(MAX_STEP_FAILURES):
        assert engine.healthy
        with pytest.raises(EngineFailedError, match="injected step fault"):
            await _tokens(engine, [5 + i, 6, 7, 8])
    assert not engine.healthy
    assert f"{MAX_STEP_FAILURES} engine steps failed in a row" in engine.health()["error"]
    with pytest.raises(EngineFailedError, match="unhealthy"):
        await _tokens(engine, [5, 6, 7])


async def test_shutdown_ends_every_open_stream(tiny_model_dir) -> None:
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(list(range(10, 30)), long):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), HANG_GUARD_S)
    await asyncio.to_thread(engine.shutdown)
    with pytest.raises(EngineFailedError, match="shut down"):
        await asyncio.wait_for(task, HANG_GUARD_S)


async def test_worker_reports_an_unhealthy_engine(tiny_model_dir) -> None:
    from splitserve.roles.workers import DecodeWorker

    worker = DecodeWorker("d-fail", EngineConfig(model=str(tiny_model_dir), num_kv_blocks=32),
                          transport="loopback")
    try:
        assert (await worker.health())["healthy"] is True
        scheduler = worker.engine.engine.scheduler
        await worker.engine.call(
            lambda e: setattr(scheduler, "schedule", _Faulty(scheduler.schedule, None))
        )
        with pytest.raises(EngineFailedError):
            await asyncio.wait_for(
                _drain(worker.generate("w", [3, 4, 5, 6], PARAMS)), HANG_GUARD_S
            )
        stats = await worker.stats()
        assert stats["healthy"] is False and "keep failing" in stats["error"]
        assert (await worker.health())["healthy"] is False
    finally:
        await worker.shutdown()


async def _drain(stream) -> None:
    async for _ in stream:
        pass
