"""Worker output streams: the deltas of one engine step cross Ray as one object, each
request gets exactly its own deltas, and a worker's death reaches every request waiting on
its stream. The worker side is the real `_Outbox`; the actor is a stand-in with Ray's shape
(``open_stream.remote`` yields awaitables), so the fault can be injected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from splitserve.cluster.worker_streams import WorkerStreams
from splitserve.errors import InvalidRequestError
from splitserve.outputs import CompletionOutput, RequestOutput
from splitserve.roles.workers import _Outbox

PROMPT = [1, 2, 3, 4]


def _delta(request_id: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id, None, list(PROMPT),
                         [CompletionOutput(0, "", [token], "length" if finished else None)],
                         finished)


async def _value(v: Any) -> Any:
    return v


class _Actor:
    """A worker actor with one `_Outbox` per stream; every request it is given produces
    ``num_tokens`` deltas, one per ``step`` (an engine step wakes all of them at once)."""

    def __init__(self, num_tokens: int = 3) -> None:
        self.num_tokens = num_tokens
        self.step = asyncio.Condition()
        self.batches: list[list[Any]] = []
        """Per object sent: each item's prompt ids as sent (None: left out)."""
        self.death: BaseException | None = None
        self.outboxes: dict[str, _Outbox] = {}
        self.open_stream = SimpleNamespace(remote=self._open_stream)
        self.submit = SimpleNamespace(remote=self._submit)

    def _open_stream(self, stream_id: str) -> AsyncIterator[Any]:
        outbox = self.outboxes[stream_id] = _Outbox()

        async def items() -> AsyncIterator[Any]:
            yield _value([])
            while True:
                if self.death is not None:
                    raise self.death
                batch = await outbox.take()
                self.batches.append([item.prompt_token_ids for _, item in batch])
                yield _value(batch)

        return items()

    def _submit(self, stream_id: str, key: int, request_id: str, prompt: list[int],
                *args: Any) -> Any:
        self.outboxes[stream_id].start(key, self._deltas(request_id), prompt)
        return _value(None)

    async def _deltas(self, request_id: str) -> AsyncIterator[RequestOutput]:
        for i in range(self.num_tokens):
            async with self.step:
                await self.step.wait()
            yield _delta(request_id, 100 * int(request_id[1:]) + i, i == self.num_tokens - 1)

    async def run_steps(self, n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0.01)  # every request is waiting for the step
            async with self.step:
                self.step.notify_all()


async def _collect(streams: WorkerStreams, actor: _Actor, request_id: str) -> list[Any]:
    return [out async for out in streams.generate("w0", actor, request_id, PROMPT, None)]


def test_a_steps_deltas_travel_as_one_object_and_each_request_gets_its_own() -> None:
    actor = _Actor(num_tokens=3)
    streams = WorkerStreams()

    async def run() -> list[list[Any]]:
        tasks = [asyncio.ensure_future(_collect(streams, actor, f"r{i}")) for i in range(8)]
        await actor.run_steps(3)
        async with asyncio.timeout(10):
            return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    for i, outs in enumerate(results):
        assert [o.outputs[0].token_ids[0] for o in outs] == [100 * i, 100 * i + 1, 100 * i + 2]
        assert outs[-1].finished and all(o.request_id == f"r{i}" for o in outs)
        assert all(o.prompt_token_ids == PROMPT for o in outs)  # filled in again
    data = [b for b in actor.batches if b]
    assert [len(b) for b in data] == [8, 8, 8]  # one object per step, not 24
    assert data[0] == [PROMPT] * 8  # the first delta of each carries the prompt ids ...
    assert data[1] == data[2] == [None] * 8  # ... and later ones do not send them again


def test_a_dead_workers_stream_fails_every_waiting_request_then_is_reopened() -> None:
    actor = _Actor(num_tokens=3)
    streams = WorkerStreams()

    async def run() -> list[Any]:
        tasks = [asyncio.ensure_future(_collect(streams, actor, f"r{i}")) for i in range(3)]
        await actor.run_steps(1)
        actor.death = ActorDiedError()
        await actor.run_steps(1)  # the stream raises after this step's batch
        async with asyncio.timeout(10):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        assert streams.num_open == 0  # the dead stream is forgotten
        actor.death = None
        again = asyncio.ensure_future(_collect(streams, actor, "r9"))
        await actor.run_steps(3)
        async with asyncio.timeout(10):
            return [*results, await again]

    *failed, again = asyncio.run(run())
    assert all(isinstance(r, ActorDiedError) for r in failed)
    assert [o.outputs[0].token_ids[0] for o in again] == [900, 901, 902]


def test_a_requests_error_reaches_only_that_request() -> None:
    async def refuse() -> AsyncIterator[RequestOutput]:
        raise InvalidRequestError("bad", "max_tokens")
        yield  # pragma: no cover

    async def run() -> tuple[list[tuple[int, Any]], bool]:
        outbox = _Outbox()
        closed = asyncio.Event()

        async def forever() -> AsyncIterator[RequestOutput]:
            try:
                yield _delta("r1", 1)
                await asyncio.Event().wait()
                yield _delta("r1", 2)  # pragma: no cover
            finally:
                closed.set()

        outbox.start(0, refuse(), PROMPT)
        outbox.start(1, forever(), PROMPT)
        async with asyncio.timeout(10):
            items = await outbox.take()
            while len(items) < 2:
                items += await outbox.take()
            outbox.cancel_all()  # the caller is gone: the live request's stream is closed
            await closed.wait()
        return items, closed.is_set()

    items, closed = asyncio.run(run())
    by_key = dict(items)
    assert isinstance(by_key[0], InvalidRequestError) and by_key[0].field == "max_tokens"
    assert by_key[1].outputs[0].token_ids == [1]
    assert closed


@pytest.mark.parametrize("error", [RuntimeError("plain"), InvalidRequestError("x", "n")])
def test_errors_cross_as_themselves_when_they_pickle(error: BaseException) -> None:
    from splitserve.roles.workers import picklable_error

    assert picklable_error(error) is error


def test_an_error_that_does_not_pickle_crosses_as_a_runtime_error_naming_it() -> None:
    from splitserve.roles.workers import picklable_error

    class Local(Exception):  # a local class cannot be pickled
        pass

    out = picklable_error(Local("boom"))
    assert isinstance(out, RuntimeError) and "Local: boom" in str(out)
