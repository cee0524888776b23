"""AsyncEngine: an LLMEngine stepped by a background thread, with async streaming.

Owns the thread that drives the engine and the hand-off of outputs to asyncio
callers: ``generate`` yields RequestOutput deltas (new token ids and text) as
they are produced, and ``abort`` (or the caller dropping the stream) frees the
request's KV. Every engine call, its construction included, happens on the engine
thread; callers only enqueue commands, so the engine needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from splitserve import env
from splitserve.errors import EngineFailedError, InvalidRequestError
from splitserve.integrity import IntegrityReport
from splitserve.offload import off_loop
from splitserve.outputs import RequestOutput
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.kv_events import KVEventLog
from splitserve.roles.engine.llm_engine import LLMEngine, PromptType
from splitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_FINISHED = object()
T = TypeVar("T")
MAX_STEP_FAILURES = 3
"""Failed steps without a good step between after which the engine is unhealthy for good."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    added: bool = False
    """Its "add" command went to the engine thread (after its grammar compiled)."""
    abort_requested: bool = False
    """Aborted before its "add" went: the abort follows the add, not precedes it."""


_frozen_objects = 0
"""Objects ``freeze_startup_heap`` froze in this process, counted once when it froze them."""


def freeze_startup_heap() -> None:
    """Collect garbage, then ``gc.freeze()`` every object left (unless
    ``SPLITSERVE_GC_FREEZE=0``): the collector's full passes skip them from then on. Only for a
    process that serves what it has built for its life (see ``AsyncEngine``'s ``freeze_heap``)."""
    global _frozen_objects
    if env.SPLITSERVE_GC_FREEZE.get():
        gc.collect()
        gc.freeze()
        _frozen_objects = gc.get_freeze_count()


@contextlib.contextmanager
def heap_frozen_while() -> Iterator[None]:
    """The heap as it is on entry, frozen until exit (``gc.freeze()``, then ``gc.unfreeze()``):
    for the offline ``LLM``'s step loop, whose process may build engine after engine, so
    ``freeze_startup_heap`` (frozen for good) is not for it. The collector's full passes
    during the loop then skip the model's objects and everything else alive before it;
    objects made inside it are collected as usual, and nothing stays frozen afterwards.
    Measured on the 64-request run of ``bench/engine_throughput.py`` (2-core Zen 5): full
    passes over the unfrozen heap were 1.5-2.6% of its profile's samples (``gc_collect_main``;
    the run ~1% faster frozen, within its noise). Nothing is done when ``SPLITSERVE_GC_FREEZE=0`` or when the
    process already froze objects (``freeze_startup_heap``, or its own ``gc.freeze()``:
    unfreezing would undo that; ``gc.get_freeze_count()`` is O(1) on an empty frozen set)."""
    if not env.SPLITSERVE_GC_FREEZE.get() or _frozen_objects or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def frozen_objects() -> int:
    """How many objects ``freeze_startup_heap`` froze (0 if it did not), for ``stats()``; frozen
    objects freed by reference counting since are still counted (a handful).

    Counted at the freeze, not on each call: ``gc.get_freeze_count()`` walks the whole frozen
    generation, 20 ms for the embedded model's 213k objects on a 2-core Zen 5, holding the
    GIL, so a worker's engine thread stalled that long on every heartbeat (1/s): ~2% of a
    loaded server's decoding (py-spy of ``splitserve serve`` under 64 streams)."""
    return _frozen_objects


