"""Leases on the serving (prefill) side: which request's blocks are held, until when, for whom.

Owns ``LeaseManager``: grant a lease when a request's KV is offered, renew it on the
reader's heartbeats and reads, end it on release, abort or expiry, and hand the ended
leases to the owner's ``on_release`` callback so that it frees the blocks.

Threading: any thread may grant, renew, pin, release or abort (the transport's thread
answers reads and heartbeats); callbacks run only inside ``poll()``, on the caller's
thread (the engine's), so the block pool is only ever touched by its owner. A lease that
is pinned (a read is gathering or sending its blocks right now) is finalized only after the
unpin, or, if a read never unwinds (a send its transport can neither finish nor cancel), one
ttl after the lease ran out: the pool's memory stays allocated, so a late send can only carry
stale bytes, which the reader's checksums refuse; blocks are never held forever.

It must not import the engine (``splitserve.roles``) nor touch tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

from splitserve.errors import KVTransferError, RequestAbortedError
from splitserve.integrity import IntegrityReport

DEFAULT_LEASE_TTL_S = 30.0
"""How long offered KV is held without a heartbeat or read from the reader."""

_NUM_TOMBSTONES = 4096
"""Ended leases remembered so that a late reader learns why (aborted vs expired)."""


class LeaseEnd(enum.StrEnum):
    """Why a lease ended (the ``reason`` given to ``on_release``)."""

    RELEASED = "released"
    ABORTED = "aborted"
    EXPIRED = "expired"


@dataclasses.dataclass
class Lease:
    """One request's held blocks. Mutated only by ``LeaseManager`` under its lock."""

    request_id: str
    lease_id: int
    block_ids: tuple[int, ...]
    ttl_s: float
    expires_at: float
    secret: str = dataclasses.field(default="", repr=False)
    """The transfer's 128-bit random secret (hex); readers must present it (``authenticate``)."""
    pins: int = 0
    """Reads gathering from these blocks right now; the blocks are not freed while > 0."""
    ended: LeaseEnd | None = None


class LeaseExpiredError(KVTransferError):
    """The lease named by a read or heartbeat has expired, been released, or never existed."""


class TransferSecretError(KVTransferError):
    """A read or control presented the wrong secret for a live lease: refused, counted."""


ReleaseCallback = Callable[[str, LeaseEnd], None]


