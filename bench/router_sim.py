"""Router benchmark: effective capacity of each placement policy in the cluster simulator.

Same as ``splitserve bench router``; see ``splitserve.router.sim.bench`` for the options. Example::

    python bench/router_sim.py --trace ../shared/traces/mooncake_synthetic_trace.jsonl \
        --instances 32 --json router_sim.json --plot router_sim.png
"""

from __future__ import annotations

import sys

from splitserve.router.sim.bench import main

if __name__ == "__main__":
    sys.exit(main())
