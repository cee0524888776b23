"""Scheduler half of the KV connector: what to fetch, and when a request may run.

Owns the transfer state of requests as the engine's scheduler sees it, torch-free:

* reading (decode) side: a request that arrives with ``KvTransferParams`` waits in
  ``WAITING_FOR_REMOTE_KV``; once the scheduler has allocated its blocks
  (``on_blocks_allocated``) the load goes out in the next ``build_meta()``; the worker
  half's ``FinishedTransfers`` (``update_from_worker``) make it runnable (``may_run``) or
  failed (``failure``, blocks to be freed by the scheduler).
* serving (prefill) side: ``request_finished`` says whether a finished request's blocks
  stay held for a reader; ``update_from_worker`` lists the held requests whose lease
  ended, whose blocks the scheduler now frees.

Like vLLM's ``KVConnectorBase_V1`` scheduler role, it decides and never moves bytes; the
worker half (connector_worker.py) applies the metadata it builds. It must not import
the engine, torch or a transport.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from splitserve.errors import RequestAbortedError
from splitserve.kvtransfer.lease import LeaseEnd
from splitserve.kvtransfer.params import KvTransferParams
from splitserve.request import RequestStatus


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


@dataclasses.dataclass
class SchedulerUpdate:
    """What ``update_from_worker`` changed, for the engine's scheduler to act on."""

    ready: list[str] = dataclasses.field(default_factory=list)
    """Loads done: these requests may run (their prompt KV is in place)."""
    failed: dict[str, BaseException] = dataclasses.field(default_factory=dict)
    """Loads failed: free these requests' blocks and fail (or recompute) them."""
    free_held: list[str] = dataclasses.field(default_factory=list)
    """Serving side: leases ended, free these finished requests' blocks."""


@dataclasses.dataclass
class _Remote:
    params: KvTransferParams
    status: RequestStatus = RequestStatus.WAITING_FOR_REMOTE_KV
    local_block_ids: tuple[int, ...] | None = None
    issued: bool = False
    error: BaseException | None = None


class KvConnectorScheduler:
    """Transfer bookkeeping of one engine's scheduler. Single-threaded (the engine's)."""

    def __init__(self) -> None:
        self._remote: dict[str, _Remote] = {}
        self._held: set[str] = set()
        self._meta = KvConnectorMeta()

    # ------------------------------------------------------------------ reading side

    def add_remote_request(self, request_id: str, params: KvTransferParams) -> RequestStatus:
        """Admit a request whose prompt KV lives on another engine; its new status."""
        if request_id in self._remote:
            raise ValueError(f"request {request_id!r} is already waiting for remote KV")
        if params.request_id != request_id:
            raise ValueError(f"params are for {params.request_id!r}, not {request_id!r}")
        self._remote[request_id] = _Remote(params)
        return RequestStatus.WAITING_FOR_REMOTE_KV

    def num_blocks_needed(self, request_id: str) -> int:
        """Blocks to allocate before the load can start (one per remote block)."""
        return len(self._get(request_id).params.block_ids)

    def num_external_tokens(self, request_id: str) -> int:
        """Prompt tokens whose KV the load provides (count them as computed once it ends)."""
        return self._get(request_id).params.num_tokens

    def on_blocks_allocated(self, request_id: str, local_block_ids: Sequence[int]) -> None:
        """The scheduler allocated the blocks; the load goes out with the next ``build_meta``."""
        state = self._get(request_id)
        if len(local_block_ids) != len(state.params.block_ids):
            raise ValueError(
                f"request {request_id!r} needs {len(state.params.block_ids)} "
                f"blocks, got {len(local_block_ids)}"
            )
        if state.issued:
            raise ValueError(f"request {request_id!r} already has its blocks")
        state.local_block_ids, state.issued = tuple(local_block_ids), True
        self._meta.loads.append(LoadSpec(request_id, state.params, state.local_block_ids))

    def may_run(self, request_id: str) -> bool:
        """True once the request's remote KV is verified and in place (or it never had any)."""
        state = self._remote.get(request_id)
        return state is None or state.status == RequestStatus.RUNNING

    def status(self, request_id: str) -> RequestStatus:
        return self._get(request_id).status

    def failure(self, request_id: str) -> BaseException | None:
        return self._get(request_id).error

    def abort(self, request_id: str) -> None:
        """The engine aborted the request: stop its load, end its lease. Idempotent."""
        state = self._remote.pop(request_id, None)
        self._held.discard(request_id)
        waiting = state is not None and state.status == RequestStatus.WAITING_FOR_REMOTE_KV
        if waiting:
            self._meta.loads = [s for s in self._meta.loads if s.request_id != request_id]
        params = state.params if waiting and state is not None else None
        self._meta.aborts.append(AbortSpec(request_id, params))

    def forget(self, request_id: str) -> None:
        """The request left the engine; drop its transfer state."""
        self._remote.pop(request_id, None)

    # ------------------------------------------------------------------ serving side

    def request_finished(self, request_id: str, remote_decode: bool) -> bool:
        """A request finished here; True if its blocks must stay held for a remote reader.

        The worker half offers them (``KvConnectorWorker.offer``); they are freed when
        ``update_from_worker`` lists the request in ``free_held``.
        """
        if remote_decode:
            self._held.add(request_id)
        return remote_decode

    @property
    def num_held(self) -> int:
        return len(self._held)

    # ------------------------------------------------------------------ both

    def build_meta(self) -> KvConnectorMeta:
        """The loads to start and aborts to apply this step (each once)."""
        meta, self._meta = self._meta, KvConnectorMeta()
        meta.keepalive = [
            state.params
            for state in self._remote.values()
            if not state.issued and state.status == RequestStatus.WAITING_FOR_REMOTE_KV
        ]
        return meta

    def update_from_worker(self, finished: FinishedTransfers) -> SchedulerUpdate:
        """Fold in what the worker half reported; what the engine must do about it."""
        update = SchedulerUpdate()
        for request_id in finished.finished_recving:
            if self._set(request_id, RequestStatus.RUNNING, None):
                update.ready.append(request_id)
        for request_id, error in finished.failed_recving.items():
            status = (
                RequestStatus.FINISHED_ABORTED
                if isinstance(error, RequestAbortedError)
                else RequestStatus.FINISHED_ERROR
            )
            if self._set(request_id, status, error):
                update.failed[request_id] = error
        for request_id in finished.finished_sending:
            if request_id in self._held:
                self._held.discard(request_id)
                update.free_held.append(request_id)
        return update

    def _set(self, request_id: str, status: RequestStatus, error: BaseException | None) -> bool:
        state = self._remote.get(request_id)
        if state is None:
            return False  # aborted meanwhile: the engine already freed it
        state.status, state.error = status, error
        return True

    def _get(self, request_id: str) -> _Remote:
        state = self._remote.get(request_id)
        if state is None:
            raise KeyError(f"request {request_id!r} is not waiting for remote KV")
        return state
