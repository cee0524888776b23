"""Per-instance load as the router sees it: what it placed, what started, what finished.

Owns: queued prefill tokens (FIFO of requests not yet started), the prefill in
progress, running requests, decode KV reservations, and each instance's measured
prefill rate. Updated only at the request events (add, prefill start, prefill
done, finish), migrations and instance add/remove. Must not: know about prefixes
(the ``PrefixIndex`` does) or choose instances (the policies do).

Predicted TTFT of a request at an instance is
``(queued work + what is left of the prefill in progress + the request's work) / measured rate``,
where the work of ``n`` uncached tokens after ``c`` cached ones is ``n + kappa * n * (c + n / 2)``
token-equivalents: the tokens themselves plus causal attention over the context.
``kappa`` is learned online from the measured times of prefills that ran alone (nothing else in
progress on their instance from start to end; least squares over all
instances, with forgetting); until enough long prefills were seen it is 0, and the
prediction is plain queued tokens over measured tokens/s. The measured rate is per
instance (token-equivalents/s), so slow and fast instances are told apart.

An engine batches prefills (chunked prefill packs several prompts into one step), so a
request's own start-to-done time also holds its batch-mates' work. The rate is therefore
learned from the instance's completions: each one is charged the time since the previous
completion there (or since its own start, if later), and completions at the same moment
(within ``GROUP_S``) are one sample of their summed work, so the samples partition the busy
time and their mean is the instance's throughput.

An instance that has not finished a prefill yet has no rate of its own; it takes the rate the
learned instances imply for it: its given (or default) rate times the ratio of their learned
rates to their given ones. The units of the rate follow ``kappa`` (token-equivalents), so a
rate left at its starting value once ``kappa`` is learned would make an idle instance look
many times slower than it is, and no placement by predicted TTFT would ever reach it to teach
it otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from splitserve.router.errors import UnknownInstanceError


@dataclass(slots=True)
class InstanceLoad:
    """One instance's load. Mutated only by ``LoadTracker``."""

    instance_id: str
    prefill_rate_tps: float
    """Moving average of measured prefill token-equivalents per second; until the instance's
    first sample, its ``given_rate_tps`` scaled like the learned instances' rates."""
    kv_capacity_blocks: int
    num_queued_prefill_tokens: int = 0
    """Uncached prompt tokens of requests placed here whose prefill has not started."""
    queued_prefill_work: float = 0.0
    """Their work in token-equivalents (see the module docstring)."""
    num_running_requests: int = 0
    """Requests placed here (as prefill or decode) that have not finished."""
    num_active_prefill_blocks: int = 0
    """Prompt blocks, cached or not, of requests queued or prefilling here (Dynamo's active)."""
    num_reserved_kv_blocks: int = 0
    """Decode KV blocks reserved by requests placed here to decode."""
    num_reported_kv_blocks: int = 0
    """KV blocks in use as last reported by the instance itself."""
    num_prefilled_tokens: int = 0
    """Uncached prompt tokens this instance has finished prefilling (for imbalance figures)."""
    given_rate_tps: float = 0.0
    """The rate it joined with (a hint: 0 means ``prefill_rate_tps`` at construction)."""
    num_rate_samples: int = 0
    """Rate samples learned from its own completions."""
    queue: OrderedDict[str, int] = field(default_factory=OrderedDict)
    """Requests placed here and not started, in placement order: request_id -> uncached tokens."""
    prefill_started_at: float = 0.0
    """Clock time the prefill in progress started (valid while ``prefill_tokens_in_progress``)."""
    prefill_tokens_in_progress: int = 0
    """Uncached tokens of the prefill(s) in progress."""
    prefill_work_in_progress: float = 0.0
    """What was left of their work (token-equivalents) at ``prefill_started_at``."""
    in_progress: dict[str, float] = field(default_factory=dict)
    """The started prefills themselves, in start order: request_id -> work."""
    last_prefill_done_at: float = float("-inf")
    """When the last prefill here finished (rate samples are charged time from there)."""
    rate_before_sample: float = 0.0
    """The rate before the last sample (a completion at the same moment re-does that sample)."""
    sample_work: float = 0.0
    """Work of the completions in the last sample."""
    sample_tokens: int = 0
    """Their uncached tokens."""
    sample_elapsed_s: float = 0.0
    """Seconds the last sample was charged."""

    def pending_prefill_work(self, now: float) -> float:
        """Work (token-equivalents) still to do before a newly queued request could start."""
        return self.queued_prefill_work + self.remaining_work_in_progress(now)

    def remaining_work_in_progress(self, now: float) -> float:
        """What is left of the prefill in progress, from its expected speed.

        Past its expected end the prefill is overdue (a stall, a slow instance): it is then
        assumed to need as long again as it has overrun, so a stuck instance looks ever
        busier instead of idle, and new work and migrations go elsewhere.
        """
        if self.prefill_tokens_in_progress <= 0:
            return 0.0
        return abs(
            self.prefill_work_in_progress - self.prefill_rate_tps * (now - self.prefill_started_at)
        )

    def predicted_ttft(self, new_work: float, now: float) -> float:
        """Seconds until ``new_work`` token-equivalents queued now would finish prefilling."""
        return (self.pending_prefill_work(now) + new_work) / self.prefill_rate_tps

    @property
    def kv_pressure(self) -> float:
        """Fraction of KV capacity used or reserved for decode (above 1 when oversubscribed)."""
        used = max(self.num_reserved_kv_blocks, self.num_reported_kv_blocks)
        return used / self.kv_capacity_blocks


