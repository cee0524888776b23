"""Role workers, run as Ray actors: prefill and decode (one engine each) and encode (a vision
tower with an embedding cache, no engine).

A worker owns its engine (an AsyncEngine: the engine steps on its own thread), its KV
transport and connector, and nothing else: placement is the router's, membership the
registry's, and the request's end-to-end path the cluster's. Every method is async so
Ray runs them concurrently on the actor's event loop. The cluster ``submit``s requests and
reads their deltas from its one ``open_stream`` (a streaming generator: one list of every
request's deltas per wake-up); ``generate`` streams one request's deltas (a direct caller).

The classes are plain; ``cluster/launcher.py`` wraps them with ``ray.remote`` and the
role's resources, so importing this module does not import Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from splitserve import env
from splitserve.integrity import IntegrityReport
from splitserve.outputs import RequestOutput
from splitserve.roles.engine.async_engine import (
    AsyncEngine,
    freeze_startup_heap,
    frozen_objects,
)
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.kv_events import KVEventBatch
from splitserve.roles.engine.llm_engine import LLMEngine
from splitserve.roles.engine.precision import resolve_dtype
from splitserve.sampling_params import SamplingParams


def _node_ip() -> str:
    """This node's IP as Ray knows it (what peers on other nodes reach), else loopback."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - not under Ray (a worker built directly in a test)
        return "127.0.0.1"


EARLY_ABORT_MAX = 4096
"""The most aborts of not-yet-seen requests a worker remembers; past it the oldest goes
(cluster ids are unique: an id aborted once never runs, so a forgotten one costs nothing
unless its submit is thousands of aborts late)."""


class _Outbox:
    """The items of one output stream not yet taken, and the tasks that feed it (one per
    submitted request: it reads the request's delta stream into the outbox)."""

    def __init__(self) -> None:
        self._items: list[tuple[int, Any]] = []
        self._ready = asyncio.Event()
        self._feeds: dict[int, asyncio.Task[None]] = {}

    def start(self, key: int, stream: AsyncGenerator[RequestOutput, None],
              prompt_ids: list[int] | None) -> None:
        self._feeds[key] = asyncio.ensure_future(self._feed(key, stream, prompt_ids))

    async def _feed(self, key: int, stream: AsyncGenerator[RequestOutput, None],
                    prompt_ids: list[int] | None) -> None:
        first = True
        try:
            async for out in stream:
                if not first and out.prompt_token_ids == prompt_ids:
                    out.prompt_token_ids = None  # type: ignore[assignment]
                first = False
                self._put(key, out)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - the request's end, for its caller
            self._put(key, picklable_error(e))
        finally:
            self._feeds.pop(key, None)
            await stream.aclose()  # cancelled: the engine's stream aborts the request

    def _put(self, key: int, item: Any) -> None:
        self._items.append((key, item))
        self._ready.set()

    async def take(self) -> list[tuple[int, Any]]:
        """Every item so far (waits for one). The feeds one engine step wakes are queued on
        the loop before this wakes, so a step's deltas travel together."""
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, []
        return items

    def cancel_all(self) -> None:
        """The caller is gone: end every request it submitted (their streams abort them)."""
        for task in list(self._feeds.values()):
            task.cancel()


