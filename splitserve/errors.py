"""Errors every layer may raise. Imports nothing of ours.

Each error says what was wrong in words a user can act on; the ones caused by
a request name the offending field so that frontends can map them to HTTP 400
or gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations


class SplitserveError(Exception):
    """Base class of every error splitserve raises on purpose."""


class InvalidRequestError(SplitserveError, ValueError):
    """A request (prompt or sampling parameter) is invalid; ``field`` names the culprit."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class ModelLoadError(SplitserveError):
    """A model path is missing, unreadable, truncated or of an unsupported kind."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ConfigError(SplitserveError, ValueError):
    """An engine or cluster configuration value is invalid."""


class KVCacheCapacityError(InvalidRequestError):
    """A single request can never fit in the configured KV cache."""


class RequestAbortedError(SplitserveError):
    """The request was aborted before it finished."""


class KVTransferError(SplitserveError):
    """Moving KV blocks between workers failed (timeout, checksum, lost peer, lease)."""


class KVChecksumError(KVTransferError):
    """Received KV blocks do not match the checksums the sender computed."""


class IncompatibleKVLayoutError(KVTransferError):
    """Two workers disagree on the KV layout; ``field`` names the first difference."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DuplicateRequestError(SplitserveError):
    """A client's request id is already in use by a live request (HTTP 409, gRPC
    ALREADY_EXISTS); ``field`` names where the id came from."""

    def __init__(self, message: str, field: str = "request_id") -> None:
        super().__init__(message)
        self.field = field


class NoHealthyWorkerError(SplitserveError):
    """No healthy worker of a needed role is available."""


class EngineFailedError(SplitserveError):
    """An engine step failed: the request was aborted (retry it elsewhere); an engine whose
    steps keep failing is unhealthy and refuses new requests until its worker is replaced."""


class OverloadedError(SplitserveError):
    """The system refuses new work for now (queue full)."""
