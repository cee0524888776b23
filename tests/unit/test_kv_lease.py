"""LeaseManager: grant, renew, pin, release, abort, expiry; callbacks only in poll()."""

from __future__ import annotations

import threading

import pytest

from splitserve.errors import RequestAbortedError
from splitserve.kvtransfer.lease import LeaseEnd, LeaseExpiredError, LeaseManager


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _manager() -> tuple[LeaseManager, Clock, list[tuple[str, LeaseEnd, str]]]:
    clock = Clock()
    calls: list[tuple[str, LeaseEnd, str]] = []
    mgr = LeaseManager(
        lambda r, why: calls.append((r, why, threading.current_thread().name)),
        default_ttl_s=30.0,
        clock=clock,
    )
    return mgr, clock, calls


def test_release_frees_at_next_poll_on_the_polling_thread() -> None:
    mgr, _, calls = _manager()
    lease = mgr.grant("r1", [3, 4])
    assert mgr.release("r1", lease.lease_id)
    assert calls == []  # never from the releasing call itself
    result: list = []
    t = threading.Thread(target=lambda: result.extend(mgr.poll()), name="engine")
    t.start()
    t.join()
    assert result == [("r1", LeaseEnd.RELEASED)]
    assert calls == [("r1", LeaseEnd.RELEASED, "engine")]
    assert mgr.num_leases == 0 and mgr.poll() == []


def test_expiry_and_heartbeat_renewal() -> None:
    mgr, clock, calls = _manager()
    lease = mgr.grant("r1", [1], ttl_s=10.0)
    clock.now += 9.0
    assert mgr.renew("r1", lease.lease_id) == 10.0
    clock.now += 9.0
    assert mgr.poll() == []
    clock.now += 1.0
    assert mgr.poll() == [("r1", LeaseEnd.EXPIRED)]
    with pytest.raises(LeaseExpiredError):
        mgr.renew("r1", lease.lease_id)


def test_expired_lease_refuses_reads_before_poll() -> None:
    mgr, clock, _ = _manager()
    lease = mgr.grant("r1", [1])
    clock.now += 31.0
    with pytest.raises(LeaseExpiredError, match="expired"):
        mgr.pin("r1", lease.lease_id, [1])


def test_pin_checks_blocks_and_lease_id_and_delays_free() -> None:
    mgr, _, calls = _manager()
    lease = mgr.grant("r1", [1, 2])
    with pytest.raises(LeaseExpiredError):
        mgr.pin("r1", lease.lease_id + 1, [1])
    with pytest.raises(Exception, match=r"\[3\] are not under its lease"):
        mgr.pin("r1", lease.lease_id, [1, 3])
    mgr.pin("r1", lease.lease_id, [2])
    assert mgr.abort("r1")
    assert mgr.poll() == []  # a read is gathering these blocks right now
    mgr.unpin("r1")
    assert mgr.poll() == [("r1", LeaseEnd.ABORTED)]


def test_aborted_lease_reports_abort_to_readers() -> None:
    mgr, _, _ = _manager()
    lease = mgr.grant("r1", [1])
    mgr.abort("r1")
    with pytest.raises(RequestAbortedError):
        mgr.pin("r1", lease.lease_id, [1])
    assert not mgr.release("r1", lease.lease_id)  # already ended: first end wins


def test_bad_grants() -> None:
    mgr, _, _ = _manager()
    mgr.grant("r1", [1])
    with pytest.raises(ValueError, match="already holds"):
        mgr.grant("r1", [2])
    with pytest.raises(ValueError, match="zero blocks"):
        mgr.grant("r2", [])
    with pytest.raises(ValueError, match="ttl_s"):
        mgr.grant("r3", [1], ttl_s=0)
    assert not mgr.release("nope")


def test_a_read_that_never_unwinds_holds_the_blocks_one_ttl_past_the_lease_at_most() -> None:
    """The CI flake "pins 1": a zero-copy send that its transport could neither finish nor
    cancel kept its pin, and so the blocks, forever. An ended lease still pinned one ttl
    after it ran out is finalized anyway and the stuck read is counted; its unpin, if it
    ever comes, touches nothing (not even a later lease of the same request)."""
    mgr, clock, calls = _manager()
    lease = mgr.grant("r1", [1, 2], ttl_s=10.0)
    mgr.pin("r1", lease.lease_id, [1])
    assert mgr.abort("r1")
    clock.now += 10.0  # the lease ran out; the read is still pinned
    assert mgr.poll() == [] and mgr.num_stuck_reads == 0
    clock.now += 9.9
    assert mgr.poll() == []
    clock.now += 0.2
    assert mgr.poll() == [("r1", LeaseEnd.ABORTED)]
    assert mgr.num_stuck_reads == 1 and calls[-1][:2] == ("r1", LeaseEnd.ABORTED)
    again = mgr.grant("r1", [3], ttl_s=10.0)  # the same request offers again
    mgr.pin("r1", again.lease_id, [3])
    mgr.unpin("r1", lease.lease_id)  # the stuck read finally unwinds: not this lease's pin
    assert mgr.get("r1").pins == 1
    mgr.unpin("r1", again.lease_id)
    assert mgr.get("r1").pins == 0


def test_a_pinned_live_lease_is_never_forced() -> None:
    mgr, clock, _ = _manager()
    lease = mgr.grant("r1", [1], ttl_s=10.0)
    mgr.pin("r1", lease.lease_id, [1])
    for _ in range(5):  # a long read, renewed by the reader's heartbeats
        clock.now += 9.0
        mgr.renew("r1", lease.lease_id)
        assert mgr.poll() == []
    assert mgr.get("r1").pins == 1 and mgr.num_stuck_reads == 0
