"""Cluster: the disaggregated deployment behind one Python object.

Owns the composition and the event loop: it builds the parts below, runs them on one
background asyncio loop ("splitserve-cluster") and bridges the public API onto it. The
parts, one concern each:

- `inputs.InputPreparer`: tokenize and validate prompts (images checked and hashed).
- `request_path.RequestPath`: place, encode, prefill, decode, replay, n-fan-out, abort.
- `flights.FlightTable`: the requests in progress.
- `membership.Membership`: the worker set, registry records, death and replacement.
- `health.HealthMonitor`: the health loop (stats, KV events to the router, heartbeats).
- `rebalancer.Rebalancer`: migrations off prefill hotspots.
- `scaling.Scaler`: scale a role, drain a worker, status.
- `planning.PlanningLoop`: the SLO planner's role flips (only with ``planner.enabled``).

Ray and the actors' lives are the launcher's (launcher.py). This module must not hold request
or worker logic itself.

Public API (``from splitserve import Cluster``)::

    with Cluster.local(prefill=1, decode=1) as cluster:
        outs = cluster.generate(["Hello"], SamplingParams(max_tokens=8))
        for delta in cluster.stream("Hi", SamplingParams(max_tokens=8)): ...
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import sys
import threading
from collections.abc import AsyncGenerator, Awaitable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.flights import FlightTable
from splitserve.cluster.health import HealthMonitor
from splitserve.cluster.inputs import InputPreparer, PreparedInput
from splitserve.cluster.launcher import Launcher, WorkerHandle
from splitserve.cluster.membership import Membership
from splitserve.cluster.planning import PlanningLoop
from splitserve.cluster.rebalancer import Rebalancer
from splitserve.cluster.registry import Registry, create_registry
from splitserve.cluster.request_path import RequestPath
from splitserve.cluster.scaling import Scaler, merged_formats
from splitserve.errors import ConfigError
from splitserve.offload import off_loop
from splitserve.outputs import EmbeddingRequestOutput, RequestOutput
from splitserve.roles.engine.structured import StructuredOutputManager
from splitserve.roles.llm import (
    _as_params_list,
    _as_prompt_inputs,
    embedding_outputs,
    embedding_params,
)
from splitserve.roles.models.loader import load_tokenizer
from splitserve.router.router import Router
from splitserve.router.schema import RouterConfig
from splitserve.sampling_params import PoolingParams, SamplingParams

T = TypeVar("T")


class Cluster:
    """Prefill and decode workers (Ray actors, or child processes with ``runtime: processes``),
    a router, a registry; generate / stream / abort."""

    def __init__(self, config: ClusterConfig | None = None, *, attach: bool = False) -> None:
        """Start the cluster described by ``config``; with ``attach``, connect to the workers
        that another handle started (see ``connect``)."""
        self.config = config or ClusterConfig.local()
        self.owner = not attach
        """Whether this handle started (and so stops) the workers."""
        self.counters: collections.Counter[str] = collections.Counter()
        """Router decisions by outcome, migrations, replaced workers (for status and metrics)."""
        self.flights = FlightTable()
        self.launcher: Launcher | None = None
        self.registry: Registry | None = None
        self.membership: Membership | None = None
        self._ids = itertools.count()
        self._id_prefix = f"cluster-{os.urandom(3).hex()}"
        """Internal request ids are ``<prefix>-<n>``: unique per handle, and across handles on
        the same workers (a client's id is only a label, see ``astream``)."""
        self._closed = False
        self._loops: list[Future[None]] = []
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

    @property
    def workers(self) -> dict[str, WorkerHandle]:
        """The worker handles by id (owned by the membership; read-only for callers)."""
        return self.membership.workers if self.membership is not None else {}

    def formats(self) -> dict[str, Any]:
        """The numeric formats the healthy workers reported at start (dtype chosen and why,
        quantization, weight formats; ``scaling.merged_formats``), as ``/version`` shows them."""
        return merged_formats(list(self.workers.values()))

    # ------------------------------------------------------------------ start / stop

    def _start(self) -> None:
        cfg = self.config
        self.model_id, self.model_config, self.tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
        self._grammars = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size)
        """Compiles (and caches) each request's output constraint before it is placed."""
        self.max_model_len = min(cfg.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.inputs = InputPreparer(self.model_id, self.model_config, self.tokenizer,
                                    self.max_model_len, cfg.block_size, cfg.max_n,
                                    cfg.scheduling_policy)
        self.registry = create_registry(cfg.registry.url, cfg.registry.heartbeat_timeout_s,
                                        prefix=cfg.ray.namespace)
        self.router = Router(cfg.router.policy, _router_config(cfg))
        self.launcher = Launcher(cfg)
        self.membership = Membership(cfg, self.router, self.registry, self.launcher,
                                     self.counters, owner=self.owner)
        self.requests = RequestPath(cfg, self.membership, self.flights, self.counters)
        self.health = HealthMonitor(cfg, self.membership)
        self.rebalancer = Rebalancer(cfg, self.membership, self.flights, self.counters)
        self.scaler = Scaler(cfg, self.membership, self.flights, self.counters, self.model_id)
        self.planning = (PlanningLoop(cfg, self.membership, self.scaler, self.counters)
                         if cfg.planner.enabled and self.owner else None)
        if self.owner:
            self._start_workers()
        else:
            self.membership.attach()
        loops = [self.health.run(), self.rebalancer.run()]
        if self.planning is not None:
            loops.append(self.planning.run())
        self._loops = [asyncio.run_coroutine_threadsafe(c, self._loop) for c in loops]

    def _start_workers(self) -> None:
        assert self.launcher is not None and self.membership is not None
        counts = {role: rc.replicas for role, rc in self.config.roles.items() if rc.replicas > 0}
        self.launcher.check_resources(counts)
        handles = [self.launcher.start(role) for role, n in counts.items() for _ in range(n)]
        self.launcher.wait_ready(handles)
        for handle in handles:
            self.membership.add(handle)

    def shutdown(self) -> None:
        """Stop every worker this cluster started (and Ray, if it started it)."""
        if self._closed:
            return
        self._closed = True
        if self.membership is not None:
            self.membership.closed = True
            self._wait_replacements(self.membership)
        with contextlib.suppress(Exception):  # loops and streams end before the workers go
            asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._loop).result(timeout=30)
        if self.membership is not None:
            self.membership.stop_all()
        if self.registry is not None:
            self.registry.close()
        if self.launcher is not None:
            self.launcher.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _wait_replacements(self, membership: Membership) -> None:
        """A worker being started must not outlive the cluster: wait for it (it then stops)."""
        if membership.replacing:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(
                    asyncio.wait(set(membership.replacing)), self._loop  # type: ignore[arg-type]
                ).result(timeout=120)

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order (as ``LLM.generate``)."""
        prompt_list = _as_prompt_inputs(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        ids = [self._new_id() for _ in prompt_list]
        inputs = [self.inputs.prepare(p, q)  # validate all before any starts
                  for p, q in zip(prompt_list, params, strict=True)]
        for p in params:
            self.inputs.check_params(p)
            self._grammars.compile(p)  # a bad or too slow constraint fails before placement
        return self._run(self.requests.generate_all(ids, inputs, params))

    def embed(
        self, prompts: Any, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *, truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in order (as ``LLM.embed``): computed by a prefill worker
        (or a decode worker prefilling a short prompt), never handed off."""
        prompt_list = _as_prompt_inputs(prompts)
        params = embedding_params(len(prompt_list), pooling_params, truncate_prompt_tokens)
        return embedding_outputs(self.generate(prompt_list, params))

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
    ) -> AsyncGenerator[RequestOutput, None]:
        """Async twin of ``stream`` for frontends; must run on any loop (bridged to ours).

        ``request_id`` is the client's label: outputs carry it and ``abort`` takes it, while
        the request runs under a unique id of the cluster's own. A label in use by a live
        request is refused (DuplicateRequestError: HTTP 409, gRPC ALREADY_EXISTS).
        """
        params = sampling_params or SamplingParams()
        inp = await off_loop(self.inputs.prepare, prompt, params)  # tokenizing: off the loop
        self.inputs.check_params(params)
        await asyncio.to_thread(self._grammars.compile, params)  # fails before placement
        internal = self._new_id()
        if request_id is not None:
            self.flights.claim(request_id, internal)
        try:
            async for out in self._bridge(internal, inp, params):
                out.request_id = request_id or internal
                yield out
        finally:
            if request_id is not None:
                self.flights.release(request_id, internal)

    async def _bridge(
        self, request_id: str, inp: PreparedInput, params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request path's stream, run on our loop and relayed to the caller's."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        caller = asyncio.get_running_loop()

        async def pump() -> None:
            try:
                async for out in self.requests.stream(request_id, inp, params):
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
                asyncio.run_coroutine_threadsafe(self.requests.abort(request_id), self._loop)

    def abort(self, request_id: str) -> None:
        """Stop the live request the client calls ``request_id`` (and its ``n`` children),
        wherever it runs; its workers free its KV blocks. Unknown ids are ignored."""
        internal = self.flights.resolve(request_id)
        if internal is not None:
            asyncio.run_coroutine_threadsafe(self.requests.abort(internal), self._loop)

    def status(self) -> dict[str, Any]:
        """Workers (role, health, KV usage, queues), healthy counts per role, the planner."""
        return self._run(self._status())

    async def _status(self) -> dict[str, Any]:
        status = await self.scaler.status()
        status["planner"] = self.planning.status() if self.planning else {"enabled": False}
        return status

    def scale(self, role: str, n: int, drain_timeout_s: float = 60.0) -> None:
        """Grow or shrink a role to ``n`` workers; removed workers are drained first."""
        self._run(self.scaler.scale(role, n, drain_timeout_s))

    def run_on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the cluster's loop and wait for its result (for tools/tests
        that need the parts' async methods, e.g. ``cluster.rebalancer.migrate``)."""
        return self._run(coro)

    # ------------------------------------------------------------------ plumbing

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def _run(self, coro: Awaitable[T]) -> T:
        if self._closed:
            if isinstance(coro, Coroutine):
                coro.close()
            raise RuntimeError("the cluster is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]


async def _cancel_tasks() -> None:
    """Cancel every task on the cluster's loop (health, rebalance, streams) and let them end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)


def _router_config(cfg: ClusterConfig) -> RouterConfig:
    return RouterConfig(
        ttft_slo_s=cfg.slo.ttft_ms / 1000.0,
        block_size=cfg.block_size,
        prefix_key_blocks=cfg.router.prefix_key_blocks,
        virtual_nodes=cfg.router.virtual_nodes,
        local_prefill_max_tokens=(sys.maxsize if cfg.colocated
                                  else int(cfg.router.local_prefill_max_tokens)),
        default_prefill_rate_tps=1_000.0,
        max_migrations_per_rebalance=cfg.router.max_migrations_per_rebalance,
    )
