"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Owns the waiting queue and the running list. Each step it gives every running
request its next tokens (one for decode, the next chunk for a long prefill)
under a token budget, preempting the most recently admitted requests when the
KV pool runs dry, then admits waiting requests while budget, sequence slots and
blocks last. It never touches tensors: the runner executes its plan. Under priority
scheduling (``SchedulerConfig.policy``, vLLM's ``scheduling_policy="priority"``) the waiting
request of the lowest ``SamplingParams.priority`` value is admitted first, the running ones
are kept in priority order, and preemption takes the lowest priority first; fairness between
groups applies within a priority level.

On a disaggregated (P/D) role every transfer decision belongs to the KV connector's
scheduler half (kvtransfer/connector_scheduler.py), called at a few hooks: a new request
(``on_new_request``), admission (``get_num_new_matched_tokens``), allocation
(``update_state_after_alloc``), the step's plan (``build_connector_meta``), the worker's
report (``update_from_worker``) and a request leaving (``request_finished``). Requests
loading remote KV or handed off with their blocks held live there, not here.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field

from splitserve.integrity import IntegrityReport
from splitserve.kvtransfer.connector_scheduler import (
    FinishedTransfers,
    KvConnectorMeta,
    KvConnectorScheduler,
    RemoteMatch,
    SchedulerUpdate,
)
from splitserve.request import RequestStatus
from splitserve.roles.engine.block_pool import KVBlock
from splitserve.roles.engine.config import SchedulerConfig
from splitserve.roles.engine.kv_cache_manager import KVCacheManager
from splitserve.roles.engine.rejection_sampler import num_accepted
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.speculative import Speculator

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    """One request's share of a step: positions [start, start + num_new_tokens).

    With speculation, the last ``len(draft_token_ids)`` positions hold the draft (tokens not
    in the request yet): a verify chunk of k + 1 positions whose every row is sampled.
    """

    request: Request
    start: int
    num_new_tokens: int
    block_ids: list[int]
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_real_tokens(self) -> int:
        """Positions of this chunk that hold the request's own tokens (not drafts)."""
        return self.num_new_tokens - len(self.draft_token_ids)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are used."""
        return self.start + self.num_real_tokens == self.request.num_tokens

    @property
    def num_sample_rows(self) -> int:
        """Rows whose logits are sampled: the last one, or every row of a verify chunk."""
        return 1 + len(self.draft_token_ids) if self.samples else 0

    @property
    def is_decode(self) -> bool:
        """One new position per row over the request's cache (a decode or a verify chunk)."""
        return self.num_real_tokens == 1 and self.samples

    def input_token_ids(self) -> list[int]:
        """The chunk's input tokens: the request's own, then the draft."""
        own = self.request.all_token_ids[self.start : self.start + self.num_real_tokens]
        return own + self.draft_token_ids if self.draft_token_ids else own


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
        self.connector: KvConnectorScheduler[Request] | None = None
        """Scheduler half of the KV connector (a P/D role's loading and held requests live
        there); None for a standalone engine."""
        self.speculator: Speculator | None = None
        """Speculative decoding (draft proposals, acceptance counters); None when off."""
        self.num_fair_preemptions = 0
        """Sequences preempted so that a group below its fair share of slots could run."""

    # ------------------------------------------------------------------ queue

    def add_request(self, request: Request) -> None:
        if self.connector is not None:
            self.connector.on_new_request(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._num_loading)

    def has_transfers(self) -> bool:
        """Loads in flight or blocks held for remote readers (P/D roles)."""
        return self.connector is not None and self.connector.has_transfers()

    @property
    def _num_loading(self) -> int:
        return self.connector.num_loading if self.connector is not None else 0

    def _loading(self) -> list[Request]:
        if self.connector is None:
            return []
        return list(self.connector.loading.values())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self._by_priority:  # higher priority first: what runs short of KV preempts later
            self.running.sort(key=_priority)  # stable: admission order within a level
        self._share_seq_slots(out)
        budget, kv_short = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not kv_short:
            self._schedule_waiting(out, budget)
        if self.connector is not None:
            out.kv_meta = self.connector.build_connector_meta()
        return out

    # Fairness counts sequences, not requests: the ``n`` samples of one request form a
    # group, and while other groups wait for a slot no group holds more than its share of
    # ``max_num_seqs`` (split evenly over the groups that want slots). A short request
    # therefore runs at once beside a request with a large ``n``, instead of queueing behind
    # all of its samples.

    def _seqs_by_group(self) -> Counter[str]:
        return Counter(r.group_id for r in (*self.running, *self._loading()))

    def _share_seq_slots(self, out: SchedulerOutput) -> None:
        """Preempt (recompute later) sequences of groups above their fair share until the
        waiting groups below theirs have room."""
        if not self.waiting:
            return
        counts = self._seqs_by_group()
        waiting = Counter(r.group_id for r in self.waiting)
        share = max(1, self.config.max_num_seqs // len(set(counts) | set(waiting)))
        wanted = sum(min(share - counts[g], n) for g, n in waiting.items() if counts[g] < share)
        free = self.config.max_num_seqs - self._num_seqs
        while wanted > free:
            victim = self._victim(self.running, counts, above=share)
            if victim is None:
                return
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            counts[victim.group_id] -= 1
            self.num_fair_preemptions += 1
            free += 1

    @property
    def _by_priority(self) -> bool:
        return self.config.policy == "priority"

    def _victim(self, candidates: list[Request], counts: Counter[str],
                above: int = 0) -> Request | None:
        """The most recently admitted sequence of the group holding the most slots (only a
        group holding more than ``above``), or None; under priority scheduling, of the
        lowest priority (highest value) first."""
        def key(req: Request) -> tuple[int, int]:
            return (_priority(req) if self._by_priority else 0, counts[req.group_id])

        best: Request | None = None
        for req in reversed(candidates):
            if counts[req.group_id] > above and (best is None or key(req) > key(best)):
                best = req
        return best

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        """Schedule the running requests; (budget left, whether the KV pool ran short)."""
        num_decoding = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        i = 0
        kv_short = False
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = self._speculate(req, num_new, budget, num_decoding, len(self.running) - i)
            if not draft:
                allocated, short = self._allocate_or_preempt(i, num_new, out)
                kv_short = kv_short or short
                if not allocated:
                    break  # req itself was preempted: nothing after it is left
            out.scheduled.append(self._plan(req, num_new + len(draft), draft))
            budget -= num_new + len(draft)
            i += 1
        return budget, kv_short

    def _speculate(
        self, req: Request, num_new: int, budget: int, num_decoding: int, num_left: int
    ) -> list[int]:
        """Draft tokens to verify with a decoding request's next token, slots allocated for
        them; [] when it does not speculate (then nothing is allocated here).

        Never on a KV source (it hands off after one token) nor a prefill chunk; only when
        the pool keeps a block for each request still to schedule, so that drafts never
        cause a preemption.
        """
        if self.speculator is None or num_new != 1 or req.remote_kv_sink:
            return []
        draft = self.speculator.draft(req, budget - 1, num_decoding)
        if not draft:
            return []
        spare = self.kv.pool.num_free_blocks - self.kv.blocks_for(len(draft) + 1) - num_left
        if spare < 0 or self.kv.allocate_slots(req, 1 + len(draft)) is None:
            return []
        return draft

    def _allocate_or_preempt(self, i: int, num_new: int, out: SchedulerOutput) -> tuple[bool, bool]:
        """Room for ``running[i]``'s tokens, preempting requests not yet scheduled this step
        (the biggest group's newest first); (allocated, whether anything was preempted)."""
        req = self.running[i]
        preempted = False
        while self.kv.allocate_slots(req, num_new) is None:
            preempted = True
            victim = self._victim(self.running[i + 1 :], self._seqs_by_group()) or req
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is req:
                return False, True
        return True, preempted

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        counts = self._seqs_by_group()
        while self.waiting and budget > 0 and self._num_seqs < self.config.max_num_seqs:
            # first of the least served (of the highest priority, under priority scheduling)
            req = min(self.waiting, key=lambda r: (
                _priority(r) if self._by_priority else 0, counts[r.group_id]))
            hits, num_hit = self.kv.get_computed_blocks(req)
            match = self._remote_match(req, num_hit)
            if match is not None:  # its prompt KV comes from a remote KV source
                if not self._admit_loading(req, hits, match):
                    return
                counts[req.group_id] += 1
                continue
            num_new = req.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                return
            num_new = min(num_new, budget)
            if self.kv.allocate_slots(req, num_new, hits) is None:
                return
            self._take_waiting(req)
            self._admit(req, num_hit)
            counts[req.group_id] += 1
            out.scheduled.append(self._plan(req, num_new))
            budget -= num_new

    def _take_waiting(self, req: Request) -> None:
        if self.waiting[0] is req:
            self.waiting.popleft()
        else:
            self.waiting.remove(req)

    @property
    def _num_seqs(self) -> int:
        return len(self.running) + self._num_loading

    # ------------------------------------------------------------------ connector hooks

    def _remote_match(self, req: Request, num_hit: int) -> RemoteMatch | None:
        if self.connector is None:
            return None
        return self.connector.get_num_new_matched_tokens(req, num_hit)

    def _admit_loading(self, req: Request, hits: list[KVBlock], match: RemoteMatch) -> bool:
        """Allocate blocks for the remote range (keeping the matched local hits) and hand
        the request to the connector, which pulls the rest; False when blocks are short.
        The pulled blocks reach the prefix cache only once verified (``_run_loaded``)."""
        assert self.connector is not None
        hits = hits[: match.num_local_tokens // self.kv.block_size]
        if self.kv.allocate_slots(req, match.num_external_tokens, hits, cache=False) is None:
            return False
        self._take_waiting(req)
        req.num_cached_tokens = match.num_local_tokens
        self.kv.record_prefix_lookup(req.num_tokens, match.num_local_tokens)
        block_ids = self.kv.get_block_ids(req.request_id)
        if self.connector.update_state_after_alloc(req, block_ids, match):
            self._run_loaded(req)  # all of it was cached here
        return True

    def update_transfers(self, finished: FinishedTransfers) -> list[Request]:
        """Fold in the connector's finished transfers. Returns the requests they ended
        (aborted by the remote side), already finished here."""
        if self.connector is None:
            return []
        return self._apply_update(self.connector.update_from_worker(finished))

    def first_token(self, request_id: str, has_token: bool) -> list[Request]:
        """Layer-wise streaming, KV sink side: the KV source's first token arrived (already
        appended to the request), or never will; like ``update_transfers``."""
        if self.connector is None:
            return []
        return self._apply_update(self.connector.first_token(request_id, has_token))

    def _apply_update(self, update: SchedulerUpdate[Request]) -> list[Request]:
        for req in update.ready:
            self._run_loaded(req)
        for req in update.recompute:
            error = update.failures.get(req.request_id)
            logger.warning("KV load of %s failed, prefilling it here instead: %s: %s",
                           req.request_id, type(error).__name__, error)
            self._recompute(req)
        for req in update.free_held:
            self.kv.free(req)
        ended = (self.finish(r.request_id, RequestStatus.FINISHED_ABORTED) for r in update.aborted)
        return [req for req in ended if req is not None]

    def _run_loaded(self, req: Request) -> None:
        """Its prompt KV is in place (the connector set ``num_computed_tokens``): publish
        the blocks in the prefix cache and run it."""
        self.kv.cache_blocks(req, req.num_computed_tokens)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _recompute(self, req: Request) -> None:
        """A failed load: nothing of it was published; prefill the request here, first."""
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)

    def hand_off(self, request_id: str) -> Request | None:
        """KV-source side: the request leaves this engine (``HANDED_OFF``, not a finish
        reason) but the connector keeps its blocks held for the remote KV sink."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.running.remove(req)
        req.status = RequestStatus.HANDED_OFF
        if self.connector is None or not self.connector.request_finished(req):
            raise ValueError(f"request {request_id!r} has no remote KV sink to hand off to")
        return req

    def release_held(self, request_id: str) -> None:
        """Free a held request's blocks now (its hand-off could not be offered)."""
        held = self.connector.release(request_id) if self.connector is not None else None
        if held is not None:
            self.kv.free(held)

    def _admit(self, req: Request, num_hit: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
        req.num_computed_tokens = num_hit
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _plan(self, req: Request, num_new: int, draft: list[int] | None = None) -> ScheduledRequest:
        return ScheduledRequest(
            req, req.num_computed_tokens, num_new, self.kv.get_block_ids(req.request_id),
            draft or [],
        )

    def _preempt(self, req: Request) -> None:
        """Free the request's KV and queue it first in line; it will recompute."""
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ integrity

    def live_request_ids(self) -> set[str]:
        """Requests that may hold blocks: queued, running, loading, or held for a reader."""
        held = self.connector.held if self.connector is not None else {}
        return set(self.requests) | set(held)

    def check_integrity(self) -> IntegrityReport:
        """Each request is in exactly one queue with the matching status, waiting ones hold
        no blocks, running ones hold blocks for their computed tokens, the KV manager is
        consistent with these requests, and the connector's view matches."""
        report = IntegrityReport()
        self._check_queues(report)
        self._check_blocks(report)
        report.merge(self.kv.check_integrity(self.live_request_ids()))
        if self.connector is not None:
            waiting = {r.request_id: r for r in self.waiting}
            report.merge(self.connector.check_integrity(waiting))
        return report

    def _check_queues(self, report: IntegrityReport) -> None:
        held = self.connector.held if self.connector is not None else {}
        queues = {
            "waiting": ([r for r in self.waiting], (RequestStatus.WAITING, RequestStatus.PREEMPTED)),
            "running": (self.running, (RequestStatus.RUNNING,)),
            "loading": (self._loading(), (RequestStatus.WAITING_FOR_REMOTE_KV,)),
            "held": (list(held.values()), (RequestStatus.HANDED_OFF,)),
        }
        seen: Counter[str] = Counter()
        for name, (reqs, statuses) in queues.items():
            for req in reqs:
                seen[req.request_id] += 1
                if req.status not in statuses:
                    report.add(f"{name} request {req.request_id!r} has status {req.status.name}")
        for request_id in sorted(r for r, n in seen.items() if n > 1):
            report.add(f"request {request_id!r} is in more than one queue")
        queued = set(seen) - set(held)
        for request_id in sorted(queued ^ set(self.requests)):
            report.add(f"request {request_id!r} is known but queued nowhere (or the reverse)")
        for request_id in sorted(set(held) & set(self.requests)):
            report.add(f"held request {request_id!r} is still among the live requests")

    def _check_blocks(self, report: IntegrityReport) -> None:
        for req in self.waiting:
            held = self.kv.get_block_ids(req.request_id)
            if held:
                report.add(f"waiting request {req.request_id!r} holds {len(held)} blocks")
        for req in self.running:
            held = self.kv.get_block_ids(req.request_id)
            if len(held) < self.kv.blocks_for(req.num_computed_tokens):
                report.add(
                    f"running request {req.request_id!r} computed {req.num_computed_tokens} "
                    f"tokens into only {len(held)} blocks"
                )

    # ------------------------------------------------------------------ update

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish requests that stop.

        ``sampled``: per sampling request, the token drawn at each sampled row (one, or
        k + 1 for a verify chunk). Returns the requests that received new tokens (finished
        ones included).
        """
        updated = []
        for item in out.scheduled:
            req = item.request
            if req.is_finished:
                continue  # aborted between schedule and update
            req.num_computed_tokens += item.num_real_tokens
            if not item.samples:
                continue  # a prefill chunk that does not reach the end yet
            drawn = sampled[req.request_id]
            drawn = [drawn] if isinstance(drawn, int) else drawn
            draft = item.draft_token_ids
            accepted = num_accepted(draft, drawn) if draft else 0
            if draft and self.speculator is not None:
                self.speculator.record(req.request_id, len(draft), accepted)
            self._append(req, drawn[: accepted + 1])
            if item.draft_token_ids and not req.is_finished:
                self._roll_back(req)
            updated.append(req)
        return updated

    def _append(self, req: Request, tokens: list[int]) -> None:
        """Append tokens one by one, stopping at the first that ends the request. Each token
        after the first was a draft whose KV this step computed, so it counts as computed."""
        for i, token in enumerate(tokens):
            if i:
                req.num_computed_tokens += 1
            req.append_token(token)
            status = req.check_stop(self.max_model_len)
            if status is not None:
                self.finish(req.request_id, status)
                return

    def _roll_back(self, req: Request) -> None:
        """Free the blocks that only hold rejected drafts' KV. Their slots in kept blocks
        are rewritten before any read (attention stops at the context length), and no
        rejected token is ever in the request, so none reaches a block hash."""
        self.kv.trim(req, req.num_tokens)

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
        # a load stops, a remote lease ends; a request offered layer-wise keeps its blocks
        # until no read sends from them
        if self.connector is None or not self.connector.request_finished(req):
            self.kv.free(req)
        if self.speculator is not None:
            self.speculator.finish(req)
        return req


def _priority(req: Request) -> int:
    """A request's priority (``SamplingParams.priority``: lower runs first)."""
    return req.sampling_params.priority
