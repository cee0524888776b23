"""Request states and finish reasons shared by the engine, the workers and the router."""

from __future__ import annotations

import enum


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Finished states (done on this engine, handed-off ones
    included) compare greater than the others."""

    WAITING = enum.auto()
    WAITING_FOR_REMOTE_KV = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()
    HANDED_OFF = enum.auto()
    """KV-source (prefill) side: done here after the first token, its blocks held for the
    remote KV sink (decode) that continues it; no finish reason, the request goes on there."""

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style finish reason of a finished state, else None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}
