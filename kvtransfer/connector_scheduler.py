"""Scheduler half of the KV connector: every P/D decision of one engine's scheduler.

Owns the transfer state of requests from arrival to the end of their transfer, torch-free:

* KV sink (decode) side: a request that arrives with a remote KV source
  (``KvTransferParams``) is registered (``on_new_request``) and kept alive while it waits
  for blocks; at admission ``get_num_new_matched_tokens`` says how much of its prompt the
  local prefix cache already holds and how much the load provides; once the scheduler
  allocated the blocks (``update_state_after_alloc``) the request is parked here
  (``WAITING_FOR_REMOTE_KV``) and its load goes out with the next ``build_connector_meta``.
  ``update_from_worker`` hands it back ready to run, to recompute locally, or aborted.
* KV source (prefill) side: ``request_finished`` takes a handed-off request (``HANDED_OFF``)
  and keeps its blocks held for the remote reader; ``update_from_worker`` returns it once
  its lease ended, for the scheduler to free its blocks.
* Layer-wise streaming: a prefill request offered before its last forward
  (``on_stream_offered``) that ends without a hand-off is held too, its lease aborted, until
  no read sends from its blocks any more. A KV sink request with streamed params waits for
  two things, in either order: its load (verified) and the first token from the KV source
  (``first_token``); it runs, or recomputes, only once both are in.

The scheduler calls these hooks at a few points (admission, allocation, step end, finish),
the way vLLM's ``KVConnectorBase_V1`` scheduler role is called; it keeps the queues and
the blocks. This half decides and never moves bytes: the worker half
(connector_worker.py) applies the metadata it builds. It must not import the engine
(``splitserve.roles``), torch or a transport: requests come in as ``TransferRequest``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Generic, Protocol, TypeVar

from splitserve.errors import KVTransferError, RequestAbortedError
from splitserve.integrity import IntegrityReport
from splitserve.kvtransfer.lease import LeaseEnd
from splitserve.kvtransfer.params import KvTransferParams
from splitserve.request import RequestStatus


class TransferRequest(Protocol):
    """What this half reads and writes of an engine request (roles/engine/request.py)."""

    request_id: str
    status: RequestStatus
    num_computed_tokens: int
    remote_kv_source: KvTransferParams | None
    """KV sink side: where the prompt's KV is to be pulled from; None once pulled (or local)."""
    remote_kv_sink: bool
    """KV source side: a remote engine continues the request after its first token."""


R = TypeVar("R", bound=TransferRequest)


@dataclasses.dataclass
class FinishedTransfers:
    """What ended since the last ``get_finished``; each request id appears once, ever."""

    finished_sending: dict[str, LeaseEnd] = dataclasses.field(default_factory=dict)
    """Serving side: leases that ended (released, aborted, expired); free their blocks."""
    finished_recving: set[str] = dataclasses.field(default_factory=set)
    """Reading side: KV verified and in the local blocks; the request may run."""
    failed_recving: dict[str, BaseException] = dataclasses.field(default_factory=dict)
    """Reading side: loads that failed for good; free their blocks, fail (or recompute) them."""


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """One load for the worker half: pull ``params``' blocks into ``local_block_ids``."""

    request_id: str
    params: KvTransferParams
    local_block_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class AbortSpec:
    """Abort a request's transfers; ``params`` (reading side) lets the worker tell the server."""

    request_id: str
    params: KvTransferParams | None = None


@dataclasses.dataclass
class KvConnectorMeta:
    """What the worker half must do this step (``KvConnectorWorker.apply``)."""

    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    aborts: list[AbortSpec] = dataclasses.field(default_factory=list)
    keepalive: list[KvTransferParams] = dataclasses.field(default_factory=list)
    """Requests still waiting for blocks: their leases need heartbeats too (rate-limited)."""


@dataclasses.dataclass(frozen=True)
class RemoteMatch:
    """How a request with a remote KV source is admitted (``get_num_new_matched_tokens``)."""

    num_local_tokens: int
    """Leading prompt tokens whose blocks the local prefix cache holds and the request keeps
    (whole blocks, within the remote range)."""
    num_external_tokens: int
    """Tokens the load provides after them; 0 when everything is cached here."""

    def __post_init__(self) -> None:
        if self.num_local_tokens < 0 or self.num_external_tokens < 0:
            raise ValueError(f"negative token counts in {self}")


