"""splitserve: disaggregated LLM serving.

The root package is the shared vocabulary (``hashing``, ``sampling_params``,
``outputs``, ``request``, ``errors``) plus the public API, exported lazily so
that ``import splitserve.hashing`` loads neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "SamplingParams": "splitserve.sampling_params",
    "PoolingParams": "splitserve.sampling_params",
    "EmbeddingRequestOutput": "splitserve.outputs",
    "RequestOutput": "splitserve.outputs",
    "CompletionOutput": "splitserve.outputs",
    "RequestStatus": "splitserve.request",
    "LLM": "splitserve.roles.llm",
    "EngineConfig": "splitserve.roles.engine.config",
    "AsyncEngine": "splitserve.roles.engine.async_engine",
    "Cluster": "splitserve.cluster.cluster",
    "ClusterConfig": "splitserve.cluster.config",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from splitserve.outputs import (  # noqa: F401
        CompletionOutput,
        EmbeddingRequestOutput,  # noqa: F401
        RequestOutput,
    )
    from splitserve.request import RequestStatus  # noqa: F401
    from splitserve.roles.engine.async_engine import AsyncEngine  # noqa: F401
    from splitserve.roles.engine.config import EngineConfig  # noqa: F401
    from splitserve.roles.llm import LLM  # noqa: F401
    from splitserve.sampling_params import PoolingParams, SamplingParams  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
