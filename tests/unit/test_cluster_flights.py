"""FlightTable: client labels map to exactly one live request; a request's flights are its own."""

from __future__ import annotations

import threading

import pytest

from splitserve.cluster.flights import FlightTable
from splitserve.errors import DuplicateRequestError


def test_a_live_label_is_refused_and_free_again_after_release() -> None:
    table = FlightTable()
    table.claim("x", "cluster-a-1")
    with pytest.raises(DuplicateRequestError) as err:
        table.claim("x", "cluster-a-2")
    assert err.value.field == "request_id" and "'x'" in str(err.value)
    table.release("x", "cluster-a-2")  # not its holder: nothing happens
    assert table.resolve("x") == "cluster-a-1"
    table.release("x", "cluster-a-1")
    assert table.resolve("x") is None
    table.claim("x", "cluster-a-3")


def test_flights_of_a_request_are_exactly_its_own() -> None:
    table = FlightTable()
    table.add_request("r1", ("r1.0", "r1.1"))
    table.add_request("0_r1", ("0_r1",))  # an id that merely ends like r1's old child names
    for fid in ("r1.0", "r1.1", "0_r1"):
        table.open(fid)
    assert [f.request_id for f in table.flights_of("r1")] == ["r1.0", "r1.1"]
    table.close("r1.1")
    assert [f.request_id for f in table.flights_of("r1")] == ["r1.0"]
    table.remove_request("r1")
    assert table.flights_of("r1") == [] and len(table.flights_of("0_r1")) == 1


def test_concurrent_claims_of_one_label_admit_one() -> None:
    table = FlightTable()
    won: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            table.claim("same", f"req-{i}")
            won.append(f"req-{i}")
        except DuplicateRequestError:
            pass

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and table.resolve("same") == won[0]
