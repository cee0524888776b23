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