def picklable_error(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (it crosses Ray or a process worker's socket), else a
    RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")


class EngineWorker:
    """Base of the role actors: an engine with a KV connector on a transport."""

    role = "engine"

    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        transport: str = "ucx",
        lease_s: float = 30.0,
        host: str | None = None,
        transfer_timeout_s: float | None = None,
        freeze_heap: bool = False,
    ) -> None:
        """``host``: the address this worker's KV listener binds and advertises (None: the
        node's IP).
        ``freeze_heap``: the worker has a process of its own (a Ray actor, a child process; the
        launcher says so), so its heap is frozen once the engine is built (AsyncEngine).
        ``transfer_timeout_s`` (``kv_transfer.timeout_s``): longest wait for one pull of a
        request's KV (and for each of its reads) before it fails and the prompt is computed
        here instead; None keeps ``TransferConfig``'s defaults."""
        self.worker_id = worker_id
        self.started_at = time.time()
        self._transport_kind = transport
        self._lease_s = lease_s
        self._host = host
        self._transfer_timeout_s = transfer_timeout_s
        self.engine = AsyncEngine(engine_config, on_start=self._attach, freeze_heap=freeze_heap)
        self._outboxes: dict[str, _Outbox] = {}
        self._early_aborts: dict[str, None] = {}
        """Ids aborted before their request reached this worker's engine, oldest first: the
        cluster's ``abort`` and its ``submit`` are separate calls, and a submitted request
        starts on a later turn of this actor's loop, so the abort can come first."""

    def _attach(self, engine: LLMEngine) -> None:
        from splitserve.kvtransfer.transport import create_transport

        kwargs: dict[str, Any] = {"name": self.worker_id}
        if self._transport_kind == "ucx":
            kwargs = {"host": self._host or _node_ip(), "engine_id": self.worker_id}
        delay = env.SPLITSERVE_TEST_KV_SEND_DELAY_S.get()
        if delay > 0:  # fault injection for tests: slow KV sends so a peer can die mid-transfer
            from splitserve.kvtransfer.transport import FaultInjector

            kwargs["fault"] = FaultInjector(delay_send_s=delay)
        transport = create_transport(self._transport_kind, **kwargs)
        engine.attach_kv_connector(transport, self.worker_id, lease_ttl_s=self._lease_s,
                                   transfer_config=self._transfer_config())

    def _transfer_config(self) -> Any:
        from splitserve.kvtransfer.connector_worker import TransferConfig

        timeout = self._transfer_timeout_s
        if timeout is None:
            return None
        return TransferConfig(
            load_timeout_s=timeout, read_timeout_s=min(TransferConfig.read_timeout_s, timeout)
        )

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        kv_transfer_params: dict[str, Any] | None = None,
        resume_token_ids: Sequence[int] = (),
        multi_modal_data: dict[str, Any] | None = None,
        group_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's deltas; the last one has ``finished`` (and, on a prefill
        role, ``kv_transfer_params`` for the decode role).

        ``group_id``: the client request this one is a sample of (the cluster fans ``n``
        out into one request per sample); the engine shares sequence slots fairly by group.

        ``multi_modal_data`` of a multimodal request: the encode worker's output as
        ``{"image_embeds": [...], "image_hashes": [...]}``; prefill and decode workers get the
        same, so both compute the same block hashes and either can (re)compute the prompt.
        """
        stream = self.engine.generate(
            prompt, params, request_id,
            kv_transfer_params=kv_transfer_params, resume_token_ids=list(resume_token_ids),
            multi_modal_data=multi_modal_data, group_id=group_id,
        )
        if request_id in self._early_aborts:
            del self._early_aborts[request_id]
            # aborted on its way here: it starts and is aborted at once, so it ends as any
            # aborted request does ("abort", its KV and any remote lease released); the
            # callback runs once the stream below has sent its "add" and waits
            asyncio.get_running_loop().call_soon(self.engine.abort_nowait, request_id)
        async for out in stream:
            yield out

    # One output stream per caller: the deltas of every request it submitted here, a list
    # per wake-up of this actor's loop (about one engine step), so a step of 64 requests
    # costs one Ray object instead of 64 (``cluster/worker_streams.py`` is the other end).

    async def open_stream(self, stream_id: str) -> AsyncIterator[list[tuple[int, Any]]]:
        """Items ``(key, RequestOutput | BaseException)`` of the requests ``submit``-ted
        with this ``stream_id``; the first list is empty (the stream is open). Closing the
        stream (its caller died or closed it) aborts those requests."""
        outbox = self._outboxes.setdefault(stream_id, _Outbox())
        try:
            yield []
            while True:
                yield await outbox.take()
        finally:
            self._outboxes.pop(stream_id, None)
            outbox.cancel_all()

    async def submit(
        self,
        stream_id: str,
        key: int,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        kv_transfer_params: dict[str, Any] | None = None,
        resume_token_ids: Sequence[int] = (),
        multi_modal_data: dict[str, Any] | None = None,
        group_id: str | None = None,
    ) -> None:
        """Start a request whose deltas go to the open stream ``stream_id``, tagged ``key``
        (arguments as for ``generate``); its last item is a finished output or an error.
        Deltas after the first carry ``prompt_token_ids=None`` when they are ``prompt``:
        the caller has them."""
        outbox = self._outboxes.get(stream_id)
        if outbox is None:
            raise RuntimeError(f"output stream {stream_id!r} is not open on {self.worker_id}")
        stream = self.generate(request_id, prompt, params, kv_transfer_params,
                               resume_token_ids, multi_modal_data, group_id)
        outbox.start(key, stream, prompt if isinstance(prompt, list) else None)

    async def abort(self, request_id: str) -> None:
        if not self.engine.is_open(request_id):  # not here yet (or already done): remembered
            if len(self._early_aborts) >= EARLY_ABORT_MAX:
                del self._early_aborts[next(iter(self._early_aborts))]
            self._early_aborts[request_id] = None
        await self.engine.abort(request_id)

    async def resume(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Layer-wise streaming (decode role): the first token of a request admitted with
        streamed KV params, from its prefill worker; ``[]`` when that worker died before
        producing it (the request then computes its prompt here)."""
        tokens = list(token_ids)
        await self.engine.call(lambda engine: engine.resume_remote(request_id, tokens))

    async def withdraw(self, request_id: str) -> bool:
        """Give up a request still queued here untouched, so it can run elsewhere."""
        return await self.engine.withdraw(request_id)

    # ------------------------------------------------------------------ state

    async def info(self) -> dict[str, Any]:
        eng = self.engine.engine
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "kv_address": eng.kv_worker.transport.address if eng.kv_worker else "",
            "model_id": eng.model_id,
            "num_blocks": eng.num_blocks,
            "block_size": eng.config.block_size,
            "max_model_len": eng.max_model_len,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": _ray_node_id(),
            "started_at": self.started_at,
            "formats": {k: v for k, v in eng.info().items() if k != "model_id"},
        }

    async def stats(self) -> dict[str, Any]:
        """Engine stats, with ``healthy`` / ``error`` (see ``health``) for the health loop."""
        return dict(self.engine.stats())

    async def health(self) -> dict[str, Any]:
        """``{"healthy", "error", "num_step_failures"}``: False once the engine's steps keep
        failing (it then refuses requests) or its thread ended; the cluster replaces it."""
        return self.engine.health()

    async def check_integrity(self) -> dict[str, Any]:
        """``IntegrityReport.to_dict()`` of the engine (block pool, KV manager, scheduler,
        leases and loads), taken on the engine thread between steps."""
        return (await self.engine.check_integrity()).to_dict()

    async def kv_events(
        self, epoch: str | None = None, since: int = 0, max_events: int = 10_000
    ) -> dict[str, Any]:
        """Prefix-cache changes from the caller's cursor (``epoch``, ``since``), or a snapshot
        of every cached hash when the cursor is new, stale or fell out of the log (see
        ``KVEventBatch``). Reading consumes nothing: each router keeps its own cursor."""
        return self.engine.kv_events.read(epoch, since, max_events).to_wire()

    async def ping(self) -> bool:
        return True

    def die(self) -> None:
        """Fault injection: end this worker's process at once (tests only)."""
        os._exit(1)

    def fail_engine(self) -> None:
        """Fault injection (tests only): every engine step from now on raises, so the engine
        fails its open requests and then reports itself unhealthy."""

        def broken_step() -> Any:
            raise RuntimeError("injected fault: the engine step failed")

        self.engine.engine.step = broken_step  # type: ignore[method-assign]

    async def shutdown(self) -> None:
        self.engine.shutdown()
        eng = self.engine.engine
        if eng.kv_worker is not None:
            eng.kv_worker.close()


