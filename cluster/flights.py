"""Flights: the cluster's record of each request in progress, and its stage timing.

Owns `Flight` (where one request runs and what it has streamed so far), `FlightTable` (the
live flights by internal request id, each request's flights - itself, or its ``n`` children -
and the clients' labels) and the helpers that turn workers' timestamps into stage seconds.
Internal ids are made by the cluster and unique; a client's id is only a label that maps to
one live request, so an abort touches exactly that request. It must not call workers or the
router: the request path and the rebalancer do.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

from splitserve.errors import DuplicateRequestError
from splitserve.outputs import CompletionOutput, RequestOutput


@dataclasses.dataclass
class Flight:
    """A request in the cluster: where it runs and what it has streamed so far."""

    request_id: str
    group_id: str | None = None
    """The request this flight is one of the ``n`` samples of (the engines share sequence
    slots fairly by it); None for a request with ``n == 1``."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    workers: set[str] = dataclasses.field(default_factory=set)
    """Workers streaming it right now."""
    placed: set[str] = dataclasses.field(default_factory=set)
    """Workers it was placed on (a draining worker waits for these too)."""
    aborted: bool = False
    replays: int = 0
    sent_prompt_logprobs: bool = False
    """Its prompt logprobs went out (a replay that computes the prompt again sends them too)."""
    prefill: str | None = None
    """The prefill worker it is queued or running on (None once prefilled)."""
    migrate_to: str | None = None
    """Set while the router moves it off a hotspot: its prefill stream ends by 'withdraw'."""
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per stage (queue, prefill, transfer, decode), from the workers' timestamps."""
    handoff: dict[str, Any] | None = None
    """The prefill worker's hand-off params (None: the decode worker prefills itself)."""
    mm: dict[str, Any] | None = None
    """Image embeddings and hashes from the encode workers, for every worker it runs on."""
    decode: str | None = None
    """The decode worker it runs on (set when its decode stream opens)."""


class FlightTable:
    """The live flights by internal id (touched only on the cluster's event loop), and the
    clients' labels of live requests (claimed from callers' threads, under a lock)."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._members: dict[str, tuple[str, ...]] = {}
        self._labels: dict[str, str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ labels

    def claim(self, label: str, request_id: str) -> None:
        """Map a client's id to a new request; refused while another live request has it."""
        with self._lock:
            if label in self._labels:
                raise DuplicateRequestError(
                    f"request_id {label!r} is already in use by a live request")
            self._labels[label] = request_id

    def release(self, label: str, request_id: str) -> None:
        with self._lock:
            if self._labels.get(label) == request_id:
                del self._labels[label]

    def resolve(self, label: str) -> str | None:
        """The internal id of the live request a client calls ``label`` (None: none)."""
        with self._lock:
            return self._labels.get(label)

    # ------------------------------------------------------------------ requests and flights

    def add_request(self, request_id: str, flight_ids: tuple[str, ...]) -> None:
        """A request and the flights it runs as (itself, or its ``n`` children)."""
        self._members[request_id] = flight_ids

    def remove_request(self, request_id: str) -> None:
        self._members.pop(request_id, None)

    def flights_of(self, request_id: str) -> list[Flight]:
        """The live flights of one request: exactly its own, nobody else's."""
        ids = self._members.get(request_id, ())
        return [f for f in (self._flights.get(i) for i in ids) if f is not None]

    def open(self, request_id: str, group_id: str | None = None) -> Flight:
        flight = self._flights[request_id] = Flight(request_id, group_id)
        return flight

    def close(self, request_id: str) -> None:
        self._flights.pop(request_id, None)

    def get(self, request_id: str) -> Flight | None:
        return self._flights.get(request_id)

    def __iter__(self) -> Iterator[Flight]:
        return iter(list(self._flights.values()))

    def __len__(self) -> int:
        return len(self._flights)

    def num_on(self, worker_id: str) -> int:
        """Flights streaming from ``worker_id`` right now."""
        return sum(worker_id in f.workers for f in self._flights.values())

    def busy(self, worker_id: str) -> bool:
        """Whether any flight streams from, or was placed on, ``worker_id``."""
        return any(worker_id in f.workers | f.placed for f in self._flights.values())


def abort_output(request_id: str, prompt_ids: list[int]) -> RequestOutput:
    """The final output of a request aborted before it reached a decode worker."""
    return RequestOutput(request_id, None, prompt_ids,
                         [CompletionOutput(0, "", [], finish_reason="abort")], True)


def withdrawn(flight: Flight, out: RequestOutput) -> bool:
    """The prefill stream ended because the request was withdrawn for a migration."""
    return (flight.migrate_to is not None and not flight.aborted and out.finished
            and out.outputs[0].finish_reason == "abort")


def prefill_timing(timing: dict[str, float], m: dict[str, float]) -> None:
    """Queue and prefill seconds from the prefill worker's timestamps (its own clock)."""
    if "first_scheduled_time" in m:
        timing["queue"] = m["first_scheduled_time"] - m["arrival_time"]
        timing["prefill"] = m.get("first_token_time", m["first_scheduled_time"]) \
            - m["first_scheduled_time"]


def decode_timing(timing: dict[str, float], m: dict[str, float], local: bool) -> None:
    """Transfer and decode seconds from the decode worker's timestamps; with ``local`` the
    decode worker also prefilled (conditional disaggregation, or a recompute after a fault)."""
    if "kv_load_start_time" in m and "kv_load_end_time" in m:
        timing["transfer"] = m["kv_load_end_time"] - m["kv_load_start_time"]
    start = m.get("kv_load_end_time", m.get("first_scheduled_time", m["arrival_time"]))
    if local and "first_scheduled_time" in m:
        timing.setdefault("queue", 0.0)
        timing["queue"] += m["first_scheduled_time"] - m["arrival_time"]
        start = m.get("first_token_time", m["first_scheduled_time"])
        timing["prefill"] = timing.get("prefill", 0.0) + start - m["first_scheduled_time"]
    timing["decode"] = max(m.get("finished_time", start) - start, 0.0)


def stage_keys(timing: dict[str, float]) -> dict[str, float]:
    """Stage seconds as output metrics keys (``queue_s``, ``prefill_s``, ...)."""
    return {f"{k}_s": v for k, v in timing.items()}
