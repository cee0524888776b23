"""Backend: what the frontends (HTTP, gRPC) need from whatever serves tokens behind them.

The frontends validate, translate and stream; a ``Backend`` runs requests. Today the one
implementation is ``EngineBackend`` (one in-process ``AsyncEngine``); the cluster will add a
``ClusterBackend`` (router + prefill/decode workers) with the same contract, and the frontends
must not be able to tell them apart. This module must not import FastAPI or gRPC.

A backend must provide:

- ``model_id`` / ``max_model_len`` / ``tokenizer``: the served model, its context length, and a
  tokenizer with ``encode``, ``decode``, ``apply_chat_template(messages, add_generation_prompt)
  -> ids``, ``has_chat_template`` and ``eos_token_ids`` (``splitserve.roles.models.tokenizer``).
- ``generate(prompt, params, request_id)``: an async iterator of ``RequestOutput`` *deltas*
  (``outputs[i].text`` / ``.token_ids`` are the new part, ``outputs[i].index`` tells which of the
  ``n`` completions, ``finish_reason`` is set on each completion's last delta,
  ``RequestOutput.finished`` on the very last one; ``num_cached_tokens`` and ``metrics``
  timestamps ``arrival_time`` / ``first_token_time`` / ``finished_time`` are filled where known).
  Bad requests raise ``InvalidRequestError`` (with ``field``) from the iterator, before any
  delta; ``NoHealthyWorkerError`` and ``OverloadedError`` likewise. Closing the iterator early
  (client gone, deadline) must abort the request and free its KV everywhere.
- ``abort(request_id)``: stop a request from outside its stream; unknown ids are ignored.
- ``health()``: a ``BackendHealth`` (healthy, and how many live workers of each role).
- ``loads()``: one ``WorkerLoad`` per worker (queue, running, KV use, prefix-cache and
  preemption counters), read by ``/metrics`` and gRPC ``GetLoads``.
- ``close()``: release everything it started; called once, after the frontends drained.

``AdmissionBackend`` wraps any backend with a bound on requests in flight (overload is
refused with ``OverloadedError``, never queued without limit).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.errors import DuplicateRequestError, OverloadedError
from splitserve.outputs import RequestOutput
from splitserve.sampling_params import SamplingParams

PromptInput = str | Sequence[int] | dict[str, Any]
"""Text (tokenized by the backend), prompt token ids (chat templates are applied upstream), or
vLLM's multimodal dict ``{"prompt_token_ids": [...], "multi_modal_data": {"image": [...]}}``."""


@dataclass(frozen=True)
class BackendHealth:
    """Whether the backend can serve, and its live workers per role."""

    healthy: bool
    """True when every role a request needs has at least one healthy worker."""
    workers: dict[str, int] = field(default_factory=dict)
    """Role name (``engine``, ``prefill``, ``decode``, ``encode``) -> healthy worker count."""
    message: str = ""
    """Why it is unhealthy (empty when healthy)."""


@dataclass(frozen=True)
class WorkerLoad:
    """A snapshot of one worker's load and cumulative counters."""

    worker_id: str
    """Stable id of the worker (label ``worker`` in metrics)."""
    role: str
    """Role of the worker (label ``role`` in metrics)."""
    num_running: int = 0
    """Requests scheduled (prefilling or decoding)."""
    num_waiting: int = 0
    """Requests queued, not yet scheduled."""
    kv_usage: float = 0.0
    """Fraction of KV blocks in use, in [0, 1]."""
    num_free_blocks: int = 0
    """Free KV blocks (cached but unreferenced blocks count as free)."""
    num_blocks: int = 0
    """All KV blocks."""
    prefix_cache_queries: int = 0
    """Cumulative prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Cumulative prompt tokens found in the prefix cache."""
    num_preemptions: int = 0
    """Cumulative preemptions."""
    kv_transfer_bytes: int = 0
    """Cumulative KV bytes this worker pulled (decode role), verified."""
    kv_transfer_seconds: float = 0.0
    """Cumulative seconds of those pulls (start to verified and in place)."""
    kv_transfers: int = 0
    """Pulls that completed."""
    kv_transfer_failures: int = 0
    """Pulls that failed (checksum, lost peer, timeout); the request was recomputed."""
    encoder_cache_hits: int = 0
    """Images whose embeddings came from the encode worker's cache."""
    encoder_cache_misses: int = 0
    """Images the encode worker had to run its vision tower on."""
    spec_decode_num_drafts: int = 0
    """Speculative decoding: verify chunks run (one per speculating request per step)."""
    spec_decode_num_draft_tokens: int = 0
    """Draft tokens proposed and verified."""
    spec_decode_num_accepted_tokens: int = 0
    """Draft tokens the target model agreed with."""


