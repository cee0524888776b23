"""AsyncEngine: streaming deltas add up to LLM.generate's output; abort frees KV."""

from __future__ import annotations

import asyncio

import pytest

from splitserve import LLM, AsyncEngine, SamplingParams
from splitserve.errors import InvalidRequestError


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
    for _ in range(100):
        if not engine.engine.has_unfinished_requests():
            break
        await asyncio.sleep(0.02)
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"]


async def test_bad_request_raises_and_engine_continues(engine: AsyncEngine) -> None:
    with pytest.raises(InvalidRequestError):
        await _collect(engine, "", SamplingParams())
    deltas = await _collect(engine, [1, 2, 3], SamplingParams(temperature=0, max_tokens=2))
    assert deltas[-1].finished