class PrefillWorker(EngineWorker):
    """Runs prompts (chunked, prefix-cached), samples the first token, leases the KV."""

    role = "prefill"


class DecodeWorker(EngineWorker):
    """Pulls prompt KV from prefill workers and decodes with continuous batching; prefills
    short prompts itself (conditional disaggregation) and replays requests of dead workers."""

    role = "decode"


class EncodeWorker:
    """Images -> embeddings for prefill workers: vision tower + projector only (the language
    model is never loaded), with an LRU embedding cache by image content hash.

    Takes the same constructor arguments as the engine workers (the launcher starts every
    role alike); it moves no KV, so the transport arguments are unused.
    """

    role = "encode"

    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        transport: str = "ucx",
        lease_s: float = 30.0,
        host: str | None = None,
        transfer_timeout_s: float | None = None,
        freeze_heap: bool = False,
    ) -> None:
        import torch

        from splitserve.roles.encoder import ImageEncoder
        from splitserve.roles.models.loader import resolve_model

        self.worker_id = worker_id
        self.started_at = time.time()
        self.config = engine_config
        # one thread loads and runs the tower: a second thread running torch ops would keep
        # a second OpenMP team, which slows every op (see AsyncEngine)
        self._torch = ThreadPoolExecutor(1, thread_name_prefix="splitserve-encode")
        self.model_id, path = resolve_model(engine_config.model)

        def load() -> Any:
            if engine_config.num_threads:
                torch.set_num_threads(engine_config.num_threads)
            return ImageEncoder.from_folder(
                path, resolve_dtype(engine_config.dtype, engine_config.device).dtype,
                engine_config.device,
                engine_config.encoder_cache_bytes,
            )

        self.encoder = self._torch.submit(load).result()
        if freeze_heap:  # a process of its own, as EngineWorker's
            freeze_startup_heap()
        self.num_running = 0
        self.num_images = 0

    async def encode(self, images: list[Any]) -> list[dict[str, Any]]:
        """Per image (PNG/JPEG bytes, base64, data URL or PIL image), in order:
        ``{"hash": content hash, "embeds": float32 array [num_image_tokens, hidden]}``.
        Malformed images raise InvalidRequestError (field ``multi_modal_data.image``)."""

        def encode() -> list[dict[str, Any]]:
            return [{"hash": h, "embeds": e.float().cpu().numpy()}
                    for h, e in self.encoder.encode(list(images))]

        self.num_running += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._torch, encode)
        finally:
            self.num_running -= 1
        self.num_images += len(results)
        return results

    async def info(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "kv_address": "",
            "model_id": self.model_id,
            "num_blocks": 0,
            "block_size": self.config.block_size,
            "num_image_tokens": self.encoder.num_image_tokens,
            "hidden_size": self.encoder.model.hidden_size,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": _ray_node_id(),
            "started_at": self.started_at,
        }

    async def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.num_running,
            "num_waiting": 0,
            "kv_usage": 0.0,
            "num_images_encoded": self.num_images,
            "gc_frozen_objects": frozen_objects(),
            **self.encoder.stats(),
        }

    async def check_integrity(self) -> dict[str, Any]:
        """No KV cache, no leases: always intact (kept so teardown checks treat roles alike)."""
        return IntegrityReport().to_dict()

    async def health(self) -> dict[str, Any]:
        """No engine thread: healthy while the process answers."""
        return {"healthy": True, "error": "", "num_step_failures": 0}

    async def kv_events(
        self, epoch: str | None = None, since: int = 0, max_events: int = 10_000
    ) -> dict[str, Any]:
        """No KV cache: nothing for the prefix index (kept so health loops treat roles alike)."""
        empty = KVEventBatch("no-kv-cache", 0)  # a new reader gets the empty snapshot once
        if epoch != empty.epoch:
            empty = dataclasses.replace(empty, snapshot=())
        return empty.to_wire()

    async def ping(self) -> bool:
        return True

    def die(self) -> None:
        """Fault injection: end this worker's process at once (tests only)."""
        os._exit(1)

    async def shutdown(self) -> None:
        self.encoder.cache.clear()
        self._torch.shutdown(wait=False)


def _ray_node_id() -> str:
    """The Ray node this worker runs on ('' outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():  # a process worker (runtime: processes)
            return ""
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return ""


WORKER_CLASSES: dict[str, type[EngineWorker] | type[EncodeWorker]] = {
    "encode": EncodeWorker,
    "prefill": PrefillWorker,
    "decode": DecodeWorker,
}
