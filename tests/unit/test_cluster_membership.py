"""Membership leftovers: a replaced worker's handle leaves the set, draining waits for a slow
worker instead of taking it for dead, and the ``n`` samples of a request reach the workers
as one fairness group while an abort still touches exactly that request's samples.

Real Membership, Scaler, RequestPath, FlightTable, Router and in-memory Registry; the
worker actors are stand-ins (no Ray here) because the faults are injected: a stats call
that does not answer in time, a replacement that is started by a recording launcher.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.flights import FlightTable
from splitserve.cluster.inputs import PreparedInput
from splitserve.cluster.launcher import WorkerHandle
from splitserve.cluster.membership import Membership
from splitserve.cluster.registry import create_registry
from splitserve.cluster.request_path import RequestPath
from splitserve.cluster.scaling import Scaler
from splitserve.outputs import CompletionOutput, RequestOutput
from splitserve.roles.workers import _Outbox
from splitserve.router.router import Router
from splitserve.router.schema import RouterConfig
from splitserve.sampling_params import SamplingParams

IDLE = {"num_running": 0, "num_waiting": 0, "num_held_kv": 0, "num_loading_kv": 0}


async def _value(v: Any) -> Any:
    return v


class _Worker:
    """Answers like a worker actor. ``stats`` replies are scripted: ``"hang"`` never answers
    (until the caller's timeout), a dict is returned. A submitted request streams one token
    on the caller's output stream, then waits until it is aborted and ends it with 'abort'.
    The output stream is the real worker's (`_Outbox`); ``death`` set, the stream raises it
    after the items already there (the worker process died)."""

    def __init__(self, stats: list[Any] | None = None) -> None:
        self.script = list(stats or [])
        self.stats_replies: list[Any] = []
        self.calls: list[tuple[str, str | None]] = []
        self.aborted: list[str] = []
        self.death: BaseException | None = None
        self._abort_events: dict[str, asyncio.Event] = {}
        self._outboxes: dict[str, _Outbox] = {}
        self.stats = SimpleNamespace(remote=self._stats)
        self.open_stream = SimpleNamespace(remote=self._open_stream)
        self.submit = SimpleNamespace(remote=self._submit)
        self.abort = SimpleNamespace(remote=self._abort)

    def _stats(self) -> Any:
        reply = self.script.pop(0) if self.script else IDLE
        self.stats_replies.append(reply)
        if reply == "hang":
            return asyncio.Event().wait()  # never set: the caller's timeout ends it
        return _value(dict(reply))

    def _open_stream(self, stream_id: str) -> AsyncIterator[Any]:
        outbox = self._outboxes[stream_id] = _Outbox()

        async def items() -> AsyncIterator[Any]:
            yield _value([])
            while True:
                batch = await outbox.take()
                yield _value(batch)
                if self.death is not None:
                    raise self.death

        return items()

    def _submit(self, stream_id: str, key: int, request_id: str, prompt: list[int],
                params: SamplingParams, kv: Any, resume: list[int], mm: Any,
                group_id: str | None = None) -> Any:
        self.calls.append((request_id, group_id))
        self._abort_events[request_id] = asyncio.Event()
        self._outboxes[stream_id].start(key, self._stream(request_id, prompt), prompt)
        return _value(None)

    async def _stream(self, request_id: str, prompt: list[int]) -> AsyncIterator[Any]:
        yield RequestOutput(request_id, None, prompt, [CompletionOutput(0, "", [7])], False)
        await self._abort_events[request_id].wait()
        yield RequestOutput(request_id, None, prompt,
                            [CompletionOutput(0, "", [], finish_reason="abort")], True,
                            metrics={"arrival_time": 0.0})

    def _abort(self, request_id: str) -> Any:
        self.aborted.append(request_id)
        self._abort_events[request_id].set()
        return _value(None)


class _Launcher:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []

    def start(self, role: str) -> WorkerHandle:
        self.started.append(role)
        return WorkerHandle(f"{role}-new", role, _Worker(), None, {"num_blocks": 8})

    def wait_ready(self, handles: list[WorkerHandle]) -> None:
        pass

    def stop(self, handle: WorkerHandle) -> None:
        self.stopped.append(handle.worker_id)

    def release(self, handle: WorkerHandle) -> None:
        pass


def _membership(*workers: tuple[str, str, _Worker]) -> tuple[Membership, _Launcher]:
    config = ClusterConfig.local(registry={"heartbeat_interval_s": 0.01,
                                           "heartbeat_timeout_s": 0.05})
    router = Router("dualmap", RouterConfig(block_size=16, local_prefill_max_tokens=63))
    launcher = _Launcher()
    membership = Membership(config, router, create_registry("memory", 5.0),
                            launcher, collections.Counter(), owner=True)  # type: ignore[arg-type]
    for worker_id, role, actor in workers:
        membership.add(WorkerHandle(worker_id, role, actor, None, {"num_blocks": 8}))
    return membership, launcher


def test_a_replaced_workers_handle_leaves_the_set() -> None:
    membership, launcher = _membership(("decode-0", "decode", _Worker()))
    dead = membership.workers["decode-0"]

    async def run() -> None:
        membership.mark_dead("decode-0")
        assert membership.workers["decode-0"] is dead  # shown unhealthy until replaced
        await asyncio.gather(*membership.replacing)

    asyncio.run(run())
    assert not dead.healthy and launcher.started == ["decode"]
    assert set(membership.workers) == {"decode-new"}  # the dead handle is gone
    assert membership.counters["workers_replaced"] == 1


def test_drain_waits_for_a_slow_worker_instead_of_taking_it_for_dead() -> None:
    busy = {**IDLE, "num_running": 1}
    worker = _Worker(stats=["hang", "hang", busy, "hang", IDLE])
    membership, launcher = _membership(("decode-0", "decode", worker),
                                       ("decode-1", "decode", _Worker()))
    scaler = Scaler(membership.config, membership, FlightTable(), membership.counters, "tiny")

    asyncio.run(scaler.drain(membership.workers["decode-0"], timeout_s=60.0))
    assert worker.stats_replies == ["hang", "hang", busy, "hang", IDLE]  # asked until idle
    assert launcher.stopped == ["decode-0"]
    assert membership.counters["drain_stats_errors"] == 3
    assert "decode-0" not in membership.workers and launcher.started == []  # drained: no successor


def test_n_samples_reach_workers_as_one_group_and_abort_stays_exact() -> None:
    decode = _Worker()
    membership, _ = _membership(("prefill-0", "prefill", _Worker()), ("decode-0", "decode", decode))
    flights = FlightTable()
    path = RequestPath(membership.config, membership, flights, membership.counters)
    prompt = PreparedInput(ids=[5, 6, 7, 8])
    params = SamplingParams(max_tokens=4, temperature=0.0)

    async def consume(request_id: str, n: int, got: dict[str, list[Any]]) -> None:
        p = SamplingParams(max_tokens=4, temperature=0.0, n=n)
        async for out in path.stream(request_id, prompt, p):
            got.setdefault(request_id, []).append(out.outputs[0])

    async def run() -> dict[str, list[Any]]:
        got: dict[str, list[Any]] = {}
        tasks = [asyncio.ensure_future(consume("r1", 3, got)),
                 asyncio.ensure_future(consume("0_r1", 2, got)),  # ends like r1's samples once did
                 asyncio.ensure_future(consume("solo", 1, got))]
        async with asyncio.timeout(30):
            while sum(len(v) for v in got.values()) < 6:  # every sample streams its first token
                await asyncio.sleep(0.005)
        await path.abort("r1")
        assert sorted(decode.aborted) == ["r1.0", "r1.1", "r1.2"]  # exactly r1's samples
        await path.abort("0_r1")
        await path.abort("solo")
        await asyncio.gather(*tasks)
        return got

    got = asyncio.run(run())
    assert sorted(decode.calls) == sorted(
        [("r1.0", "r1"), ("r1.1", "r1"), ("r1.2", "r1"), ("0_r1.0", "0_r1"), ("0_r1.1", "0_r1"),
         ("solo", None)])
    assert sorted(o.index for o in got["r1"] if o.finish_reason == "abort") == [0, 1, 2]
    assert len(flights) == 0 and params.n == 1


class _Finishes(_Worker):
    """Streams a submitted request whole: its finished output, three tokens."""

    async def _stream(self, request_id: str, prompt: list[int]) -> AsyncIterator[Any]:
        yield RequestOutput(request_id, None, prompt,
                            [CompletionOutput(0, "", [7, 8, 9], finish_reason="length")],
                            True, metrics={"arrival_time": 0.0})
        self.on_finished()

    def on_finished(self) -> None:
        pass


class _DiesAfterItsLastOutput(_Finishes):
    """Streams the finished output of every request submitted to it, then its process dies
    before its stream's end reaches the caller (a SIGKILL in that window, as the soak once
    hit)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error
        self.num_finished = 0

    def on_finished(self) -> None:
        self.num_finished += 1
        if self.num_finished == len(self.calls):
            self.death = self.error