@dataclass(slots=True)
class _Tracked:
    prefill_instance: str | None
    decode_instance: str | None
    prefill_tokens: int
    prefill_work: float
    cached_tokens: int
    prompt_blocks: int
    kv_blocks: int
    started_at: float | None = None
    prefill_done: bool = False
    started_alone: bool = False
    """No other prefill was in progress on its instance when it started."""


class LoadTracker:
    """Loads of every known instance, keyed by instance id."""

    def __init__(
        self,
        default_prefill_rate_tps: float,
        default_kv_capacity_blocks: int,
        rate_ewma_alpha: float = 0.2,
    ) -> None:
        self.default_prefill_rate_tps = default_prefill_rate_tps
        self.default_kv_capacity_blocks = default_kv_capacity_blocks
        self.rate_ewma_alpha = rate_ewma_alpha
        self.loads: dict[str, InstanceLoad] = {}
        self._requests: dict[str, _Tracked] = {}
        self.attention_coeff = 0.0
        """kappa: token-equivalents of attention per (new token, context token) pair."""
        self._fit = _AttentionFit()
        self._unlearned: set[str] = set()
        """Instances without a rate sample of their own (they follow ``learned_rate_scale``)."""
        self._learned_rate_sum = 0.0
        self._learned_given_sum = 0.0
        self._applied_scale = 1.0

    def prefill_work(self, new_tokens: int, cached_tokens: int) -> float:
        """Token-equivalents of prefilling ``new_tokens`` after ``cached_tokens``."""
        return new_tokens + self.attention_coeff * new_tokens * (cached_tokens + new_tokens / 2)

    # -- instances -----------------------------------------------------------------------------

    def add_instance(
        self,
        instance_id: str,
        prefill_rate_tps: float | None = None,
        kv_capacity_blocks: int | None = None,
    ) -> InstanceLoad:
        if instance_id in self.loads:
            raise ValueError(f"instance {instance_id!r} is already tracked")
        rate = prefill_rate_tps if prefill_rate_tps is not None else self.default_prefill_rate_tps
        capacity = (
            kv_capacity_blocks
            if kv_capacity_blocks is not None
            else self.default_kv_capacity_blocks
        )
        if not rate > 0:
            raise ValueError(f"prefill_rate_tps must be positive, got {rate}")
        if not capacity > 0:
            raise ValueError(f"kv_capacity_blocks must be positive, got {capacity}")
        load = InstanceLoad(instance_id, float(rate), int(capacity), given_rate_tps=float(rate))
        load.prefill_rate_tps = rate * self.learned_rate_scale
        self.loads[instance_id] = load
        self._unlearned.add(instance_id)
        return load

    def remove_instance(self, instance_id: str) -> list[str]:
        """Stop tracking an instance; returns the unfinished requests placed on it (to re-place).

        Those requests are forgotten everywhere, so their loads on other instances are released too.
        """
        self._load(instance_id)
        orphans = [rid for rid, t in self._requests.items() if instance_id in _members(t)]
        for request_id in orphans:
            self.on_finish(request_id)
        load = self.loads.pop(instance_id)
        if load.num_rate_samples:
            self._learned_rate_sum -= load.prefill_rate_tps
            self._learned_given_sum -= load.given_rate_tps
        self._unlearned.discard(instance_id)
        return orphans

    @property
    def learned_rate_scale(self) -> float:
        """Learned over given rate, summed over the instances that learned (1.0 before any)."""
        if self._learned_given_sum <= 0:
            return 1.0
        return self._learned_rate_sum / self._learned_given_sum

    def get(self, instance_id: str) -> InstanceLoad:
        return self._load(instance_id)

    def report_kv_usage(self, instance_id: str, used_blocks: int) -> None:
        """The instance's own count of KV blocks in use (from its metrics)."""
        self._load(instance_id).num_reported_kv_blocks = max(0, used_blocks)

    # -- request events ------------------------------------------------------------------------

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def on_add(
        self,
        request_id: str,
        prefill_instance: str | None,
        decode_instance: str | None,
        prefill_tokens: int,
        prompt_blocks: int,
        kv_blocks: int,
        cached_tokens: int = 0,
    ) -> None:
        """A request was placed: charge its prefill work and its decode KV reservation.

        ``prefill_tokens`` are the uncached tokens to prefill, after ``cached_tokens`` hits.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already placed")
        work = self.prefill_work(prefill_tokens, cached_tokens)
        tracked = _Tracked(
            prefill_instance,
            decode_instance,
            prefill_tokens,
            work,
            cached_tokens,
            prompt_blocks,
            kv_blocks,
        )
        for instance_id in (prefill_instance, decode_instance):
            if instance_id is not None:
                self._load(instance_id)  # unknown instances fail before anything is charged
        if prefill_instance is not None:
            self._queue_prefill(self.loads[prefill_instance], request_id, tracked)
        if decode_instance is not None:
            self.loads[decode_instance].num_reserved_kv_blocks += kv_blocks
        for instance_id in _members(tracked):
            self.loads[instance_id].num_running_requests += 1
        self._requests[request_id] = tracked

    def on_prefill_start(self, request_id: str, now: float) -> None:
        """The prefill instance started the request: it can no longer migrate."""
        tracked = self._requests.get(request_id)
        if tracked is None or tracked.prefill_instance is None or tracked.started_at is not None:
            return
        load = self.loads[tracked.prefill_instance]
        load.queue.pop(request_id, None)
        load.num_queued_prefill_tokens -= tracked.prefill_tokens
        load.queued_prefill_work -= tracked.prefill_work
        # Fold what is left of an earlier prefill in progress into the new one.
        remaining = load.pending_prefill_work(now) - load.queued_prefill_work
        load.prefill_work_in_progress = max(0.0, remaining) + tracked.prefill_work
        load.in_progress[request_id] = tracked.prefill_work
        tracked.started_alone = load.prefill_tokens_in_progress <= 0
        load.prefill_tokens_in_progress += tracked.prefill_tokens
        load.prefill_started_at = now
        tracked.started_at = now

    def on_prefill_done(self, request_id: str, now: float) -> None:
        """Prefill finished: release the prefill work and learn the instance's rate from it."""
        tracked = self._requests.get(request_id)
        if tracked is None or tracked.prefill_done or tracked.prefill_instance is None:
            return
        if tracked.started_at is None:
            self.on_prefill_start(request_id, now)
        load = self.loads[tracked.prefill_instance]
        self._learn(load, tracked, now)
        load.prefill_tokens_in_progress = max(
            0, load.prefill_tokens_in_progress - tracked.prefill_tokens
        )
        _end_prefill(load, request_id, now)
        load.num_active_prefill_blocks -= tracked.prompt_blocks
        load.num_prefilled_tokens += tracked.prefill_tokens
        if tracked.decode_instance != tracked.prefill_instance:
            load.num_running_requests -= 1
        tracked.prefill_done = True

    def on_finish(self, request_id: str) -> None:
        """The request finished or was aborted: release everything it still holds (idempotent)."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return
        members = _members(tracked)
        if tracked.prefill_instance is not None and not tracked.prefill_done:
            self._release_prefill(self.loads[tracked.prefill_instance], request_id, tracked)
        if tracked.decode_instance is not None:
            self.loads[tracked.decode_instance].num_reserved_kv_blocks -= tracked.kv_blocks
        for instance_id in members:
            self.loads[instance_id].num_running_requests -= 1

    def move_queued(
        self, request_id: str, target: str, prefill_tokens: int, cached_tokens: int = 0
    ) -> None:
        """Move a not-yet-started request to ``target``, with its new uncached tokens there."""
        tracked = self._requests.get(request_id)
        if tracked is None or tracked.prefill_instance is None or tracked.started_at is not None:
            raise ValueError(f"request {request_id!r} is not queued for prefill; it cannot migrate")
        self._load(target)
        before = _members(tracked)
        self._release_prefill(self.loads[tracked.prefill_instance], request_id, tracked)
        tracked.prefill_instance = target
        tracked.prefill_tokens = prefill_tokens
        tracked.cached_tokens = cached_tokens
        tracked.prefill_work = self.prefill_work(prefill_tokens, cached_tokens)
        self._queue_prefill(self.loads[target], request_id, tracked)
        after = _members(tracked)
        for instance_id in before - after:
            self.loads[instance_id].num_running_requests -= 1
        for instance_id in after - before:
            self.loads[instance_id].num_running_requests += 1

    def prefill_instance_of(self, request_id: str) -> str | None:
        tracked = self._requests.get(request_id)
        return tracked.prefill_instance if tracked else None

    def instances_of(self, request_id: str) -> tuple[str | None, str | None]:
        """(prefill instance, decode instance) of a tracked request; (None, None) if unknown."""
        tracked = self._requests.get(request_id)
        return (tracked.prefill_instance, tracked.decode_instance) if tracked else (None, None)

    def queued_tokens_of(self, request_id: str) -> int:
        tracked = self._requests.get(request_id)
        return tracked.prefill_tokens if tracked else 0

    # -- helpers -------------------------------------------------------------------------------

    def _load(self, instance_id: str) -> InstanceLoad:
        load = self.loads.get(instance_id)
        if load is None:
            raise UnknownInstanceError(instance_id)
        return load

    def _release_prefill(self, load: InstanceLoad, request_id: str, tracked: _Tracked) -> None:
        if tracked.started_at is None:
            load.queue.pop(request_id, None)
            load.num_queued_prefill_tokens -= tracked.prefill_tokens
            load.queued_prefill_work -= tracked.prefill_work
        else:
            load.prefill_tokens_in_progress = max(
                0, load.prefill_tokens_in_progress - tracked.prefill_tokens
            )
            # (an abort carries no clock: the estimate as of the last event, capped as usual)
            _end_prefill(load, request_id, load.prefill_started_at)
        load.num_active_prefill_blocks -= tracked.prompt_blocks

    @staticmethod
    def _queue_prefill(load: InstanceLoad, request_id: str, tracked: _Tracked) -> None:
        load.queue[request_id] = tracked.prefill_tokens
        load.num_queued_prefill_tokens += tracked.prefill_tokens
        load.queued_prefill_work += tracked.prefill_work
        load.num_active_prefill_blocks += tracked.prompt_blocks

    def _learn(self, load: InstanceLoad, tracked: _Tracked, now: float) -> None:
        """One completion's rate sample (grouped with completions at the same moment)."""
        started_at = tracked.started_at if tracked.started_at is not None else now
        grouped = now - load.last_prefill_done_at <= GROUP_S and load.sample_elapsed_s > 0
        elapsed = now - max(load.last_prefill_done_at, started_at)
        load.last_prefill_done_at = now
        n = tracked.prefill_tokens
        if grouped:  # a batch-mate finished with the last sample: re-do it with both
            load.sample_tokens += n
            load.sample_work += self.prefill_work(n, tracked.cached_tokens)
        elif elapsed > 0:
            alone = tracked.started_alone and load.prefill_tokens_in_progress <= n
            if n >= MIN_LEARN_TOKENS and alone and now - started_at <= elapsed + GROUP_S:
                # It ran alone (nothing else in progress from its start to its end, so no
                # batch-mate's chunks in its time): a clean sample for the attention coefficient.
                kappa = self._fit.observe(n, n * (tracked.cached_tokens + n / 2), elapsed)
                if kappa is not None:
                    self.attention_coeff = kappa
            load.rate_before_sample = load.prefill_rate_tps
            load.sample_tokens, load.sample_elapsed_s = n, elapsed
            load.sample_work = self.prefill_work(n, tracked.cached_tokens)
        else:
            load.sample_elapsed_s = 0.0
            return
        if load.sample_tokens >= MIN_LEARN_TOKENS:  # overheads dominate tiny prefills
            self._update_rate(load, load.sample_work / load.sample_elapsed_s)

    def _update_rate(self, load: InstanceLoad, measured: float) -> None:
        """EWMA from the rate before the current sample (so a re-done sample replaces it)."""
        before = load.rate_before_sample
        # One odd sample (a stall, a hit the router did not know of) must not swing the rate.
        measured = min(max(measured, before / RATE_CLAMP), before * RATE_CLAMP)
        alpha = self.rate_ewma_alpha
        if not load.num_rate_samples:
            self._unlearned.discard(load.instance_id)
            self._learned_given_sum += load.given_rate_tps
        else:
            self._learned_rate_sum -= load.prefill_rate_tps
        load.num_rate_samples += 1
        load.prefill_rate_tps = (1 - alpha) * before + alpha * measured
        self._learned_rate_sum += load.prefill_rate_tps
        self._follow_learned()

    def _follow_learned(self) -> None:
        """Give the instances without samples the learned scale (when it moved over 1%)."""
        scale = self.learned_rate_scale
        if abs(scale - self._applied_scale) <= SCALE_TOLERANCE * self._applied_scale:
            return
        self._applied_scale = scale
        for instance_id in self._unlearned:
            load = self.loads[instance_id]
            load.prefill_rate_tps = load.given_rate_tps * scale