class AsyncEngine:
    """Streaming front of one engine; safe to call from any asyncio loop."""

    engine: LLMEngine
    """Built, stepped and called on the engine thread only."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        on_start: Callable[[LLMEngine], None] | None = None,
        freeze_heap: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        """``on_start`` runs on the new engine before it takes requests (attach a connector).

        ``freeze_heap``: once the engine is built, collect garbage and ``gc.freeze()`` the
        process's heap (unless ``SPLITSERVE_GC_FREEZE=0``), as vLLM's engine core does: the
        collector's full passes then skip the model's objects (~230k for the embedded model;
        a full pass over them took 73-104 ms on 2 cores, a pause in every running request's
        decoding). For processes that serve one engine for their life: frozen objects are
        never freed by the cycle collector, so a process that builds engine after engine
        (tests, notebooks) leaves it off.

        The engine is built on its own thread, the one that steps it: with OpenMP (torch's
        CPU threads) each thread that runs a parallel op gets a team of its own, and a second
        team, idle, makes libgomp's barriers give up spinning almost at once (more managed
        threads than cores), so every op of every step pays a futex wake. Measured on 2 cores:
        a loop of small matmuls 1.3-1.7x slower once another thread had run one matmul, and
        the colocated server's throughput bimodal (one core's worth of work, or 1.5)."""
        self._commands: list[tuple[str, Any]] = []
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self._ids = itertools.count()
        self._check_when_idle = env.SPLITSERVE_CHECK_INTEGRITY.get()
        self._idle_checked = True
        self.num_integrity_checks = 0
        self.num_integrity_failures = 0
        self.last_integrity_report: IntegrityReport | None = None
        """The latest idle check's report (``SPLITSERVE_CHECK_INTEGRITY=1``), None before."""
        self.error: str | None = None
        """Why the engine is unhealthy (steps keep failing, or its thread crashed); None
        while healthy. An unhealthy engine refuses requests; its worker must be replaced."""
        self.num_step_failures = 0
        self._failures_in_a_row = 0
        self._stats: dict[str, Any] = {}
        """The engine's stats as of its last step, taken on the engine thread (callers on other
        threads read this snapshot, never the scheduler's live state)."""
        built = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._boot, args=(config or EngineConfig(**engine_kwargs), on_start,
                                     freeze_heap, built, failed),
            name="splitserve-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failed:
            self._thread.join()
            raise failed[0]

    def _boot(self, config: EngineConfig, on_start: Callable[[LLMEngine], None] | None,
              freeze_heap: bool, built: threading.Event, failed: list[BaseException]) -> None:
        """The engine thread: build the engine (and ``on_start``), then step it."""
        try:
            self.engine = LLMEngine(config)
            if on_start is not None:
                on_start(self.engine)
            # a layer-wise streamed offer leaves mid-step, before the forward that computes
            # its KV
            self.engine.on_early_output = lambda out: self._deliver(out.request_id, out)
            if freeze_heap:
                freeze_startup_heap()
            self._stats = self.engine.stats()
        except BaseException as e:
            failed.append(e)
            return
        finally:
            built.set()
        self._loop()

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
        if self.error is not None:
            raise EngineFailedError(f"the engine is unhealthy: {self.error}")
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        params = sampling_params or SamplingParams()
        # open before the grammar compiles: the id is taken, and an abort meanwhile is kept
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        finished = False
        try:
            if params.structured_outputs is not None:  # off the engine thread (cached there)
                await asyncio.to_thread(self.engine.structured.compile, params)
            if isinstance(prompt, str):  # likewise the tokenizer: megabytes take seconds
                request_kwargs["tokenized"] = await off_loop(self.engine.tokenize_prompt, prompt)
            # arrival = now, not when the engine thread takes the command after its current
            # step: that wait is queueing too
            request_kwargs.setdefault("arrival_time", time.time())
            self._send("add", (request_id, prompt, params, request_kwargs))
            stream.added = True
            if stream.abort_requested:  # aborted while its grammar compiled
                self._send("abort", request_id)
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
            if not finished and stream.added:
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """``abort`` from synchronous code on the caller's loop. A request whose stream is
        open but whose "add" has not gone yet (its grammar compiling) is aborted right after
        its add: an abort that reached the engine thread first would find nothing to stop.
        An id the engine does not know is ignored."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.added:
            stream.abort_requested = True
            return
        self._send("abort", request_id)

    def is_open(self, request_id: str) -> bool:
        """Whether a ``generate`` stream of ``request_id`` is open here."""
        return request_id in self._streams

    async def withdraw(self, request_id: str) -> bool:
        """Abort the request only if it is still queued untouched (see ``withdraw_request``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._send("withdraw", (request_id, loop, done))
        return await done

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps; its result or error."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._send("call", (fn, loop, done))
        return await done

    async def check_integrity(self) -> IntegrityReport:
        """The engine's ``check_integrity()``, taken on the engine thread between steps."""
        return await self.call(lambda engine: engine.check_integrity())

    @property
    def healthy(self) -> bool:
        """False once steps keep failing or the engine thread ended on its own."""
        return self.error is None and (self._thread.is_alive() or self._stopped)

    def health(self) -> dict[str, Any]:
        """``{"healthy", "error", "num_step_failures"}``: what a worker reports to the cluster."""
        error = self.error
        if error is None and not self.healthy:
            error = "the engine thread is not running"
        return {"healthy": error is None, "error": error or "",
                "num_step_failures": self.num_step_failures}

    def stats(self) -> dict[str, Any]:
        """The snapshot of the engine's stats taken after its last step (any thread)."""
        return {
            **self._stats,
            "num_integrity_checks": self.num_integrity_checks,
            "num_integrity_failures": self.num_integrity_failures,
            "gc_frozen_objects": frozen_objects(),
            **self.health(),
        }

    @property
    def kv_events(self) -> KVEventLog:
        """The prefix-cache event log (written by the engine thread; readers keep cursors)."""
        return self.engine.kv.pool.events

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
        """Take commands, step, deliver; never ends silently: a failed step fails the open
        requests (``_on_step_failure``), and whatever else escapes marks the engine
        unhealthy and ends every stream before the thread ends."""
        try:
            while (commands := self._next_commands()) is not None:
                try:
                    self._iterate(commands)
                except Exception as e:  # a bug in a step must not hang every stream
                    self._on_step_failure(e)
        except BaseException as e:
            logger.critical("engine thread crashed", exc_info=True)
            self._mark_unhealthy(EngineFailedError(f"engine thread crashed: {_describe(e)}"))
            raise
        finally:
            self._fail_streams(EngineFailedError(self.error or "the engine was shut down"))

    def _next_commands(self) -> list[tuple[str, Any]] | None:
        """Wait for commands or work; None once shut down."""
        with self._wake:
            while not self._stopped and not self._commands and not self._has_work():
                if self.error is None and self.engine.has_pending_transfers():
                    self._wake.wait(timeout=0.002)  # KV moving: poll, gently
                    break
                self._wake.wait()
            if self._stopped:
                return None
            commands, self._commands = self._commands, []
            return commands

    def _has_work(self) -> bool:
        """Something to compute. Requests that only wait for their KV (a layer-wise streamed
        load spans the whole remote prefill) are polled every 2 ms instead of by a busy loop
        that would take a core from the prefill it waits for."""
        return self.error is None and self.engine.has_runnable_requests()

    def _iterate(self, commands: list[tuple[str, Any]]) -> None:
        for kind, payload in commands:
            self._apply(kind, payload)
        if self.error is not None:
            return  # unhealthy: answer commands, never step again
        outputs = self.engine.step()
        self._stats = self.engine.stats()  # one reference swap: readers see one whole step
        if outputs:
            self._failures_in_a_row = 0
        for out in outputs:
            self._deliver(out.request_id, out)
        if self._check_when_idle:
            self._check_if_idle()

    def _on_step_failure(self, error: Exception) -> None:
        """Clear the engine's requests and step once more to prove it still works; if that
        fails too, or steps keep failing (``MAX_STEP_FAILURES`` without a good step between),
        the engine is unhealthy. Then every open request fails with a clear error."""
        logger.exception("engine step failed")
        self.num_step_failures += 1
        self._failures_in_a_row += 1
        try:
            self.engine.abort_all_requests()
            self.engine.step()  # frees what the aborts released, serves lease control
        except Exception as again:
            logger.exception("engine could not recover from a failed step")
            self._mark_unhealthy(EngineFailedError(
                f"engine steps keep failing ({_describe(error)}, then {_describe(again)})"
            ))
        if self._failures_in_a_row >= MAX_STEP_FAILURES:
            self._mark_unhealthy(EngineFailedError(
                f"{self._failures_in_a_row} engine steps failed in a row, the last with "
                f"{_describe(error)}"
            ))
        self._fail_streams(EngineFailedError(
            f"the engine failed while running this request ({_describe(error)}); it was aborted"
        ))

    def _mark_unhealthy(self, error: EngineFailedError) -> None:
        """From now on the engine refuses requests; the worker reports itself unhealthy."""
        if self.error is None:
            self.error = str(error)
            logger.error("engine unhealthy: %s", self.error)
        self._fail_streams(error)

    def _fail_streams(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, error)

    def _busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def _check_if_idle(self) -> None:
        """Check integrity once each time the engine falls idle (no request, no transfer)."""
        if self._busy() or self.engine.has_pending_transfers():
            self._idle_checked = False
            return
        if self._idle_checked:
            return
        self._idle_checked = True
        report = self.engine.check_integrity()
        self.num_integrity_checks += 1
        self.last_integrity_report = report
        if not report.ok:
            self.num_integrity_failures += 1
            logger.error("integrity check failed when idle: %s", "; ".join(report.problems))

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "abort":
            if self.error is None:
                self.engine.abort_request(payload)
            return
        if kind == "withdraw":
            request_id, loop, done = payload
            ok = self.error is None and self.engine.withdraw_request(request_id)
            loop.call_soon_threadsafe(_settle, done, ok, None)
            return
        if kind == "call":
            self._run_call(*payload)
            return
        request_id, prompt, params, kwargs = payload
        if self.error is not None:
            self._deliver(request_id, EngineFailedError(f"the engine is unhealthy: {self.error}"))
            return
        try:
            self.engine.add_request(request_id, prompt, params, **kwargs)
        except Exception as e:
            self._deliver(request_id, e)

    def _run_call(
        self, fn: Callable[[LLMEngine], Any], loop: asyncio.AbstractEventLoop, done: asyncio.Future
    ) -> None:
        try:
            result = fn(self.engine)
        except Exception as e:  # the caller gets it; the engine thread goes on
            loop.call_soon_threadsafe(_settle, done, None, e)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self._streams.pop(request_id, None)

def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _settle(done: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if done.done():
        return  # the caller gave up (cancelled)
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
