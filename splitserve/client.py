"""``from splitserve.client import Client, AsyncClient``: the gRPC client of ``splitserve serve``.

A thin shim, so that the documented import lives in the root namespace while the root layer
imports nothing above it: the implementation, ``splitserve.cluster.frontends.client`` (grpcio and the
generated stubs), loads on first attribute access, as the public API in ``__init__`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_NAMES = (
    "Client", "AsyncClient", "Tls", "GenerateResult", "Completion", "ClientError",
    "InvalidArgumentError", "UnauthenticatedError", "UnavailableError", "DeadlineExceededError",
)
__all__ = list(_NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from splitserve.cluster.frontends.client import (  # noqa: F401
        AsyncClient,
        Client,
        ClientError,
        Completion,
        DeadlineExceededError,
        GenerateResult,
        InvalidArgumentError,
        Tls,
        UnauthenticatedError,
        UnavailableError,
    )


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'splitserve.client' has no attribute {name!r}")
    value = getattr(importlib.import_module("splitserve.cluster.frontends.client"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