def _end_prefill(load: InstanceLoad, request_id: str, now: float) -> None:
    """A started prefill left ``load`` (done or aborted): re-estimate the work still in progress.

    Prefills in progress finish in start order (an engine gives its running prompts the chunk
    budget first), so what is left when one leaves is the later ones' work, less what the
    clock says they did beside it (their share of the last chunks). Subtracting the leaver's
    whole work instead would take off again the part of it already counted as done: an instance
    that started a long prompt beside the end of another would look idle for its whole prefill.
    """
    left = load.prefill_work_in_progress - load.prefill_rate_tps * (now - load.prefill_started_at)
    load.in_progress.pop(request_id, None)
    others = sum(load.in_progress.values())
    load.prefill_work_in_progress = min(left, others) if left > 0 else others
    load.prefill_started_at = now


def _members(tracked: _Tracked) -> set[str]:
    """Instances a request currently occupies: its decode instance, and prefill until done."""
    members = {tracked.decode_instance} if tracked.decode_instance is not None else set()
    if tracked.prefill_instance is not None and not tracked.prefill_done:
        members.add(tracked.prefill_instance)
    return members


RATE_CLAMP = 4.0
"""A single measurement moves the rate estimate towards at most 4x (or 1/4x) its value."""

MIN_LEARN_TOKENS = 256
"""Prefills shorter than this teach neither the rate nor kappa (overheads dominate them)."""

