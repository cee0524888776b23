"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Owns the waiting queue and the running list. Each step it gives every running
request its next tokens (one for decode, the next chunk for a long prefill)
under a token budget, preempting the most recently admitted requests when the
KV pool runs dry, then admits waiting requests while budget, sequence slots and
blocks last. It never touches tensors: the runner executes its plan.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.errors import RequestAbortedError
from splitserve.kvtransfer.connector_scheduler import (
    FinishedTransfers,
    KvConnectorMeta,
    KvConnectorScheduler,
)
from splitserve.request import RequestStatus
from splitserve.roles.engine.config import SchedulerConfig
from splitserve.roles.engine.kv_cache_manager import KVCacheManager
from splitserve.roles.engine.request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens [start, start + num_new_tokens)."""

    request: Request
    start: int
    num_new_tokens: int
    block_ids: list[int]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are used."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """The plan of one step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    kv_meta: KvConnectorMeta | None = None
    """Loads and aborts for the KV connector's worker half (disaggregated roles only)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides, step by step, which requests run and how many tokens each computes."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.connector: KvConnectorScheduler | None = None
        """Scheduler half of the KV connector; None for a standalone engine."""
        self.loading: dict[str, Request] = {}
        """Decode side: requests whose prompt KV is being pulled (WAITING_FOR_REMOTE_KV)."""
        self.held: dict[str, Request] = {}
        """Prefill side: handed-off requests whose blocks stay leased to a reader."""
        self.num_remote_fallbacks = 0

    # ------------------------------------------------------------------ queue

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def has_transfers(self) -> bool:
        return bool(self.loading or self.held)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if self.connector is not None:
            out.kv_meta = self.connector.build_meta()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate_or_preempt(req, num_new, out):
                break  # req itself was preempted: it was the last one
            out.scheduled.append(self._plan(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        while self.kv.allocate_slots(req, num_new) is None:
            victim = self.running.pop()  # lowest priority: the most recently admitted
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and self._num_seqs < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.remote_params is not None:
                if not self._admit_remote(req):
                    return
                continue
            hits, num_hit = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                return
            num_new = min(num_new, budget)
            if self.kv.allocate_slots(req, num_new, hits) is None:
                return
            self.waiting.popleft()
            self._admit(req, num_hit)
            out.scheduled.append(self._plan(req, num_new))
            budget -= num_new

    @property
    def _num_seqs(self) -> int:
        return len(self.running) + len(self.loading)

    def _admit_remote(self, req: Request) -> bool:
        """Allocate blocks for a request's remote prompt KV and start pulling what is not cached.

        Local prefix hits are kept (prefix caching works on the decode role too); only the
        rest is pulled. The pulled blocks are published in the prefix cache once verified.
        """
        params = req.remote_params
        hits, num_hit = self.kv.get_computed_blocks(req)
        num_hit = min(num_hit, (params.num_tokens // self.kv.block_size) * self.kv.block_size)
        hits = hits[: num_hit // self.kv.block_size]
        if self.kv.allocate_slots(req, params.num_tokens - num_hit, hits, cache=False) is None:
            return False
        self.waiting.popleft()
        req.num_cached_tokens = num_hit
        self.kv.record_prefix_lookup(req.num_tokens, num_hit)
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.loading[req.request_id] = req
        assert self.connector is not None
        skip = len(hits)
        if num_hit == params.num_tokens:  # all of it is cached here: release the remote copy
            self.connector.add_remote_request(req.request_id, params)
            self.connector.abort(req.request_id)
            self.loading[req.request_id] = req
            self._remote_ready(req.request_id)
            return True
        remote = params if skip == 0 else _skip_blocks(params, skip, self.kv.block_size)
        self.connector.add_remote_request(req.request_id, remote)
        self.connector.on_blocks_allocated(
            req.request_id, self.kv.get_block_ids(req.request_id)[skip:]
        )
        return True

    def update_transfers(self, finished: FinishedTransfers) -> list[Request]:
        """Fold in finished KV transfers. Returns requests that failed for good (aborted)."""
        if self.connector is None:
            return []
        update = self.connector.update_from_worker(finished)
        for request_id in update.ready:
            self._remote_ready(request_id)
        failed = []
        for request_id, error in update.failed.items():
            req = self._remote_failed(request_id, error)
            if req is not None:
                failed.append(req)
        for request_id in update.free_held:
            held = self.held.pop(request_id, None)
            if held is not None:
                self.kv.free(held)
        return failed

    def _remote_ready(self, request_id: str) -> None:
        req = self.loading.pop(request_id, None)
        if req is None:
            return
        assert self.connector is not None
        self.connector.forget(request_id)
        req.num_computed_tokens = req.remote_params.num_tokens
        self.kv.cache_blocks(req, req.num_computed_tokens)
        req.remote_params = None
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _remote_failed(self, request_id: str, error: BaseException) -> Request | None:
        """A load failed: an abort ends the request; anything else recomputes it locally."""
        req = self.loading.pop(request_id, None)
        if req is None:
            return None
        assert self.connector is not None
        self.connector.forget(request_id)
        if isinstance(error, RequestAbortedError):
            self.loading[request_id] = req  # finish() expects to find it
            return self.finish(request_id, RequestStatus.FINISHED_ABORTED)
        self.kv.free(req)  # nothing of the failed load was published in the prefix cache
        req.remote_params = None
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.num_remote_fallbacks += 1
        self.waiting.appendleft(req)
        return None

    def hand_off(self, request_id: str) -> Request | None:
        """Prefill side: finish the request but keep its blocks for a remote reader."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.running.remove(req)
        req.status = RequestStatus.FINISHED_LENGTH
        self.held[request_id] = req
        assert self.connector is not None
        self.connector.request_finished(request_id, True)
        return req

    def release_held(self, request_id: str) -> None:
        """Free a held request's blocks now (its hand-off could not be offered)."""
        held = self.held.pop(request_id, None)
        if held is not None:
            self.kv.free(held)

    def _admit(self, req: Request, num_hit: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
        req.num_computed_tokens = num_hit
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _plan(self, req: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(
            req, req.num_computed_tokens, num_new, self.kv.get_block_ids(req.request_id)
        )

    def _preempt(self, req: Request) -> None:
        """Free the request's KV and queue it first in line; it will recompute."""
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ update

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish requests that stop.

        Returns the requests that received a new token (finished ones included).
        """
        updated = []
        for item in out.scheduled:
            req = item.request
            if req.is_finished:
                continue  # aborted between schedule and update
            req.num_computed_tokens += item.num_new_tokens
            if not item.samples:
                continue  # a prefill chunk that does not reach the end yet
            req.append_token(sampled[req.request_id])
            status = req.check_stop(self.max_model_len)
            if status is not None:
                self.finish(req.request_id, status)
            updated.append(req)
        return updated

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (stop, length, abort): free its blocks and forget it."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif self.loading.pop(request_id, None) is not None:
            assert self.connector is not None
            self.connector.abort(request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
            if req.remote_params is not None and self.connector is not None:
                # never admitted: still tell the prefill side to end its lease now
                self.connector.add_remote_request(request_id, req.remote_params)
                self.connector.abort(request_id)
        req.status = status
        self.kv.free(req)
        return req


def _skip_blocks(params, skip: int, block_size: int):  # type: ignore[no-untyped-def]
    """The same transfer without its first ``skip`` blocks (they are cached locally)."""
    import dataclasses

    return dataclasses.replace(
        params,
        block_ids=params.block_ids[skip:],
        num_tokens=params.num_tokens - skip * block_size,
        checksums=[row[skip:] for row in params.checksums],
    )