def test_a_worker_dying_after_its_finished_output_is_not_replayed() -> None:
    """The soak's rare loss: ``n > 1``, a decode worker killed right after the last token;
    its stream's end raised, the sample was replayed with every token already generated and
    the replacement refused it ("3 resumed tokens leave nothing to generate")."""
    from ray.exceptions import ActorDiedError

    dying = _DiesAfterItsLastOutput(ActorDiedError())
    spare = _Finishes()
    membership, _ = _membership(("decode-0", "decode", dying), ("decode-1", "decode", spare))
    path = RequestPath(membership.config, membership, FlightTable(), membership.counters)
    params = SamplingParams(max_tokens=3, temperature=0.0, n=2, seed=1)

    async def run() -> list[Any]:
        outs = []
        async with asyncio.timeout(30):
            async for out in path.stream("r", PreparedInput(ids=[5, 6, 7, 8]), params):
                outs.append(out)
        return outs

    outs = asyncio.run(run())
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason]
    assert sorted(c.index for c in finished) == [0, 1]
    assert all(c.token_ids == [7, 8, 9] and c.finish_reason == "length" for c in finished)
    assert outs[-1].finished
    assert dying.calls and dying.death is not None  # it served a sample, then died
    assert membership.counters["replays"] == 0  # nothing replayed
    assert len(dying.calls) + len(spare.calls) == 2