SCALE_TOLERANCE = 0.01
"""Unlearned instances' rates are re-scaled when the learned scale moved by more than this."""

GROUP_S = 1e-3
"""Completions on one instance this close together came from one engine step: one sample."""


class _AttentionFit:
    """Online least squares of ``seconds ~ a * tokens + b * pairs``, forgetting; kappa = b / a."""

    FORGET = 0.995
    MIN_SAMPLES = 16

    def __init__(self) -> None:
        self.snn = self.snp = self.spp = self.snt = self.spt = 0.0
        self.count = 0

    def observe(self, tokens: float, pairs: float, seconds: float) -> float | None:
        """Add a sample; returns the new kappa, or None while it is not yet determined."""
        f = self.FORGET
        self.snn = f * self.snn + tokens * tokens
        self.snp = f * self.snp + tokens * pairs
        self.spp = f * self.spp + pairs * pairs
        self.snt = f * self.snt + tokens * seconds
        self.spt = f * self.spt + pairs * seconds
        self.count += 1
        det = self.snn * self.spp - self.snp * self.snp
        if self.count < self.MIN_SAMPLES or det <= 1e-9 * self.snn * self.spp:
            return None
        a = (self.snt * self.spp - self.spt * self.snp) / det
        b = (self.snn * self.spt - self.snp * self.snt) / det
        if a <= 0:
            return None
        return max(0.0, b / a)