def load_from_stats(worker_id: str, role: str, stats: dict[str, Any]) -> WorkerLoad:
    """A WorkerLoad from an engine's ``stats()`` dict (missing counters read as 0)."""
    return WorkerLoad(
        worker_id=worker_id,
        role=role,
        num_running=int(stats.get("num_running", 0)),
        num_waiting=int(stats.get("num_waiting", 0)),
        kv_usage=float(stats.get("kv_usage", 0.0)),
        num_free_blocks=int(stats.get("num_free_blocks", 0)),
        num_blocks=int(stats.get("num_blocks", 0)),
        prefix_cache_queries=int(stats.get("prefix_cache_queries", 0)),
        prefix_cache_hits=int(stats.get("prefix_cache_hits", 0)),
        num_preemptions=int(stats.get("num_preemptions", 0)),
        kv_transfer_bytes=int(stats.get("kv_transfer_bytes", 0)),
        kv_transfer_seconds=float(stats.get("kv_transfer_seconds", 0.0)),
        kv_transfers=int(stats.get("kv_transfers", 0)),
        kv_transfer_failures=int(stats.get("kv_transfer_failures", 0)),
        encoder_cache_hits=int(stats.get("encoder_cache_hits", 0)),
        encoder_cache_misses=int(stats.get("encoder_cache_misses", 0)),
        spec_decode_num_drafts=int(stats.get("spec_decode_num_drafts", 0)),
        spec_decode_num_draft_tokens=int(stats.get("spec_decode_num_draft_tokens", 0)),
        spec_decode_num_accepted_tokens=int(stats.get("spec_decode_num_accepted_tokens", 0)),
    )


def stage_seconds(metrics: dict[str, float]) -> dict[str, float]:
    """Per-stage seconds of a finished request (queue, encode, prefill, transfer, decode).

    The cluster puts them in the final output as ``<stage>_s``; a colocated engine's output
    has only timestamps, from which they follow (no transfer, no separate encode).
    """
    stages = {k[:-2]: v for k, v in metrics.items() if k.endswith("_s")}
    if stages or "first_scheduled_time" not in metrics:
        return stages
    scheduled = metrics["first_scheduled_time"]
    first = metrics.get("first_token_time", scheduled)
    return {"queue": scheduled - metrics["arrival_time"], "prefill": first - scheduled,
            "transfer": 0.0, "decode": metrics.get("finished_time", first) - first}


class Backend(abc.ABC):
    """The contract between the frontends and whatever runs requests (see the module doc)."""

    @property
    @abc.abstractmethod
    def model_id(self) -> str:
        """Served model name."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + output, in tokens."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The model's tokenizer (``splitserve.roles.models.tokenizer.Tokenizer`` interface)."""

    @property
    def kind(self) -> str:
        """What serves requests, for GetServerInfo (e.g. ``EngineBackend``)."""
        return type(self).__name__

    @property
    def image_token(self) -> str | None:
        """The model's image placeholder text (``<image>``); None for a text-only model."""
        config = getattr(self, "model_config", None)
        llava = getattr(config, "llava", None)
        if llava is None:
            return None
        return str(self.tokenizer.decode([llava.image_token_id], skip_special_tokens=False))

    @abc.abstractmethod
    def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; closing the iterator early aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request by id (no-op when unknown or finished)."""

    @abc.abstractmethod
    async def health(self) -> BackendHealth:
        """Health and live worker counts per role."""

    @abc.abstractmethod
    async def loads(self) -> list[WorkerLoad]:
        """Per-worker load snapshot."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything the backend started."""

    async def counters(self) -> tuple[str, dict[str, int]]:
        """(placement policy, cumulative counters such as ``route:<outcome>``); none here."""
        return "none", {}

    async def formats(self) -> dict[str, Any]:
        """Numeric formats served (dtype and why it was chosen, quantization, weight formats),
        for ``/version``; empty when unknown."""
        return {}