def test_merged_formats_shows_what_the_workers_chose() -> None:
    """``/version`` of a cluster: the formats its workers reported at start. Shared values at
    the top; where workers differ, per worker; encode workers (no formats) and unhealthy
    workers are left out; no report at all gives nothing (the backend then shows the request)."""
    from splitserve.cluster.scaling import merged_formats

    def handle(wid: str, role: str, formats: dict[str, Any] | None, healthy: bool = True):
        h = WorkerHandle(wid, role, None, None, {"formats": formats} if formats is not None else {})
        h.healthy = healthy
        return h

    bf16 = {"dtype": "bfloat16", "dtype_requested": "auto", "dtype_reason": "native bf16",
            "quantization": "auto", "weight_formats": {"int4:Q4_1": 210}}
    got = merged_formats([
        handle("p-0", "prefill", {**bf16, "kv_cache_blocks": 100}),
        handle("d-0", "decode", {**bf16, "kv_cache_blocks": 300}),
        handle("e-0", "encode", None),
        handle("d-1", "decode", {**bf16, "dtype": "float32", "kv_cache_blocks": 300},
               healthy=False),
    ])
    assert got == {**bf16, "by_worker": {"d-0": {"kv_cache_blocks": 300},
                                         "p-0": {"kv_cache_blocks": 100}}}
    same = merged_formats([handle("d-0", "decode", bf16), handle("d-1", "decode", bf16)])
    assert same == bf16
    assert merged_formats([handle("e-0", "encode", None)]) == {}