@dataclasses.dataclass
class SchedulerUpdate(Generic[R]):
    """What ``update_from_worker`` hands back to the scheduler (the requests left this half)."""

    ready: list[R] = dataclasses.field(default_factory=list)
    """Loads done: prompt KV in place, ``num_computed_tokens`` set; run them."""
    recompute: list[R] = dataclasses.field(default_factory=list)
    """Loads failed (not by an abort): free their blocks and prefill them locally."""
    aborted: list[R] = dataclasses.field(default_factory=list)
    """Loads ended by an abort (of the remote side): finish them as aborted."""
    failures: dict[str, BaseException] = dataclasses.field(default_factory=dict)
    """Why each recomputed or aborted load failed, by request id."""
    free_held: list[R] = dataclasses.field(default_factory=list)
    """Serving side: leases ended; free these handed-off requests' blocks."""


@dataclasses.dataclass
class _Remote(Generic[R]):
    """A KV sink request from arrival until its load ends."""

    request: R
    params: KvTransferParams
    """What to pull (without the blocks cached here, once admitted)."""
    num_tokens: int
    """Prompt tokens whose KV the request has once the load ends (cached + pulled)."""
    issued: bool = False
    """Blocks allocated and the load handed to the worker half (the request is loading)."""
    awaits_token: bool = False
    """Streamed params: the first token is still to come (``first_token``)."""
    no_token: bool = False
    """Streamed params whose KV source ended without a first token: recompute locally."""
    outcome: tuple[bool, BaseException | None] | None = None
    """Streamed params: the load ended (ok, error) before the first token came."""


