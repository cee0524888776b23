"""Cluster: the disaggregated deployment behind one Python object.

Owns the frontend side of a request's way through (DESIGN.md): tokenize, validate,
resolve the seed, place with the router, prefill on a prefill worker (which leases the
prompt's KV), decode on a decode worker (which pulls it), stream the deltas, and replay
the request elsewhere from its prompt plus the tokens already streamed when a worker dies.
It also owns the workers' membership (registry, health loop, router instances) and
scaling. Ray and the actors' lives are the launcher's.

Public API (``from splitserve import Cluster``)::

    with Cluster.local(prefill=1, decode=1) as cluster:
        outs = cluster.generate(["Hello"], SamplingParams(max_tokens=8))
        for delta in cluster.stream("Hi", SamplingParams(max_tokens=8)): ...
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.launcher import Launcher, WorkerHandle
from splitserve.cluster.registry import (
    Registry,
    UnknownWorkerError,
    WorkerRecord,
    create_registry,
)
from splitserve.errors import ConfigError, InvalidRequestError, NoHealthyWorkerError
from splitserve.hashing import hash_block_tokens
from splitserve.outputs import RequestOutput
from splitserve.roles.engine.multimodal import (
    ImagePlaceholder,
    MultiModalInputs,
    check_data,
    expand_placeholders,
    split_prompt,
)
from splitserve.roles.engine.sampler import draw_seed
from splitserve.roles.llm import _as_params_list, _as_prompt_inputs, _merge
from splitserve.roles.models.image import image_hash, load_image
from splitserve.roles.models.loader import load_tokenizer
from splitserve.router.errors import NoInstanceAvailable
from splitserve.router.router import Router
from splitserve.router.schema import RouterConfig, RouteRequest
from splitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_WORKER_LOST = (RayActorError, ActorUnavailableError)
REPLACEMENT_WAIT_S = 120.0
"""How long a request whose role has no live worker left waits for a replacement to start."""


class WorkerLost(Exception):
    """The worker serving a request died; the request is placed again."""


@dataclasses.dataclass
class _Input:
    """A validated prompt: token ids (image placeholders expanded) and its images."""

    ids: list[int]
    images: list[Any] = dataclasses.field(default_factory=list)
    """The images as given (bytes, base64, data URL, PIL); the encode worker decodes them."""
    image_hashes: list[int] = dataclasses.field(default_factory=list)
    """Content hashes (of the decoded pixels, as the engines compute them)."""
    extra_keys: list[list[int]] | None = None
    """Per full block, the image hashes mixed into its block hash (routing = engines' hashes)."""


@dataclasses.dataclass
class _Flight:
    """A request in the cluster: where it runs and what it has streamed so far."""

    request_id: str
    tokens: list[int] = dataclasses.field(default_factory=list)
    workers: set[str] = dataclasses.field(default_factory=set)
    """Workers streaming it right now."""
    placed: set[str] = dataclasses.field(default_factory=set)
    """Workers it was placed on (a draining worker waits for these too)."""
    aborted: bool = False
    replays: int = 0
    prefill: str | None = None
    """The prefill worker it is queued or running on (None once prefilled)."""
    migrate_to: str | None = None
    """Set while the router moves it off a hotspot: its prefill stream ends by 'withdraw'."""
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per stage (queue, prefill, transfer, decode), from the workers' timestamps."""
    mm: dict[str, Any] | None = None
    """Image embeddings and hashes from the encode workers, for every worker it runs on."""


class Cluster:
    """Prefill and decode workers on Ray, a router, a registry; generate / stream / abort."""

    def __init__(self, config: ClusterConfig | None = None, *, attach: bool = False) -> None:
        """Start the cluster described by ``config``; with ``attach``, connect to the workers
        that another handle started (see ``connect``)."""
        self.config = config or ClusterConfig.local()
        self.owner = not attach
        """Whether this handle started (and so stops) the workers."""
        self.workers: dict[str, WorkerHandle] = {}
        self._flights: dict[str, _Flight] = {}
        self._ids = itertools.count()
        self._rng = random.Random()
        self._closed = False
        self._replacing: set[asyncio.Future[None]] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        """Router decisions by outcome, migrations, replaced workers (for status and metrics)."""
        self.launcher: Launcher | None = None
        self.registry: Registry | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitserve-cluster",
                                        daemon=True)
        self._thread.start()
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def connect(cls, config: ClusterConfig) -> Cluster:
        """A second handle on a running cluster: its workers come from the shared (Redis)
        registry and the same Ray cluster. Closing it leaves the workers running."""
        if not config.registry.url.startswith(("redis://", "rediss://")):
            raise ConfigError("registry: connecting to a running cluster needs a redis:// registry")
        return cls(config, attach=True)

    @classmethod
    def local(
        cls, prefill: int = 1, decode: int = 1, encode: int = 0, model: str | None = None,
        **overrides: Any,
    ) -> Cluster:
        """A CPU-mode cluster on this machine (local Ray, workers on custom resources)."""
        return cls(ClusterConfig.local(prefill, decode, encode, model, **overrides))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ start / stop

    def _start(self) -> None:
        cfg = self.config
        self.model_id, self.model_config, self.tokenizer = load_tokenizer(cfg.model)
        self.max_model_len = min(cfg.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.registry = create_registry(cfg.registry.url, cfg.registry.heartbeat_timeout_s,
                                        prefix=cfg.ray.namespace)
        self.router = Router(cfg.router.policy, RouterConfig(
            ttft_slo_s=cfg.slo.ttft_ms / 1000.0,
            block_size=cfg.block_size,
            prefix_key_blocks=cfg.router.prefix_key_blocks,
            virtual_nodes=cfg.router.virtual_nodes,
            local_prefill_max_tokens=cfg.router.local_prefill_max_tokens,
            default_prefill_rate_tps=1_000.0,
            max_migrations_per_rebalance=cfg.router.max_migrations_per_rebalance,
        ))
        self.launcher = Launcher(cfg)
        if not self.owner:
            self._attach_workers()
            self._health = asyncio.run_coroutine_threadsafe(self._health_loop(), self._loop)
            self._rebalancer = asyncio.run_coroutine_threadsafe(self._rebalance_loop(), self._loop)
            return
        counts = {role: rc.replicas for role, rc in cfg.roles.items() if rc.replicas > 0}
        self.launcher.check_resources(counts)
        handles = [self.launcher.start(role) for role, n in counts.items() for _ in range(n)]
        self.launcher.wait_ready(handles)
        for handle in handles:
            self._add_worker(handle)
        self._health = asyncio.run_coroutine_threadsafe(self._health_loop(), self._loop)
        self._rebalancer = asyncio.run_coroutine_threadsafe(self._rebalance_loop(), self._loop)

    def _attach_workers(self) -> None:
        """Handles on the workers the registry lists (started by another Cluster handle)."""
        assert self.registry is not None
        records = self.registry.list()
        if not records:
            raise NoHealthyWorkerError(
                f"registry {self.config.registry.url}: no live worker to connect to"
            )
        for record in records:
            actor = ray.get_actor(record.actor_name, namespace=record.namespace)
            handle = WorkerHandle(record.worker_id, record.role, actor, None)
            handle.info = ray.get(actor.info.remote(), timeout=30)
            self.workers[handle.worker_id] = handle
            self.router.add_instance(handle.worker_id, roles={handle.role},
                                     kv_capacity_blocks=handle.info.get("num_blocks") or None)

    def _add_worker(self, handle: WorkerHandle) -> None:
        self.workers[handle.worker_id] = handle
        self.router.add_instance(handle.worker_id, roles={handle.role},
                                 kv_capacity_blocks=handle.info.get("num_blocks") or None)
        self._register(handle)

    def _register(self, handle: WorkerHandle) -> None:
        assert self.registry is not None
        self.registry.register(WorkerRecord(
            worker_id=handle.worker_id, role=handle.role,
            actor_name=f"splitserve-{handle.worker_id}", namespace=self.config.ray.namespace,
            node_id=str(handle.info.get("node_id") or handle.info.get("host", "")),
            kv_address=handle.info.get("kv_address", ""),
            engine_id=handle.worker_id, status="ready",
        ))

    def shutdown(self) -> None:
        """Stop every worker this cluster started (and Ray, if it started it)."""
        if self._closed:
            return
        self._closed = True
        for task in (getattr(self, "_health", None), getattr(self, "_rebalancer", None)):
            if task is not None:
                task.cancel()
        if self._replacing:  # a worker being started must not outlive the cluster
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(
                    asyncio.wait(set(self._replacing)), self._loop  # type: ignore[arg-type]
                ).result(timeout=120)
        for handle in list(self.workers.values()):
            if self.launcher is not None and self.owner:
                self.launcher.stop(handle)
                if self.registry is not None:
                    with contextlib.suppress(Exception):
                        self.registry.deregister(handle.worker_id)
        self.workers.clear()
        if self.registry is not None:
            self.registry.close()
        if self.launcher is not None:
            self.launcher.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order (as ``LLM.generate``)."""
        prompt_list = _as_prompt_inputs(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        ids = [f"cluster-{next(self._ids)}" for _ in prompt_list]
        inputs = [self._prepare(p) for p in prompt_list]  # validate all before starting any
        return self._run(self._generate_all(ids, inputs, params))

    def stream(
        self, prompt: Any, sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield token deltas of one request as they arrive."""
        agen = self.astream(prompt, sampling_params, request_id)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    async def astream(
        self, prompt: Any, sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Async twin of ``stream`` for frontends; must run on any loop (bridged to ours)."""
        request_id = request_id or f"cluster-{next(self._ids)}"
        inp = self._prepare(prompt)
        params = sampling_params or SamplingParams()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        caller = asyncio.get_running_loop()

        async def pump() -> None:
            try:
                async for out in self._stream_request(request_id, inp, params):
                    caller.call_soon_threadsafe(queue.put_nowait, out)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                caller.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                caller.call_soon_threadsafe(queue.put_nowait, None)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it runs; its workers free its KV blocks."""
        asyncio.run_coroutine_threadsafe(self._abort(request_id), self._loop)

    def status(self) -> dict[str, Any]:
        """Workers (role, health, KV usage, queues) and healthy counts per role."""
        return self._run(self._status())

    def scale(self, role: str, n: int, drain_timeout_s: float = 60.0) -> None:
        """Grow or shrink a role to ``n`` workers; removed workers are drained first."""
        floor, ceiling = self.config.replica_bounds(role)
        if n < floor or (ceiling is not None and n > ceiling):
            raise ConfigError(
                f"roles.{role}: cannot scale to {n}; allowed {floor}..{ceiling or 'unbounded'}"
            )
        live = [h for h in self.workers.values()
                if h.role == role and h.healthy and not h.draining]
        if n > len(live):
            assert self.launcher is not None
            handles = [self.launcher.start(role) for _ in range(n - len(live))]
            self.launcher.wait_ready(handles)
            for h in handles:
                self._run(self._async(self._add_worker, h))
        for victim in live[n:][::-1]:
            self._run(self._drain(victim, drain_timeout_s))

    # ------------------------------------------------------------------ request path

    def _prepare(self, prompt: Any) -> _Input:
        """Tokenize and check a prompt the way an engine would, before placing it."""
        data = None
        if isinstance(prompt, dict):
            prompt, data = split_prompt(prompt, None)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", field="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt or [])
            vocab = self.model_config.vocab_size
            if not ids:
                raise InvalidRequestError("prompt must not be empty", field="prompt")
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {vocab})", field="prompt_token_ids"
                )
        inp = _Input(ids) if data is None else self._prepare_images(ids, data)
        if len(inp.ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(inp.ids)} tokens; max_model_len is {self.max_model_len}",
                "prompt",
            )
        return inp

    def _prepare_images(self, ids: list[int], data: Any) -> _Input:
        """Check and hash a multimodal prompt's images on the frontend (a malformed image
        fails here, before anything is placed) and expand its placeholders."""
        llava = self.model_config.llava
        if llava is None:
            raise InvalidRequestError(
                f"the model {self.model_id!r} is text-only; it takes no images",
                field="multi_modal_data",
            )
        kind, items = check_data(data)
        if kind != "image":
            raise InvalidRequestError(
                "the cluster takes images; its encode workers compute the embeddings",
                field="multi_modal_data.image_embeds",
            )
        hashes = [image_hash(load_image(x)) for x in items]
        n = llava.num_image_tokens
        ids, offsets = expand_placeholders(ids, llava.image_token_id, [n] * len(items))
        places = [ImagePlaceholder(o, n, h) for o, h in zip(offsets, hashes, strict=True)]
        bs = self.config.block_size
        extra = MultiModalInputs(places, []).block_extra_keys(0, len(ids) // bs, bs)
        return _Input(ids, list(items), hashes, extra)

    async def _generate_all(
        self, ids: list[str], inputs: list[_Input], params: list[SamplingParams]
    ) -> list[RequestOutput]:
        async def one(rid: str, inp: _Input, p: SamplingParams) -> RequestOutput:
            results: dict[str, RequestOutput] = {}
            async for delta in self._stream_request(rid, inp, p):
                _merge(results, delta)
            return results[rid]

        return list(await asyncio.gather(*(one(*a) for a in zip(ids, inputs, params, strict=True))))

    async def _stream_request(
        self, request_id: str, inp: _Input, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """All ``n`` samples of a request, merged into one stream of deltas."""
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        if params.n == 1:
            child = dataclasses.replace(params, seed=seed)
            async for out in self._stream_one(request_id, inp, child):
                yield out
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()
        children = [f"{i}_{request_id}" for i in range(params.n)]

        async def run(i: int, child_id: str) -> None:
            child = dataclasses.replace(params, n=1, seed=seed if i == 0 else draw_seed(seed, -i))
            try:
                async for out in self._stream_one(child_id, inp, child):
                    out.outputs[0].index = i
                    await queue.put(out)
            finally:
                await queue.put(i)

        tasks = [asyncio.ensure_future(run(i, c)) for i, c in enumerate(children)]
        done = 0
        try:
            while done < len(tasks):
                item = await queue.get()
                if isinstance(item, int):
                    done += 1
                    if tasks[item].exception() is not None:
                        raise tasks[item].exception()  # type: ignore[misc]
                    continue
                item.request_id = request_id
                item.finished = item.finished and done == len(tasks) - 1
                yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _stream_one(
        self, request_id: str, inp: _Input, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """One sample through (encode,) prefill then decode, replayed on another worker if one dies."""
        flight = self._flights[request_id] = _Flight(request_id)
        finished = False
        try:
            placement = self._place(request_id, inp, params)
            flight.placed = {placement.decode_instance, placement.prefill_instance or ""}
            prompt_ids = inp.ids
            flight.mm = await self._encode(flight, inp, placement.encode_instances)
            handoff: dict[str, Any] | None = None
            if not placement.skip_remote_prefill and placement.prefill_instance is not None:
                flight.prefill = placement.prefill_instance
                while flight.prefill is not None:
                    moved = False
                    try:
                        async for out in self._call(flight.prefill, flight, prompt_ids, params,
                                                    {"do_remote_decode": True}):
                            if _withdrawn(flight, out):
                                moved = True  # re-queued on migrate_to below; not the client's
                                break
                            handoff = out.kv_transfer_params
                            out.kv_transfer_params = None
                            if handoff is not None:
                                out.finished = False
                            if handoff is not None or out.finished:
                                _prefill_timing(flight.timing, out.metrics)
                            if out.finished:  # done at prefill (e.g. max_tokens=1)
                                out.metrics = {**out.metrics, **_stage_keys(flight.timing)}
                            finished = out.finished
                            yield out
                    except WorkerLost:
                        handoff = None  # the decode worker prefills (prompt + tokens so far)
                    flight.prefill, flight.migrate_to = (flight.migrate_to if moved else None), None
                    if flight.prefill is not None:
                        flight.placed.add(flight.prefill)
                self.router.on_prefill_done(request_id)
            if finished:
                return
            if flight.aborted:  # aborted between hand-off and decode
                finished = True
                yield _abort_output(request_id, prompt_ids)
                return
            decode = placement.decode_instance
            while True:
                try:
                    async for out in self._call(decode, flight, prompt_ids, params, handoff):
                        finished = out.finished
                        if finished:
                            _decode_timing(flight.timing, out.metrics, local=handoff is None)
                            out.metrics = {**out.metrics, **_stage_keys(flight.timing)}
                        yield out
                    return
                except WorkerLost:
                    handoff = None
                    flight.replays += 1
                    decode = await self._replacement("decode", flight)
        finally:
            self._flights.pop(request_id, None)
            self.router.on_finish(request_id)
            if not finished and not flight.aborted:
                await self._abort_flight(flight)

    def _place(self, request_id: str, inp: _Input, params: SamplingParams) -> Any:
        hashes = hash_block_tokens(inp.ids, self.config.block_size, extra_keys=inp.extra_keys)
        try:
            placement = self.router.route(RouteRequest(
                request_id, len(inp.ids), hashes, image_hashes=tuple(inp.image_hashes),
                max_output_tokens=params.max_tokens or 0,
            ))
        except NoInstanceAvailable as e:
            self.counters["route:no_instance"] += 1
            raise NoHealthyWorkerError(f"no healthy worker: {e}") from e
        self.counters[f"route:{_outcome(placement)}"] += 1
        return placement

    async def _encode(
        self, flight: _Flight, inp: _Input, instances: Sequence[str]
    ) -> dict[str, Any] | None:
        """Run the images through the encode workers the router chose (by content hash, so
        a repeated image hits that worker's embedding cache); None for a text prompt."""
        if not inp.images:
            return None
        start = time.monotonic()
        groups: dict[str, list[int]] = {}
        for i, worker_id in enumerate(instances):
            groups.setdefault(worker_id, []).append(i)
        outs = await asyncio.gather(*(
            self._encode_on(w, [inp.images[i] for i in idx], flight) for w, idx in groups.items()
        ))
        results: list[Any] = [None] * len(inp.images)
        for idx, out in zip(groups.values(), outs, strict=True):
            for i, r in zip(idx, out, strict=True):
                results[i] = r
        flight.timing["encode"] = time.monotonic() - start
        return {"image_embeds": [r["embeds"] for r in results],
                "image_hashes": [int(r["hash"]) for r in results]}

    async def _encode_on(self, worker_id: str, images: list[Any], flight: _Flight) -> list[Any]:
        """One encode worker's results; another encode worker takes over if it dies."""
        while True:
            handle = self.workers.get(worker_id)
            if handle is not None and handle.healthy:
                try:
                    return list(await handle.actor.encode.remote(images))
                except _WORKER_LOST as e:
                    logger.warning("encode worker %s lost: %s", worker_id, e)
                    self._mark_dead(worker_id)
            flight.replays += 1
            worker_id = await self._replacement("encode", flight)

    # ------------------------------------------------------------------ migration

    async def _rebalance_loop(self) -> None:
        """Move queued, not-started requests off hotspots, as the router decides."""
        while True:
            await asyncio.sleep(self.config.router.rebalance_interval_s)
            try:
                migrations = self.router.rebalance() if self._flights else []
            except Exception:  # noqa: BLE001 - a router bug must not stop serving
                logger.exception("rebalance failed")
                continue
            for m in migrations:
                await self._migrate(m)

    async def _migrate(self, m: Any) -> None:
        """Withdraw the request from ``m.source`` if it is still untouched there; its prefill
        loop then re-issues it on ``m.target``. Otherwise it stays, and the router is told."""
        flight = self._flights.get(m.request_id)
        source = self.workers.get(m.source)
        target = self.workers.get(m.target)
        ok = False
        if (flight is not None and flight.prefill == m.source and flight.migrate_to is None
                and not flight.aborted and source is not None and source.healthy
                and target is not None and target.healthy and not target.draining):
            flight.migrate_to = m.target
            try:
                ok = bool(await source.actor.withdraw.remote(m.request_id))
            except Exception:  # noqa: BLE001 - a dead source is handled by the stream
                ok = False
            if not ok and flight.migrate_to == m.target:
                flight.migrate_to = None
        if ok:
            self.counters["route:migrated"] += 1
            return
        with contextlib.suppress(Exception):
            self.router.on_prefill_start(m.request_id, m.source)  # started there: it stays

    async def _call(
        self, worker_id: str, flight: _Flight, prompt_ids: list[int], params: SamplingParams,
        kv_transfer_params: dict[str, Any] | None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one worker's deltas for the flight; raises WorkerLost if it dies."""
        handle = self.workers.get(worker_id)
        if handle is None or not handle.healthy:
            raise WorkerLost(worker_id)
        flight.workers.add(worker_id)
        gen = handle.actor.generate.remote(
            flight.request_id, prompt_ids, params, kv_transfer_params, list(flight.tokens),
            flight.mm,
        )
        try:
            async for ref in gen:
                out: RequestOutput = await ref
                flight.tokens.extend(out.outputs[0].token_ids)
                yield out
        except _WORKER_LOST as e:
            logger.warning("worker %s lost during %s: %s", worker_id, flight.request_id, e)
            self._mark_dead(worker_id)
            raise WorkerLost(worker_id) from e
        finally:
            flight.workers.discard(worker_id)

    async def _replacement(self, role: str, flight: _Flight) -> str:
        """Another healthy worker of ``role`` for a request whose worker died; when none is
        left but a replacement is starting (``replace_failed``), the request waits for it."""
        deadline = time.monotonic() + REPLACEMENT_WAIT_S
        while flight.replays <= 8 and not flight.aborted:
            healthy = [h.worker_id for h in self.workers.values()
                       if h.role == role and h.healthy and not h.draining]
            if healthy:
                return min(healthy,
                           key=lambda w: sum(w in f.workers for f in self._flights.values()))
            left = deadline - time.monotonic()
            if not self._replacing or left <= 0:
                break
            await asyncio.wait(set(self._replacing), timeout=left)
        raise NoHealthyWorkerError(f"no healthy {role} worker left for {flight.request_id}")

    async def _abort(self, request_id: str) -> None:
        ids = [request_id] + [r for r in self._flights if r.endswith(f"_{request_id}")]
        for rid in ids:
            flight = self._flights.get(rid)
            if flight is not None:
                flight.aborted = True
                await self._abort_flight(flight)

    async def _abort_flight(self, flight: _Flight) -> None:
        for worker_id in list(flight.workers) or list(self.workers):
            handle = self.workers.get(worker_id)
            if handle is not None and handle.healthy:
                with contextlib.suppress(Exception):
                    await handle.actor.abort.remote(flight.request_id)

    # ------------------------------------------------------------------ membership

    def _mark_dead(self, worker_id: str) -> None:
        handle = self.workers.get(worker_id)
        if handle is None or not handle.healthy:
            return
        handle.healthy = False
        with contextlib.suppress(Exception):
            ray.kill(handle.actor, no_restart=True)  # a half-dead actor must not linger
        with contextlib.suppress(Exception):
            self.router.remove_instance(worker_id)
        if self.registry is not None:
            with contextlib.suppress(Exception):
                self.registry.deregister(worker_id)
        if self.owner and not self._closed and not handle.draining \
                and self.config.role(handle.role).replace_failed:
            task = asyncio.ensure_future(self._replace(handle))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self, dead: WorkerHandle) -> None:
        """Start a new worker for one that died, so the role keeps its replica count."""
        assert self.launcher is not None
        launcher = self.launcher

        def start() -> WorkerHandle:
            handle = launcher.start(dead.role)
            try:
                launcher.wait_ready([handle])
            except BaseException:
                launcher.stop(handle)
                raise
            return handle

        try:
            handle = await asyncio.get_running_loop().run_in_executor(None, start)
        except Exception:  # noqa: BLE001 - e.g. no resources left: serve with fewer workers
            logger.exception("could not replace %s worker %s", dead.role, dead.worker_id)
            return
        if self._closed:
            launcher.stop(handle)
            return
        self._add_worker(handle)
        self.counters["workers_replaced"] += 1
        logger.warning("replaced dead %s worker %s by %s", dead.role, dead.worker_id,
                       handle.worker_id)

    async def _health_loop(self) -> None:
        interval = self.config.registry.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            for handle in list(self.workers.values()):
                if handle.healthy:
                    await self._check(handle)

    async def _check(self, handle: WorkerHandle) -> None:
        timeout = self.config.registry.heartbeat_timeout_s
        try:
            stats = await asyncio.wait_for(_aref(handle.actor.stats.remote()), timeout)
            events = await asyncio.wait_for(_aref(handle.actor.kv_events.remote()), timeout)
        except _WORKER_LOST:
            self._mark_dead(handle.worker_id)
            return
        except TimeoutError:
            self._suspect(handle)
            return
        if handle.suspect_since is not None:  # busy, not dead: place on it again
            handle.suspect_since = None
            with contextlib.suppress(Exception):
                self.router.set_healthy(handle.worker_id, not handle.draining)
        handle.info["stats"] = stats
        for kind, hashes in events:
            with contextlib.suppress(Exception):
                if kind == "stored":
                    self.router.on_kv_stored(handle.worker_id, hashes)
                else:
                    self.router.on_kv_removed(handle.worker_id, hashes)
        with contextlib.suppress(Exception):
            used = int(stats["num_blocks"] - stats["num_free_blocks"])
            self.router.report_kv_usage(handle.worker_id, used)
        self._heartbeat(handle, stats)

    def _heartbeat(self, handle: WorkerHandle, stats: dict[str, Any]) -> None:
        """Refresh the worker's registry record; re-register it if the registry dropped it."""
        if self.registry is None:
            return
        load = {"num_waiting": int(stats.get("num_waiting", 0)),
                "num_running": int(stats.get("num_running", 0)),
                "kv_usage": float(stats.get("kv_usage", 0.0)),
                "num_free_blocks": int(stats.get("num_free_blocks", 0))}
        try:
            self.registry.heartbeat(handle.worker_id, **load)
        except UnknownWorkerError:
            self._register(handle)
        except Exception:  # noqa: BLE001 - a registry hiccup must not stop the health loop
            logger.exception("registry heartbeat failed for %s", handle.worker_id)

    def _suspect(self, handle: WorkerHandle) -> None:
        """A missed heartbeat: no new placements; dead after three timeouts in a row.

        A worker busy with a long step can miss one; a dead process is usually reported by
        Ray at once (RayActorError), so this only catches hangs.
        """
        now = time.monotonic()
        if handle.suspect_since is None:
            logger.warning("worker %s missed its heartbeat", handle.worker_id)
            handle.suspect_since = now
            with contextlib.suppress(Exception):
                self.router.set_healthy(handle.worker_id, False)
        elif now - handle.suspect_since > 3 * self.config.registry.heartbeat_timeout_s:
            logger.error("worker %s unresponsive: declared dead", handle.worker_id)
            self._mark_dead(handle.worker_id)

    async def _drain(self, handle: WorkerHandle, timeout_s: float) -> None:
        """Stop placing on a worker, wait for its requests and leases, then stop it."""
        handle.draining = True
        with contextlib.suppress(Exception):
            self.router.set_healthy(handle.worker_id, False)
        if self.registry is not None:
            with contextlib.suppress(Exception):
                self.registry.set_status(handle.worker_id, "draining")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                stats = await asyncio.wait_for(_aref(handle.actor.stats.remote()), 5.0)
            except Exception:  # noqa: BLE001 - dead: nothing left to drain
                break
            busy = any(handle.worker_id in f.workers | f.placed for f in self._flights.values())
            if not busy and all(stats.get(k, 0) == 0 for k in (
                    "num_running", "num_waiting", "num_held_kv", "num_loading_kv")):
                break
            await asyncio.sleep(0.1)
        self._mark_dead(handle.worker_id)
        self.workers.pop(handle.worker_id, None)
        assert self.launcher is not None
        await asyncio.get_running_loop().run_in_executor(None, self.launcher.stop, handle)

    async def _status(self) -> dict[str, Any]:
        workers = []
        for h in list(self.workers.values()):
            stats: dict[str, Any] = {}
            if h.healthy:
                with contextlib.suppress(Exception):
                    stats = await asyncio.wait_for(_aref(h.actor.stats.remote()), 5.0)
            workers.append({
                "worker_id": h.worker_id, "role": h.role, "healthy": h.healthy,
                "draining": h.draining, "kv_address": h.info.get("kv_address", ""),
                "node_id": h.info.get("node_id", ""), **stats,
            })
        roles: dict[str, int] = {}
        for w in workers:
            if w["healthy"] and not w["draining"]:
                roles[w["role"]] = roles.get(w["role"], 0) + 1
        return {"model": self.model_id, "workers": workers, "roles": roles,
                "num_requests": len(self._flights), "policy": self.config.router.policy,
                "counters": dict(self.counters)}

    # ------------------------------------------------------------------ plumbing

    def _run(self, coro: Any) -> Any:
        if self._closed:
            raise RuntimeError("the cluster is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @staticmethod
    async def _async(fn: Any, *args: Any) -> Any:
        return fn(*args)


def _abort_output(request_id: str, prompt_ids: list[int]) -> RequestOutput:
    from splitserve.outputs import CompletionOutput

    return RequestOutput(request_id, None, prompt_ids,
                         [CompletionOutput(0, "", [], finish_reason="abort")], True)


async def _aref(ref: Any) -> Any:
    return await ref


def _outcome(placement: Any) -> str:
    """How the router placed a request, for ``router_decisions_total{outcome}``."""
    if placement.skip_remote_prefill:
        return "local_prefill"
    if placement.fallback:
        return "load_fallback"
    return "prefix_hit" if placement.cached_tokens > 0 else "prefix_miss"


def _withdrawn(flight: _Flight, out: RequestOutput) -> bool:
    """The prefill stream ended because the request was withdrawn for a migration."""
    return (flight.migrate_to is not None and not flight.aborted and out.finished
            and out.outputs[0].finish_reason == "abort")


def _prefill_timing(timing: dict[str, float], m: dict[str, float]) -> None:
    """Queue and prefill seconds from the prefill worker's timestamps (its own clock)."""
    if "first_scheduled_time" in m:
        timing["queue"] = m["first_scheduled_time"] - m["arrival_time"]
        timing["prefill"] = m.get("first_token_time", m["first_scheduled_time"]) \
            - m["first_scheduled_time"]


def _decode_timing(timing: dict[str, float], m: dict[str, float], local: bool) -> None:
    """Transfer and decode seconds from the decode worker's timestamps; with ``local`` the
    decode worker also prefilled (conditional disaggregation, or a recompute after a fault)."""
    if "kv_load_start_time" in m and "kv_load_end_time" in m:
        timing["transfer"] = m["kv_load_end_time"] - m["kv_load_start_time"]
    start = m.get("kv_load_end_time", m.get("first_scheduled_time", m["arrival_time"]))
    if local and "first_scheduled_time" in m:
        timing.setdefault("queue", 0.0)
        timing["queue"] += m["first_scheduled_time"] - m["arrival_time"]
        start = m.get("first_token_time", m["first_scheduled_time"])
        timing["prefill"] = timing.get("prefill", 0.0) + start - m["first_scheduled_time"]
    timing["decode"] = max(m.get("finished_time", start) - start, 0.0)


def _stage_keys(timing: dict[str, float]) -> dict[str, float]:
    """Stage seconds as output metrics keys (``queue_s``, ``prefill_s``, ...)."""
    return {f"{k}_s": v for k, v in timing.items()}
