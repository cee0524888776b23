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

    # ------------------------------------------------------------------ queue

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

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
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
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
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        return req
