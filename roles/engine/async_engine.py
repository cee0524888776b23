"""AsyncEngine: an LLMEngine stepped by a background thread, with async streaming.

Owns the thread that drives the engine and the hand-off of outputs to asyncio
callers: ``generate`` yields RequestOutput deltas (new token ids and text) as
they are produced, and ``abort`` (or the caller dropping the stream) frees the
request's KV. Every engine call happens on the engine thread; callers only
enqueue commands, so the engine needs no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from splitserve.errors import InvalidRequestError
from splitserve.outputs import RequestOutput
from splitserve.roles.engine.block_pool import KVEvent
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine, PromptType
from splitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_FINISHED = object()


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class AsyncEngine:
    """Streaming front of one engine; safe to call from any asyncio loop."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        on_start: Callable[[LLMEngine], None] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """``on_start`` runs on the new engine before its thread starts (attach a connector)."""
        self.engine = LLMEngine(config or EngineConfig(**engine_kwargs))
        if on_start is not None:
            on_start(self.engine)
        self._kv_events: deque[KVEvent] = deque(maxlen=100_000)
        self._commands: list[tuple[str, Any]] = []
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="splitserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    # ------------------------------------------------------------------ public API

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        **request_kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Yield delta outputs until the request finishes; abort it if the caller stops early.

        ``request_kwargs`` go to ``LLMEngine.add_request`` (``kv_transfer_params``,
        ``resume_token_ids``).
        """
        request_id = request_id or f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        params = sampling_params or SamplingParams()
        # arrival = now, not when the engine thread takes the command after its current step:
        # that wait is queueing too
        request_kwargs.setdefault("arrival_time", time.time())
        self._send("add", (request_id, prompt, params, request_kwargs))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if item is _FINISHED:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def withdraw(self, request_id: str) -> bool:
        """Abort the request only if it is still queued untouched (see ``withdraw_request``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._send("withdraw", (request_id, loop, done))
        return await done

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def take_kv_events(self) -> list[KVEvent]:
        """Prefix-cache events (stored / removed block hashes) since the last call."""
        events = []
        while self._kv_events:
            events.append(self._kv_events.popleft())
        return events

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ engine thread

    def _send(self, kind: str, payload: Any) -> None:
        with self._wake:
            self._commands.append((kind, payload))
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._commands and not self._busy():
                    if self.engine.has_pending_transfers():  # KV moving: poll, gently
                        self._wake.wait(timeout=0.002)
                        break
                    self._wake.wait()
                if self._stopped:
                    return
                commands, self._commands = self._commands, []
            for kind, payload in commands:
                self._apply(kind, payload)
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug in a step must not hang every stream
                logger.exception("engine step failed")
                self._fail_all(e)
                continue
            self._kv_events.extend(self.engine.kv.pool.take_events())
            for out in outputs:
                self._deliver(out.request_id, out)

    def _busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "abort":
            self.engine.abort_request(payload)
            return
        if kind == "withdraw":
            request_id, loop, done = payload
            ok = self.engine.withdraw_request(request_id)
            loop.call_soon_threadsafe(done.set_result, ok)
            return
        request_id, prompt, params, kwargs = payload
        try:
            self.engine.add_request(request_id, prompt, params, **kwargs)
        except Exception as e:
            self._deliver(request_id, e)

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self.engine.abort_request(request_id)
            self._deliver(request_id, error)
        self.engine.step()