class KvConnectorScheduler(Generic[R]):
    """Transfer bookkeeping of one engine's scheduler. Single-threaded (the engine's).

    Generic in the engine's request type, which it holds while the request is loading or
    held and hands back as is."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._remote: dict[str, _Remote[R]] = {}
        self._held: dict[str, R] = {}
        self._streaming: set[str] = set()
        """KV source side: requests whose KV was offered layer-wise, not handed off yet."""
        self._meta = KvConnectorMeta()
        self.num_remote_fallbacks = 0
        """Loads that failed for good and were recomputed locally instead."""

    # ------------------------------------------------------------------ views

    @property
    def loading(self) -> Mapping[str, R]:
        """KV sink side: requests whose prompt KV is being pulled (``WAITING_FOR_REMOTE_KV``)."""
        return {rid: s.request for rid, s in self._remote.items() if s.issued}

    @property
    def held(self) -> Mapping[str, R]:
        """KV source side: handed-off requests whose blocks stay held for a remote reader."""
        return dict(self._held)

    @property
    def num_loading(self) -> int:
        return sum(1 for s in self._remote.values() if s.issued)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def has_transfers(self) -> bool:
        """Loads in flight or blocks held for readers: the engine must keep stepping."""
        return self.num_loading > 0 or bool(self._held)

    # ------------------------------------------------------------------ KV sink side

    def on_new_request(self, request: R) -> None:
        """Register a request whose prompt KV lives on a remote KV source (others: no-op)."""
        params = request.remote_kv_source
        if params is None:
            return
        if request.request_id in self._remote:
            raise ValueError(f"request {request.request_id!r} already waits for remote KV")
        if params.request_id != request.request_id:
            raise ValueError(f"params are for {params.request_id!r}, not {request.request_id!r}")
        self._remote[request.request_id] = _Remote(
            request, params, params.num_tokens, awaits_token=params.stream_layers > 0
        )

    def first_token(self, request_id: str, has_token: bool) -> SchedulerUpdate[R]:
        """Layer-wise streaming, KV sink side: the KV source's first token was appended to
        the request (``has_token``), or the source ended without one (it died: the request
        recomputes here). What becomes runnable now (nothing while the load still runs)."""
        update: SchedulerUpdate[R] = SchedulerUpdate()
        state = self._remote.get(request_id)
        if state is None or not state.awaits_token:
            return update
        state.awaits_token, state.no_token = False, not has_token
        if state.outcome is not None:
            ok, error = state.outcome
            self._settle(request_id, ok, error, update)
        elif not state.issued and state.no_token:  # still queued: it becomes a local prompt
            del self._remote[request_id]
            state.request.remote_kv_source = None
            self._meta.aborts.append(AbortSpec(request_id, state.params))
            self.num_remote_fallbacks += 1
        return update

    def _settle(
        self, request_id: str, ok: bool, error: BaseException | None, update: SchedulerUpdate[R]
    ) -> None:
        """A load ended: run it, recompute it or abort it, unless (streamed) its first token
        is still to come; an abort of the remote side never waits."""
        state = self._remote[request_id]
        if state.awaits_token and not isinstance(error, RequestAbortedError):
            state.outcome = (ok, error)
            return
        if ok and not state.no_token:
            update.ready.append(self._make_ready(request_id))
            return
        if error is None:
            error = KVTransferError(f"request {request_id!r}: the KV source sent no first token")
        self._fail(request_id, error, update)

    def get_num_new_matched_tokens(
        self, request: R, num_local_tokens: int
    ) -> RemoteMatch | None:
        """How a waiting request is admitted, given its local prefix-cache hit; None when it
        has no remote KV source (the scheduler prefills it itself).

        Local hits are kept (prefix caching works on the KV sink too), cut to whole blocks
        of the remote range; only the rest is pulled."""
        state = self._remote.get(request.request_id)
        if state is None or state.issued:
            return None
        num_tokens = state.params.num_tokens
        whole = (num_tokens // self.block_size) * self.block_size
        num_local = min(num_local_tokens, whole)
        return RemoteMatch(num_local, num_tokens - num_local)

    def update_state_after_alloc(
        self, request: R, block_ids: Sequence[int], match: RemoteMatch
    ) -> bool:
        """The scheduler allocated ``block_ids`` (the whole remote range, cached blocks
        first); the request is loading from now on. True when nothing is left to pull:
        the request may run at once (the remote copy is released)."""
        state = self._get(request.request_id)
        if state.issued:
            raise ValueError(f"request {request.request_id!r} already has its blocks")
        skip = match.num_local_tokens // self.block_size
        if len(block_ids) != len(state.params.block_ids):
            raise ValueError(
                f"request {request.request_id!r} needs {len(state.params.block_ids)} "
                f"blocks, got {len(block_ids)}"
            )
        state.issued = True
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        if match.num_external_tokens == 0:
            self._meta.aborts.append(AbortSpec(request.request_id, state.params))
            if state.awaits_token:  # runs once its first token is in (``first_token``)
                state.outcome = (True, None)
                return False
            self._make_ready(request.request_id)
            return True
        state.params = _skip_blocks(state.params, skip, self.block_size)
        local = tuple(block_ids[skip:])
        self._meta.loads.append(LoadSpec(request.request_id, state.params, local))
        return False

    # ------------------------------------------------------------------ KV source side

    def on_stream_offered(self, request: R) -> None:
        """KV source side: the worker half leased the request's KV before the forward of its
        last prompt chunk (layer-wise streaming); readers may pull from now on."""
        self._streaming.add(request.request_id)

    @property
    def streaming(self) -> frozenset[str]:
        """KV source side: requests offered layer-wise that are still running here."""
        return frozenset(self._streaming)

    def request_finished(self, request: R) -> bool:
        """The request leaves the scheduler. True when this half keeps its blocks: it was
        handed off (``HANDED_OFF``) and a remote reader will pull them (the worker half
        offers them; ``update_from_worker`` returns it in ``free_held`` when the lease
        ends), or it was offered layer-wise and ends here (stop at its first token, abort):
        its lease is aborted and its blocks wait until no read sends from them. A KV sink
        request that is still waiting or loading is aborted: its load stops and the remote
        lease ends."""
        streamed = request.request_id in self._streaming
        self._streaming.discard(request.request_id)
        if request.status == RequestStatus.HANDED_OFF and request.remote_kv_sink:
            self._held[request.request_id] = request
            return True
        if streamed:
            self._held[request.request_id] = request
            self._meta.aborts.append(AbortSpec(request.request_id))
            return True
        state = self._remote.pop(request.request_id, None)
        if state is not None:
            self._meta.loads = [s for s in self._meta.loads if s.request_id != request.request_id]
            self._meta.aborts.append(AbortSpec(request.request_id, state.params))
        return False

    def release(self, request_id: str) -> R | None:
        """Drop a hold whose blocks could not be offered; the scheduler frees them now."""
        return self._held.pop(request_id, None)

    # ------------------------------------------------------------------ each step

    def build_connector_meta(self) -> KvConnectorMeta:
        """The loads to start, aborts to apply and leases to keep alive this step (each once)."""
        meta, self._meta = self._meta, KvConnectorMeta()
        meta.keepalive = [s.params for s in self._remote.values() if not s.issued]
        return meta

    def update_from_worker(self, finished: FinishedTransfers) -> SchedulerUpdate[R]:
        """Fold in what the worker half reported; the requests the scheduler takes back."""
        update: SchedulerUpdate[R] = SchedulerUpdate()
        for request_id in sorted(finished.finished_recving):
            if self._loading(request_id):
                self._settle(request_id, True, None, update)
        for request_id, error in finished.failed_recving.items():
            if self._loading(request_id):
                self._settle(request_id, False, error, update)
        for request_id in finished.finished_sending:
            held = self._held.pop(request_id, None)
            if held is not None:
                update.free_held.append(held)
        return update

    def _make_ready(self, request_id: str) -> R:
        state = self._remote.pop(request_id)
        state.request.num_computed_tokens = state.num_tokens
        state.request.remote_kv_source = None
        return state.request

    def _fail(self, request_id: str, error: BaseException, update: SchedulerUpdate[R]) -> None:
        """An abort ends the request; any other failure recomputes it locally (nothing of
        the failed load reached the prefix cache)."""
        request = self._remote.pop(request_id).request
        request.remote_kv_source = None
        update.failures[request_id] = error
        if isinstance(error, RequestAbortedError):
            self._meta.aborts.append(AbortSpec(request_id))  # forget its keep-alive state
            update.aborted.append(request)
        else:
            self.num_remote_fallbacks += 1
            update.recompute.append(request)

    # ------------------------------------------------------------------ integrity

    def check_integrity(self, waiting: Mapping[str, R]) -> IntegrityReport:
        """Against the scheduler's waiting queue: every waiting request with a remote KV
        source is registered here and not loading, every registered one not loading is
        waiting; loading requests are ``WAITING_FOR_REMOTE_KV``, held ones ``HANDED_OFF``."""
        report = IntegrityReport()
        queued = {rid for rid, r in waiting.items() if r.remote_kv_source is not None}
        registered = {rid for rid, s in self._remote.items() if not s.issued}
        for request_id in sorted(queued ^ registered):
            where = "connector" if request_id in registered else "scheduler"
            report.add(f"request {request_id!r} waits for remote KV only in the {where}'s view")
        for request_id, request in self.loading.items():
            if request.status != RequestStatus.WAITING_FOR_REMOTE_KV:
                report.add(f"loading request {request_id!r} has status {request.status.name}")
        for request_id, request in self._held.items():
            if request.status != RequestStatus.HANDED_OFF and not request.status.is_finished:
                report.add(f"held request {request_id!r} has status {request.status.name}")
        return report

    def _loading(self, request_id: str) -> bool:
        state = self._remote.get(request_id)
        return state is not None and state.issued  # else: aborted meanwhile, already freed

    def _get(self, request_id: str) -> _Remote[R]:
        state = self._remote.get(request_id)
        if state is None:
            raise KeyError(f"request {request_id!r} has no remote KV source")
        return state


def _skip_blocks(params: KvTransferParams, skip: int, block_size: int) -> KvTransferParams:
    """The same transfer without its first ``skip`` blocks (they are cached locally)."""
    if skip == 0:
        return params
    return dataclasses.replace(
        params,
        block_ids=params.block_ids[skip:],
        num_tokens=params.num_tokens - skip * block_size,
        checksums=[row[skip:] for row in params.checksums],
    )
