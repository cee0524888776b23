"""Worker output streams: one Ray stream per worker for all of this cluster handle's requests.

Owns, per worker actor, the stream that carries the deltas of every request this handle
submitted to it (``EngineWorker.open_stream`` / ``submit``), and its demultiplexing to the
requests by the key each was submitted with. A Ray object per delta per request cost about
1 ms of CPU in the worker and the frontend together, which a 2-core machine pays out of its
decoding; one object per worker wake-up (about one engine step, all its requests) does not.
It must not decide what a lost worker means (request_path.py replays, membership.py marks
it dead): a stream that fails hands its error to each of its requests and is forgotten.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from splitserve.outputs import RequestOutput


class WorkerStreamEnded(Exception):
    """A worker's output stream ended while requests were waiting on it (the worker shut
    down, or its stream failed on its side)."""


class _WorkerStream:
    """One open stream to one worker actor and the requests waiting on it."""

    def __init__(self, actor: Any, on_end: Callable[[_WorkerStream], None]) -> None:
        self.stream_id = uuid.uuid4().hex
        self._on_end = on_end
        self.error: BaseException | None = None
        self._waiting: dict[int, asyncio.Queue[Any]] = {}
        self._opened = asyncio.Event()
        self._task = asyncio.ensure_future(self._read(actor))

    async def opened(self) -> None:
        """Wait until the worker has the stream (its first, empty list); raises if it failed."""
        await self._opened.wait()
        if self.error is not None:
            raise self.error

    def watch(self, key: int) -> asyncio.Queue[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if self.error is not None:
            queue.put_nowait(self.error)
        self._waiting[key] = queue
        return queue

    def unwatch(self, key: int) -> None:
        self._waiting.pop(key, None)

    async def _read(self, actor: Any) -> None:
        try:
            async for ref in actor.open_stream.remote(self.stream_id):
                items: list[tuple[int, Any]] = await ref
                self._opened.set()
                for key, item in items:
                    queue = self._waiting.get(key)
                    if queue is not None:  # else: its caller stopped listening
                        queue.put_nowait(item)
            raise WorkerStreamEnded(f"output stream {self.stream_id} ended")
        except BaseException as e:  # noqa: BLE001 - every waiting request gets it
            self.error = e
            self._opened.set()
            for queue in self._waiting.values():
                queue.put_nowait(e)
            self._on_end(self)
            if isinstance(e, asyncio.CancelledError):
                raise

    def close(self) -> None:
        self._task.cancel()


class WorkerStreams:
    """The open output streams of one cluster handle, by worker id."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[Any, _WorkerStream]] = {}
        self._keys = itertools.count()

    def _stream(self, worker_id: str, actor: Any) -> _WorkerStream:
        known = self._streams.get(worker_id)
        if known is not None and known[0] is actor and known[1].error is None:
            return known[1]
        if known is not None:
            known[1].close()
        stream = _WorkerStream(actor, lambda ended: self._ended(worker_id, ended))
        self._streams[worker_id] = (actor, stream)
        return stream

    def _ended(self, worker_id: str, stream: _WorkerStream) -> None:
        known = self._streams.get(worker_id)
        if known is not None and known[1] is stream:
            del self._streams[worker_id]

    @property
    def num_open(self) -> int:
        return len(self._streams)

    async def generate(
        self, worker_id: str, actor: Any, request_id: str, prompt_ids: list[int],
        *args: Any,
    ) -> AsyncIterator[RequestOutput]:
        """The request's deltas from ``actor`` (arguments after ``prompt_ids`` as for
        ``EngineWorker.generate``), ending with its finished output; a worker's error (or
        its stream's, e.g. Ray's for a dead actor) is raised as is."""
        stream = self._stream(worker_id, actor)
        key = next(self._keys)
        queue = stream.watch(key)
        try:
            await stream.opened()
            await actor.submit.remote(stream.stream_id, key, request_id, prompt_ids, *args)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.prompt_token_ids is None:  # the worker leaves out what we sent
                    item.prompt_token_ids = prompt_ids
                yield item
                if item.finished:
                    return
        finally:
            stream.unwatch(key)

    def forget(self, worker_id: str) -> None:
        """Close the stream to a worker that left the cluster."""
        known = self._streams.pop(worker_id, None)
        if known is not None:
            known[1].close()

    def close(self) -> None:
        for worker_id in list(self._streams):
            self.forget(worker_id)
