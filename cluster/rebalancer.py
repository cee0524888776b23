"""Rebalancer: moves queued, not-started requests off prefill hotspots, as the router decides.

Owns the rebalance loop and one migration's protocol (withdraw from the source if nothing has
touched the request there; its prefill loop in request_path.py then re-issues it on the
target). It must not choose migrations (the router does) nor stream requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.flights import FlightTable
from splitserve.cluster.membership import Membership
from splitserve.router.schema import Migration

logger = logging.getLogger(__name__)


class Rebalancer:
    """Runs the router's migrations against the live flights."""

    def __init__(
        self, config: ClusterConfig, membership: Membership, flights: FlightTable,
        counters: collections.Counter[str],
    ) -> None:
        self.config = config
        self.membership = membership
        self.router = membership.router
        self.flights = flights
        self.counters = counters

    async def run(self) -> None:
        """The rebalance loop (runs until cancelled)."""
        while True:
            await asyncio.sleep(self.config.router.rebalance_interval_s)
            try:
                migrations = self.router.rebalance() if len(self.flights) else []
            except Exception:  # noqa: BLE001 - a router bug must not stop serving
                logger.exception("rebalance failed")
                continue
            for m in migrations:
                await self.migrate(m)

    async def migrate(self, m: Migration) -> None:
        """Withdraw the request from ``m.source`` if it is still untouched there; its prefill
        loop then re-issues it on ``m.target``. Otherwise it stays, and the router is told."""
        if await self._withdraw(m):
            self.counters["route:migrated"] += 1
            return
        with contextlib.suppress(Exception):
            self.router.on_prefill_start(m.request_id, m.source)  # started there: it stays

    async def _withdraw(self, m: Migration) -> bool:
        flight = self.flights.get(m.request_id)
        source = self.membership.healthy_handle(m.source)
        target = self.membership.healthy_handle(m.target)
        if (flight is None or flight.prefill != m.source or flight.migrate_to is not None
                or flight.aborted or source is None or target is None or target.draining):
            return False
        flight.migrate_to = m.target
        try:
            ok = bool(await source.actor.withdraw.remote(m.request_id))
        except Exception:  # noqa: BLE001 - a dead source is handled by the stream
            ok = False
        if not ok and flight.migrate_to == m.target:
            flight.migrate_to = None
        return ok
