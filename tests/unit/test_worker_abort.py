"""An abort that overtakes its request still stops it.

The cluster's ``abort`` and ``submit`` are separate actor calls, a submitted request starts
on a later turn of the worker's loop, and a request with a grammar is added to the engine
only once the grammar compiled: in each window the abort used to find nothing to stop, and
the request then ran to its length (CI's ``test_abort_mid_stream_frees_both_workers`` saw
``length``). A worker built directly (loopback transport, no Ray) drives the windows in order.
"""

from __future__ import annotations

import asyncio
import threading

from splitserve import SamplingParams
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.workers import EARLY_ABORT_MAX, DecodeWorker

LONG = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)
HANG_GUARD_S = 120.0


async def _collect(stream) -> list:
    return await asyncio.wait_for(_drain(stream), HANG_GUARD_S)


async def _drain(stream) -> list:
    return [d async for d in stream]


def _free(worker: DecodeWorker) -> bool:
    s = worker.engine.engine.stats()
    return s["num_free_blocks"] == s["num_blocks"]


async def _worker(tiny_model_dir, name: str) -> DecodeWorker:
    return DecodeWorker(name, EngineConfig(model=str(tiny_model_dir), num_kv_blocks=128),
                        transport="loopback")


async def test_abort_before_submit_stops_the_request(tiny_model_dir) -> None:
    worker = await _worker(tiny_model_dir, "d-early")
    try:
        outbox = worker.open_stream("s")
        assert await anext(outbox) == []  # the stream is open
        await worker.abort("r1")  # the abort overtook the submit
        assert "r1" in worker._early_aborts
        await worker.submit("s", 7, "r1", [3, 4, 5, 6, 7], LONG)
        items: list = []
        while not any(getattr(o, "finished", False) for _, o in items):
            items += await asyncio.wait_for(anext(outbox), HANG_GUARD_S)
        outs = [o for k, o in items if k == 7]
        assert outs[-1].outputs[0].finish_reason == "abort"
        assert sum(len(o.outputs[0].token_ids) for o in outs) < LONG.max_tokens
        assert "r1" not in worker._early_aborts  # used once
        # built in this (test) process, not by the launcher: its heap is not frozen
        assert (await worker.stats())["gc_frozen_objects"] == 0
        await asyncio.wait_for(_until(lambda: _free(worker)), HANG_GUARD_S)
        # a later request with another id is not touched
        outs = await _collect(worker.generate("r2", [3, 4, 5], SamplingParams(
            temperature=0.0, max_tokens=6, ignore_eos=True)))
        assert outs[-1].outputs[0].finish_reason == "length"
        await outbox.aclose()
    finally:
        await worker.shutdown()


async def test_abort_while_the_grammar_compiles(tiny_model_dir) -> None:
    """The stream is open but its "add" waits for the grammar: the abort follows the add."""
    worker = await _worker(tiny_model_dir, "d-compile")
    structured = worker.engine.engine.structured
    real, release = structured.compile, threading.Event()
    entered = threading.Event()

    def slow_compile(params):  # holds the grammar until the abort is in
        entered.set()
        release.wait(HANG_GUARD_S)
        return real(params)

    structured.compile = slow_compile
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True,
                                structured_outputs={"regex": "[a-z ]{1,1500}"})
        task = asyncio.ensure_future(_collect(worker.generate("g1", [3, 4, 5, 6], params)))
        await asyncio.wait_for(asyncio.to_thread(entered.wait, HANG_GUARD_S), HANG_GUARD_S)
        assert worker.engine.is_open("g1")
        await worker.abort("g1")
        assert "g1" not in worker._early_aborts  # open here: the engine's to stop
        release.set()
        outs = await task
        assert outs[-1].outputs[0].finish_reason == "abort"
        assert sum(len(o.outputs[0].token_ids) for o in outs) < 1500
        await asyncio.wait_for(_until(lambda: _free(worker)), HANG_GUARD_S)
    finally:
        release.set()
        structured.compile = real
        await worker.shutdown()


async def test_unknown_aborts_are_bounded(tiny_model_dir) -> None:
    worker = await _worker(tiny_model_dir, "d-bound")
    try:
        for i in range(EARLY_ABORT_MAX + 50):
            await worker.abort(f"gone-{i}")
        assert len(worker._early_aborts) <= EARLY_ABORT_MAX
        assert f"gone-{EARLY_ABORT_MAX + 49}" in worker._early_aborts  # the newest is kept
        assert "gone-0" not in worker._early_aborts  # the oldest went first
    finally:
        await worker.shutdown()


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0.01)