class EngineBackend(Backend):
    """One in-process ``AsyncEngine`` serving everything (role ``engine``, worker ``0``)."""

    role = "engine"

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._closed = False
        self._live: set[str] = set()
        """Request ids of live streams (touched on the frontend's loop only)."""

    @classmethod
    def from_config(cls, freeze_heap: bool = False, **engine_kwargs: Any) -> EngineBackend:
        """Start an AsyncEngine from ``EngineConfig`` fields (``model=...`` etc.);
        ``freeze_heap`` (a process that serves this engine for its life): see AsyncEngine."""
        from splitserve.roles.engine.async_engine import AsyncEngine

        return cls(AsyncEngine(freeze_heap=freeze_heap, **engine_kwargs))

    @property
    def model_id(self) -> str:
        return str(self.engine.model_id)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.engine.max_model_len)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self._generate(prompt if isinstance(prompt, str | dict) else list(prompt),
                              params, request_id)

    async def _generate(
        self, prompt: Any, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The engine's stream; a request id in use by a live request is refused (409)."""
        if request_id in self._live:
            raise DuplicateRequestError(
                f"request_id {request_id!r} is already in use by a live request")
        self._live.add(request_id)
        try:
            async for out in self.engine.generate(prompt, params, request_id=request_id):
                yield out
        finally:
            self._live.discard(request_id)

    @property
    def model_config(self) -> Any:
        return self.engine.engine.model_config

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def health(self) -> BackendHealth:
        alive = not self._closed and self.engine._thread.is_alive()
        message = "" if alive else "the engine thread is not running"
        return BackendHealth(alive, {self.role: int(alive)}, message)

    async def loads(self) -> list[WorkerLoad]:
        return [load_from_stats("0", self.role, self.engine.stats())]

    async def formats(self) -> dict[str, Any]:
        info = dict(self.engine.engine.info())  # fixed at start: safe from this thread
        info.pop("model_id", None)
        return info

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.shutdown()


class AdmissionBackend(Backend):
    """Admission control in front of any backend: at most ``max_in_flight`` requests at once.

    Beyond the bound ``generate`` raises ``OverloadedError`` before starting anything (HTTP
    429 with Retry-After, gRPC RESOURCE_EXHAUSTED), so queued work can never grow without
    bound. Counts live on the event loop that runs the frontends (no locks needed).
    """

    def __init__(self, inner: Backend, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.inner = inner
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def image_token(self) -> str | None:
        return self.inner.image_token

    def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self._admitted(prompt, params, request_id)

    async def _admitted(
        self, prompt: PromptInput, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.num_in_flight >= self.max_in_flight:
            raise OverloadedError(
                f"server busy: {self.num_in_flight} requests in flight (limit "
                f"{self.max_in_flight}); retry later"
            )
        self.num_in_flight += 1
        held = True
        inner = self.inner.generate(prompt, params, request_id)
        try:
            async for delta in inner:
                if delta.finished and held:  # done: the slot is free even if nobody reads on
                    held = False
                    self.num_in_flight -= 1
                yield delta
        finally:
            if held:
                self.num_in_flight -= 1
            await inner.aclose()  # type: ignore[attr-defined]

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def health(self) -> BackendHealth:
        return await self.inner.health()

    async def loads(self) -> list[WorkerLoad]:
        return await self.inner.loads()

    async def counters(self) -> tuple[str, dict[str, int]]:
        return await self.inner.counters()

    async def formats(self) -> dict[str, Any]:
        return await self.inner.formats()

    async def close(self) -> None:
        await self.inner.close()


class ClusterBackend(Backend):
    """The cluster (router + prefill/decode workers, on Ray or as processes) behind the frontends."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self._closed = False

    @classmethod
    def from_config(cls, config: Any) -> ClusterBackend:
        from splitserve.cluster.cluster import Cluster

        return cls(Cluster(config))

    @property
    def model_id(self) -> str:
        return str(self.cluster.model_id)

    @property
    def max_model_len(self) -> int:
        return int(self.cluster.max_model_len)

    @property
    def tokenizer(self) -> Any:
        return self.cluster.tokenizer

    def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self.cluster.astream(
            prompt if isinstance(prompt, str | dict) else list(prompt), params, request_id
        )

    @property
    def model_config(self) -> Any:
        return self.cluster.model_config

    async def abort(self, request_id: str) -> None:
        self.cluster.abort(request_id)

    async def health(self) -> BackendHealth:
        if self._closed:
            return BackendHealth(False, {}, "the cluster is shut down")
        status = await self._status()
        roles = dict(status["roles"])
        needed = [r for r, rc in self.cluster.config.roles.items() if rc.replicas > 0]
        missing = [r for r in needed if roles.get(r, 0) == 0]
        message = f"no healthy {', '.join(missing)} worker" if missing else ""
        return BackendHealth(not missing, roles, message)

    async def loads(self) -> list[WorkerLoad]:
        status = await self._status()
        return [
            load_from_stats(w["worker_id"], w["role"], w)
            for w in status["workers"] if w["healthy"]
        ]

    async def counters(self) -> tuple[str, dict[str, int]]:
        return str(self.cluster.config.router.policy), dict(self.cluster.counters)

    async def formats(self) -> dict[str, Any]:
        cfg = self.cluster.config  # each worker resolves dtype auto and reports its choice
        return {"dtype_requested": cfg.dtype, "quantization": cfg.quantization,
                "kv_cache_dtype_requested": cfg.kv_cache_dtype, **self.cluster.formats()}

    async def _status(self) -> dict[str, Any]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self.cluster.status)

    async def close(self) -> None:
        import asyncio

        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.shutdown)
