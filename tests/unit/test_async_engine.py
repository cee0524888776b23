"""AsyncEngine: streaming deltas add up to LLM.generate's output; abort frees KV."""

from __future__ import annotations

import asyncio

import pytest

from splitserve import LLM, AsyncEngine, SamplingParams
from splitserve.errors import InvalidRequestError
from tests.utils import wait_for


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncEngine(model=str(tiny_model_dir), num_kv_blocks=256)
    yield eng
    eng.shutdown()


async def _collect(engine: AsyncEngine, prompt, params, rid=None):
    deltas = [d async for d in engine.generate(prompt, params, request_id=rid)]
    return deltas


async def test_stream_matches_offline(engine: AsyncEngine, tiny_model_dir) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], list(range(100, 140))]
    results = await asyncio.gather(*(_collect(engine, p, params) for p in prompts))
    offline = LLM(str(tiny_model_dir), num_kv_blocks=256).generate(prompts, params)
    for deltas, off in zip(results, offline, strict=True):
        assert [t for d in deltas for t in d.outputs[0].token_ids] == off.outputs[0].token_ids
        assert "".join(d.outputs[0].text for d in deltas) == off.outputs[0].text
        assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"
        assert not any(d.finished for d in deltas[:-1])


async def test_abort_mid_stream_frees_kv(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    count = 0
    async for _ in engine.generate(list(range(10, 60)), params, request_id="to-abort"):
        count += 1
        if count == 3:
            break  # dropping the stream aborts the request
    stats = engine.stats  # the engine thread's snapshot after its latest step
    await wait_for(lambda: stats()["num_free_blocks"] == stats()["num_blocks"])
    assert stats()["num_running"] == 0 and stats()["num_waiting"] == 0


async def test_bad_request_raises_and_engine_continues(engine: AsyncEngine) -> None:
    with pytest.raises(InvalidRequestError):
        await _collect(engine, "", SamplingParams())
    deltas = await _collect(engine, [1, 2, 3], SamplingParams(temperature=0, max_tokens=2))
    assert deltas[-1].finished


async def test_stats_are_taken_on_the_engine_thread(engine: AsyncEngine) -> None:
    """Callers on other threads read a snapshot; the scheduler is read by its own thread."""
    import threading

    callers: set[int] = set()
    real = engine.engine.stats

    def recording() -> dict:
        callers.add(threading.get_ident())
        return real()

    engine.engine.stats = recording
    try:
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        seen = []
        async for _ in engine.generate(list(range(3, 40)), params):
            seen.append(engine.stats()["num_running"])  # from the event loop's thread
        assert callers == {engine._thread.ident}
        assert 1 in seen  # the snapshots followed the request
    finally:
        del engine.engine.stats


async def test_engine_is_built_and_stepped_on_its_own_thread(tiny_model_dir, monkeypatch) -> None:
    """One thread runs every torch op: with OpenMP a second thread that ran one parallel op
    keeps a second team of idle threads, and libgomp's barriers then stop spinning."""
    import threading

    from splitserve.roles.engine import async_engine

    built_on: list[int] = []
    stepped_on: set[int] = set()

    class Recording(async_engine.LLMEngine):
        def __init__(self, *args, **kwargs) -> None:
            built_on.append(threading.get_ident())
            super().__init__(*args, **kwargs)

        def step(self):
            stepped_on.add(threading.get_ident())
            return super().step()

    monkeypatch.setattr(async_engine, "LLMEngine", Recording)
    started_on: list[int] = []
    eng = AsyncEngine(model=str(tiny_model_dir), num_kv_blocks=64,
                      on_start=lambda e: started_on.append(threading.get_ident()))
    try:
        deltas = await _collect(eng, [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
        assert deltas[-1].finished
        assert built_on == started_on == [eng._thread.ident]
        assert stepped_on == {eng._thread.ident}
        assert eng._thread.ident != threading.get_ident()
    finally:
        eng.shutdown()


def test_a_failed_build_raises_in_the_caller_and_leaves_no_thread(tmp_path) -> None:
    import threading

    from splitserve.roles.engine.config import EngineConfig
    from splitserve.roles.engine.llm_engine import LLMEngine

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(Exception) as direct:
        LLMEngine(EngineConfig(model=missing))
    before = {t.ident for t in threading.enumerate() if t.name == "splitserve-engine"}
    with pytest.raises(type(direct.value)) as through:
        AsyncEngine(model=missing)
    assert str(through.value) == str(direct.value)
    after = {t.ident for t in threading.enumerate() if t.name == "splitserve-engine"}
    assert after <= before


def test_freeze_heap_only_when_asked_and_not_when_switched_off(tiny_model_dir) -> None:
    """``freeze_heap=True`` freezes the process's heap once the engine is built (its stats
    say how many objects, counted once: ``gc.get_freeze_count()`` walks every frozen object,
    ~20 ms holding the GIL, too slow for each heartbeat), the engine still serves afterwards; without it, or with
    SPLITSERVE_GC_FREEZE=0, nothing is frozen. In a child process: freezing is for the
    process's life, which this test process must not take on."""
    import json
    import subprocess
    import sys

    code = f"""
import gc, json, os
from splitserve import AsyncEngine, SamplingParams
out = {{}}
kw = dict(model={str(tiny_model_dir)!r}, num_kv_blocks=64)
e = AsyncEngine(**kw); out["default"] = e.stats()["gc_frozen_objects"]; e.shutdown()
os.environ["SPLITSERVE_GC_FREEZE"] = "0"
e = AsyncEngine(freeze_heap=True, **kw); out["off"] = gc.get_freeze_count(); e.shutdown()
del os.environ["SPLITSERVE_GC_FREEZE"]
e = AsyncEngine(freeze_heap=True, **kw)
out["frozen"], out["stats"] = gc.get_freeze_count(), e.stats()["gc_frozen_objects"]
def walked():
    raise AssertionError("stats() walked the frozen generation")
real, gc.get_freeze_count = gc.get_freeze_count, walked  # stats() must use the count it took
out["stats_again"] = e.stats()["gc_frozen_objects"]
gc.get_freeze_count = real
import asyncio
async def one():
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    return [t for d in [d async for d in e.generate([5, 6, 7], p)] for t in d.outputs[0].token_ids]
out["tokens"] = len(asyncio.run(one()))
e.shutdown()
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["default"] == 0 and out["off"] == 0
    # the count at the freeze: frozen objects freed by reference counting since left it
    assert out["stats"] == out["stats_again"] >= out["frozen"] > 10_000
    assert out["stats"] - out["frozen"] < 1_000
    assert out["tokens"] == 4


def test_llm_freezes_the_heap_only_while_it_steps(tiny_model_dir) -> None:
    """``LLM.generate`` steps its engine with the heap as it was frozen (``gc.freeze()``: the
    collector's full passes skip the model's objects) and unfreezes it when done, so a
    process that builds engine after engine keeps nothing frozen; a heap the process froze
    itself stays frozen (not undone), and SPLITSERVE_GC_FREEZE=0 freezes nothing. In a child
    process: the frozen generation is the process's."""
    import json
    import subprocess
    import sys

    code = f"""
import gc, json, os
from splitserve import LLM, SamplingParams
llm = LLM(model={str(tiny_model_dir)!r}, num_kv_blocks=64)
seen = []
real_step = llm.engine.step
def step():
    seen.append(gc.get_freeze_count())
    return real_step()
llm.engine.step = step
p = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
out = {{}}
out["tokens"] = len(llm.generate([[5, 6, 7]], p)[0].outputs[0].token_ids)
out["during"], out["after"] = seen[:-1], gc.get_freeze_count()
seen.clear()
os.environ["SPLITSERVE_GC_FREEZE"] = "0"
llm.generate([[5, 6, 7]], p); out["off"] = seen[:-1]
del os.environ["SPLITSERVE_GC_FREEZE"]
gc.freeze(); mine = gc.get_freeze_count(); seen.clear()
llm.generate([[5, 6, 7]], p); out["own"], out["own_after"], out["mine"] = seen[:-1], gc.get_freeze_count(), mine
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["tokens"] == 3 and len(out["during"]) >= 3
    assert all(n > 10_000 for n in out["during"]), out["during"]  # the model's objects
    assert out["after"] == 0
    assert out["off"] and all(n == 0 for n in out["off"])
    # the process's own freeze: left as it was, neither unfrozen nor frozen again (frozen
    # objects freed by reference counting leave the count: a few)
    assert out["own"] and all(abs(n - out["mine"]) < 100 for n in out["own"]), out
    assert abs(out["own_after"] - out["mine"]) < 100, out
