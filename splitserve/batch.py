"""``python -m splitserve.batch``: the batch runner's entry point (OpenAI batch JSONL).

A thin shim, so that the documented command (``ray job submit -- python -m splitserve.batch
...``) lives in the root namespace while the root layer imports nothing above it: the
implementation, ``splitserve.cluster.tools.batch``, is loaded only when ``main`` runs (the same lazy
pattern as the public API in ``splitserve/__init__.py``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``splitserve.cluster.tools.batch.main``; see ``--help`` for the options."""
    return int(importlib.import_module("splitserve.cluster.tools.batch").main(argv))


if __name__ == "__main__":
    sys.exit(main())