class LeaseManager:
    """Holds offered blocks under leases; thread-safe; callbacks only from ``poll()``."""

    def __init__(
        self,
        on_release: ReleaseCallback | None = None,
        default_ttl_s: float = DEFAULT_LEASE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if default_ttl_s <= 0:
            raise ValueError(f"default_ttl_s must be > 0, got {default_ttl_s}")
        self._on_release = on_release
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._ended: OrderedDict[int, LeaseEnd] = OrderedDict()  # lease_id -> why, bounded
        self.num_refused = 0
        """Reads and controls refused for a wrong secret (``authenticate``)."""
        self.num_stuck_reads = 0
        """Ended leases finalized with reads still pinned, one ttl after they ran out."""

    # ------------------------------------------------------------------ granting side (owner)

    def grant(self, request_id: str, block_ids: Sequence[int], ttl_s: float | None = None) -> Lease:
        """Hold ``block_ids`` for ``request_id``; raises if the request already holds a lease."""
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl}")
        if not block_ids:
            raise ValueError(f"request {request_id!r}: cannot lease zero blocks")
        with self._lock:
            if request_id in self._leases:
                raise ValueError(f"request {request_id!r} already holds a lease")
            lease = Lease(
                request_id,
                secrets.randbits(63),
                tuple(block_ids),
                ttl,
                self._clock() + ttl,
                secret=secrets.token_hex(16),
            )
            self._leases[request_id] = lease
            return dataclasses.replace(lease)

    def poll(self) -> list[tuple[str, LeaseEnd]]:
        """Expire overdue leases, then call ``on_release`` for every ended, unpinned lease."""
        with self._lock:
            now = self._clock()
            done = [lease for lease in self._leases.values() if self._finalizable(lease, now)]
            for lease in done:
                del self._leases[lease.request_id]
                self._remember(lease)
        ended = [(lease.request_id, lease.ended or LeaseEnd.EXPIRED) for lease in done]
        if self._on_release is not None:
            for request_id, reason in ended:
                self._on_release(request_id, reason)
        return ended

    def _remember(self, lease: Lease) -> None:
        self._ended[lease.lease_id] = lease.ended or LeaseEnd.EXPIRED
        while len(self._ended) > _NUM_TOMBSTONES:
            self._ended.popitem(last=False)

    def _finalizable(self, lease: Lease, now: float) -> bool:
        if lease.ended is None and now >= lease.expires_at:
            lease.ended = LeaseEnd.EXPIRED
        if lease.ended is not None and lease.pins > 0 and now >= lease.expires_at + lease.ttl_s:
            self.num_stuck_reads += lease.pins  # their unpins, if they ever come, find no lease
            lease.pins = 0
        return lease.ended is not None and lease.pins == 0

    # ------------------------------------------------------------------ reader side (any thread)

    def authenticate(self, request_id: str, lease_id: int, secret: str) -> None:
        """Refuse (``TransferSecretError``, counted in ``num_refused``) a reader whose secret
        is not the live lease's, compared in constant time. A lease that is not live is
        left to the call that follows (it raises expired / aborted, revealing no data)."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.lease_id != lease_id:
                return
            given = secret.encode() if isinstance(secret, str) else b""
            if hmac.compare_digest(given, lease.secret.encode()):
                return
            self.num_refused += 1
        raise TransferSecretError(f"request {request_id!r}: wrong transfer secret, refused")

    def renew(self, request_id: str, lease_id: int) -> float:
        """Push the expiry one ttl into the future; returns the seconds left."""
        with self._lock:
            lease = self._live(request_id, lease_id)
            lease.expires_at = self._clock() + lease.ttl_s
            return lease.ttl_s

    def pin(self, request_id: str, lease_id: int, block_ids: Sequence[int]) -> None:
        """Start a read of ``block_ids`` (which must be leased); renews the lease."""
        with self._lock:
            lease = self._live(request_id, lease_id)
            stray = set(block_ids) - set(lease.block_ids)
            if stray:
                raise KVTransferError(
                    f"request {request_id!r}: blocks {sorted(stray)} are not under its lease"
                )
            lease.pins += 1
            lease.expires_at = self._clock() + lease.ttl_s

    def unpin(self, request_id: str, lease_id: int | None = None) -> None:
        """End a read started by ``pin``; ``lease_id`` (when given) must still be the
        request's lease (a read that outlived its lease must not unpin a later one)."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or (lease_id is not None and lease.lease_id != lease_id):
                return
            if lease.pins > 0:
                lease.pins -= 1

    def release(self, request_id: str, lease_id: int | None = None) -> bool:
        """The reader has what it needs; free at the next ``poll()``. False if no live lease."""
        return self._end(request_id, lease_id, LeaseEnd.RELEASED)

    def abort(self, request_id: str, lease_id: int | None = None) -> bool:
        """Give the blocks up now (either side aborted). False if no live lease."""
        return self._end(request_id, lease_id, LeaseEnd.ABORTED)

    def _end(self, request_id: str, lease_id: int | None, reason: LeaseEnd) -> bool:
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.ended is not None:
                return False
            if lease_id is not None and lease.lease_id != lease_id:
                return False
            lease.ended = reason
            return True

    def _live(self, request_id: str, lease_id: int) -> Lease:
        lease = self._leases.get(request_id)
        if lease is None or lease.lease_id != lease_id:
            ended = self._ended.get(lease_id)
            if ended is None:
                raise LeaseExpiredError(f"request {request_id!r}: no lease {lease_id} here")
        else:
            if lease.ended is None and self._clock() >= lease.expires_at:
                lease.ended = LeaseEnd.EXPIRED
            if lease.ended is None:
                return lease
            ended = lease.ended
        if ended is LeaseEnd.ABORTED:
            raise RequestAbortedError(f"request {request_id!r} was aborted on the serving side")
        raise LeaseExpiredError(f"request {request_id!r}: lease {ended.value}, blocks freed")

    # ------------------------------------------------------------------ introspection

    def get(self, request_id: str) -> Lease | None:
        """A copy of the request's lease (ended or not), or None."""
        with self._lock:
            lease = self._leases.get(request_id)
            return None if lease is None else dataclasses.replace(lease)

    def leases(self) -> list[Lease]:
        """Copies of every lease not yet finalized."""
        with self._lock:
            return [dataclasses.replace(lease) for lease in self._leases.values()]

    def check_integrity(
        self, live_request_ids: Collection[str] | None = None, grace_s: float | None = None
    ) -> IntegrityReport:
        """No lease without a live request (given ``live_request_ids``: the owner's requests
        whose blocks are held) and none past its deadline by more than ``grace_s`` (default:
        the lease's ttl) without being finalized: each is a stranded lease."""
        now = self._clock()
        report = IntegrityReport()
        for lease in self.leases():
            grace = lease.ttl_s if grace_s is None else grace_s
            if live_request_ids is not None and lease.request_id not in live_request_ids:
                report.add(f"lease {lease.lease_id} of {lease.request_id!r}: no live request")
            elif now > lease.expires_at + grace:
                report.add(
                    f"lease {lease.lease_id} of {lease.request_id!r} ran out "
                    f"{now - lease.expires_at:.1f}s ago and is not finalized (pins {lease.pins})"
                )
            else:
                continue
            report.stranded_leases += 1
        return report

    @property
    def num_leases(self) -> int:
        """Leases not yet finalized by ``poll()`` (live or ended)."""
        with self._lock:
            return len(self._leases)
