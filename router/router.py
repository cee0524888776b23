"""The router facade the cluster calls: membership, placement, events, rebalancing.

Owns: which instances exist, their roles and health, and the wiring of
``PrefixIndex`` + ``LoadTracker`` + ``Policy``. Must not: talk to workers (the
cluster delivers events and applies placements and migrations), sleep, or block:
every call returns at once, and a placement with no healthy instance of a needed
role raises ``NoInstanceAvailable``.

Usage (the cluster, or the simulator)::

    router = Router("dualmap", RouterConfig(ttft_slo_s=5.0))
    router.add_instance("p0", roles={InstanceRole.PREFILL}, prefill_rate_tps=12_000)
    router.add_instance("d0", roles={InstanceRole.DECODE}, kv_capacity_blocks=900)
    placement = router.route(RouteRequest("r1", prompt_len=len(ids),
                                          block_hashes=hash_block_tokens(ids, 512)))
    router.on_prefill_start("r1"); ...; router.on_prefill_done("r1")
    router.on_kv_stored("p0", block_hashes)        # worker KV events
    router.on_finish("r1")                         # finished or aborted
    for m in router.rebalance():                   # e.g. every 100 ms
        cluster.move_queued(m.request_id, m.source, m.target)

Events about unknown requests are ignored (they may race with an abort); events
naming unknown instances raise ``UnknownInstanceError``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from splitserve.errors import InvalidRequestError
from splitserve.router.errors import NoInstanceAvailable, UnknownInstanceError
from splitserve.router.hash_ring import HashRing
from splitserve.router.least_pressure import LeastPressure
from splitserve.router.load_tracker import InstanceLoad, LoadTracker
from splitserve.router.policies import Policy, create_policy
from splitserve.router.prefix_index import PendingPrefixes, PrefixIndex, match_with_pending
from splitserve.router.schema import InstanceRole, Migration, Placement, RouterConfig, RouteRequest
from splitserve.router.view import ClusterView

ENCODE_RING_SEED = 0xE4C0_0003
"""Seed of the ring that maps image content hashes to encode instances."""

DEFAULT_ROLES = frozenset({InstanceRole.PREFILL, InstanceRole.DECODE})


@dataclass(slots=True)
class _Instance:
    roles: frozenset[InstanceRole]
    healthy: bool = True


class Router:
    """Places requests on prefill, decode and encode instances.

    Thread safety: none; call it from one thread or event loop (the cluster's frontend).
    """

    def __init__(
        self,
        policy: str | Policy = "dualmap",
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else RouterConfig()
        self.policy = create_policy(policy, self.config) if isinstance(policy, str) else policy
        self.clock = clock
        self.index = PrefixIndex()
        self.pending = PendingPrefixes()
        self.loads = LoadTracker(
            self.config.default_prefill_rate_tps,
            self.config.default_kv_capacity_blocks,
            self.config.rate_ewma_alpha,
        )
        self._instances: dict[str, _Instance] = {}
        self._healthy: dict[InstanceRole, list[str]] = {role: [] for role in InstanceRole}
        self._prefill_loads: list[InstanceLoad] = []  # parallel to the healthy prefill list
        self._prefill_set: set[str] = set()
        self._decode = LeastPressure(self._decode_key)
        self._encode_ring = HashRing(ENCODE_RING_SEED, self.config.virtual_nodes)
        self._queued: dict[str, RouteRequest] = {}  # placed, prefill not started
        self.observers: list[Callable[[RouteRequest, Placement], None]] = []
        """Called with every placement ``route`` returns (e.g. the planner's metrics window);
        they must not call back into the router."""

    # -- membership ----------------------------------------------------------------------------

    def add_instance(
        self,
        instance_id: str,
        roles: Iterable[InstanceRole | str] = DEFAULT_ROLES,
        prefill_rate_tps: float | None = None,
        kv_capacity_blocks: int | None = None,
    ) -> None:
        """Register a healthy instance (``kv_capacity_blocks``: in ``config.block_size`` blocks)."""
        if not instance_id:
            raise ValueError("instance_id must be a non-empty string")
        if instance_id in self._instances:
            raise ValueError(f"instance {instance_id!r} is already registered")
        role_set = frozenset(InstanceRole(r) for r in roles)
        if not role_set:
            raise ValueError(f"instance {instance_id!r} needs at least one role")
        self.loads.add_instance(instance_id, prefill_rate_tps, kv_capacity_blocks)
        self.index.add_instance(instance_id)
        self._instances[instance_id] = _Instance(role_set, healthy=False)
        self._set_serving(instance_id, True)

    def remove_instance(self, instance_id: str) -> list[str]:
        """Forget an instance (scale-down or death). Returns the ids of unfinished requests
        placed on it: the router has released them everywhere, the cluster should route them again.
        """
        self._instance(instance_id)
        self._set_serving(instance_id, False)
        del self._instances[instance_id]
        self.index.remove_instance(instance_id)
        orphans = self.loads.remove_instance(instance_id)
        for request_id in orphans:
            self._queued.pop(request_id, None)
            self.pending.remove(request_id)
        self._touch(*self._healthy[InstanceRole.DECODE])  # orphans released loads anywhere
        return orphans

    def set_healthy(self, instance_id: str, healthy: bool) -> None:
        """Mark an instance (un)healthy: unhealthy ones get no new placements; state is kept."""
        self._set_serving(instance_id, healthy)

    def instances(
        self, role: InstanceRole | str | None = None, healthy_only: bool = True
    ) -> list[str]:
        """Registered instance ids (of a role), in join order."""
        if role is not None and healthy_only:
            return list(self._healthy[InstanceRole(role)])
        return [
            i
            for i, inst in self._instances.items()
            if (role is None or InstanceRole(role) in inst.roles)
            and (inst.healthy or not healthy_only)
        ]

    # -- placement -----------------------------------------------------------------------------

    def route(self, request: RouteRequest) -> Placement:
        """Choose prefill, decode and encode instances for a new request and charge their loads."""
        placement = self._route(request)
        for observer in self.observers:
            observer(request, placement)
        return placement

    def _route(self, request: RouteRequest) -> Placement:
        self._validate(request)
        view = self._view()
        if not view.prefill_instances and request.prompt_len > self.config.local_prefill_max_tokens:
            # (a prompt within local_prefill_max_tokens prefills on decode: no prefill needed)
            raise NoInstanceAvailable(InstanceRole.PREFILL.value)
        if not len(self._decode):
            raise NoInstanceAvailable(InstanceRole.DECODE.value)
        encode = self._place_images(request)
        forecast = match_with_pending(self.index, self.pending, request.block_hashes)
        decode = self._decode.least()
        decode_cached = view.cached_tokens(request, forecast.get(decode, 0))
        if request.prompt_len - decode_cached <= self.config.local_prefill_max_tokens:
            return self._commit_local(request, decode, decode_cached, encode)
        seen = forecast if self.policy.uses_forecast else self.index.match(request.block_hashes)
        choice = self.policy.choose(request, view, seen)
        matched = forecast.get(choice.instance_id, 0)  # the load is charged on the best estimate
        prefill_tokens = view.uncached_tokens(request, matched)
        placement = Placement(
            request_id=request.request_id,
            prefill_instance=choice.instance_id,
            decode_instance=decode,
            skip_remote_prefill=False,
            encode_instances=encode,
            cached_tokens=request.prompt_len - prefill_tokens,
            predicted_ttft_s=view.predicted_ttft(choice.instance_id, request, matched),
            candidates=choice.candidates,
            fallback=choice.fallback,
        )
        self.loads.on_add(
            request.request_id,
            choice.instance_id,
            decode,
            prefill_tokens,
            len(request.block_hashes),
            self._kv_blocks(request),
            cached_tokens=request.prompt_len - prefill_tokens,
        )
        self._queued[request.request_id] = request
        self.pending.add(request.request_id, choice.instance_id, request.block_hashes)
        self._touch(choice.instance_id, decode)
        return placement

    def rebalance(self) -> list[Migration]:
        """Move queued, not-started requests off hot instances (policies that do it).

        The router's own state already reflects the returned migrations; the cluster must
        move each request from ``source`` to ``target``. If one has started meanwhile, the
        cluster leaves it and reports events as usual against the instance that runs it
        via ``on_prefill_start(request_id, instance_id)``.
        """
        migrations: list[Migration] = []

        def move(migration: Migration) -> None:
            self._move_queued(migration.request_id, migration.target)
            self._touch(migration.source, migration.target)
            migrations.append(migration)

        self.policy.rebalance(self._view(), move)
        return migrations

    # -- events from workers -------------------------------------------------------------------

    def on_kv_stored(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """KV event: the instance cached these blocks."""
        self._instance(instance_id)
        self.index.apply_stored(instance_id, block_hashes)

    def on_kv_removed(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """KV event: the instance evicted these blocks."""
        self._instance(instance_id)
        self.index.apply_removed(instance_id, block_hashes)

    def on_kv_snapshot(self, instance_id: str, block_hashes: Iterable[int]) -> None:
        """KV resync: the instance holds exactly these blocks (its events had a gap)."""
        self._instance(instance_id)
        self.index.replace(instance_id, block_hashes)

    def on_prefill_start(self, request_id: str, instance_id: str | None = None) -> None:
        """A prefill instance started the request (it will no longer migrate).

        ``instance_id``: where it actually started, if that differs from the router's record
        (a migration the cluster could not apply); the router then moves its record there.
        """
        if request_id not in self._queued:
            return
        previous = self.loads.prefill_instance_of(request_id)
        target = self._instance_id(instance_id) if instance_id is not None else previous
        if target is None:  # placed without remote prefill: nothing is queued anywhere
            return
        # Re-charge with the cache as it is now: blocks stored since placement are hits
        # (this keeps the in-progress estimate and the learned rate honest).
        self._move_queued(request_id, target, with_pending=False)
        del self._queued[request_id]
        self._touch(previous, target)
        self.loads.on_prefill_start(request_id, self.clock())

    def on_prefill_done(self, request_id: str) -> None:
        """The request's prefill finished (its first token exists)."""
        self._queued.pop(request_id, None)
        self.pending.remove(request_id)
        self.loads.on_prefill_done(request_id, self.clock())
        self._touch(*self.loads.instances_of(request_id))

    def on_finish(self, request_id: str) -> None:
        """The request finished or was aborted; releases its loads (idempotent)."""
        self._queued.pop(request_id, None)
        self.pending.remove(request_id)
        instances = self.loads.instances_of(request_id)
        self.loads.on_finish(request_id)
        self._touch(*instances)

    def report_kv_usage(self, instance_id: str, used_blocks: int) -> None:
        """The instance's own count of KV blocks in use (``config.block_size`` blocks)."""
        self.loads.report_kv_usage(self._instance_id(instance_id), used_blocks)
        self._touch(instance_id)

    # -- helpers -------------------------------------------------------------------------------

    def _view(self) -> ClusterView:
        return ClusterView(
            self.config,
            self.index,
            self.loads,
            self._healthy[InstanceRole.PREFILL],
            self._prefill_loads,
            self._prefill_set,
            self.clock(),
            self.pending,
            self._queued,
        )

    def _validate(self, request: RouteRequest) -> None:
        if request.request_id in self.loads:
            raise InvalidRequestError(
                f"request {request.request_id!r} is already placed", field="request_id"
            )
        max_blocks = request.prompt_len // self.config.block_size
        if len(request.block_hashes) > max_blocks:
            raise InvalidRequestError(
                f"{len(request.block_hashes)} block hashes for a {request.prompt_len}-token prompt:"
                f" at most {max_blocks} full blocks of {self.config.block_size} tokens",
                field="block_hashes",
            )

    def _move_queued(self, request_id: str, target: str, with_pending: bool = True) -> None:
        """Re-charge a queued request at ``target`` with the cache it finds there.

        ``with_pending``: count blocks that prefills queued at ``target`` will store (for moves
        decided now); without it, only what the target holds already (at prefill start).
        """
        request = self._queued[request_id]
        self.pending.remove(request_id)  # its own blocks are no hit for itself
        if with_pending:
            matched = match_with_pending(self.index, self.pending, request.block_hashes).get(
                target, 0
            )
        else:
            matched = self.index.matched_blocks(target, request.block_hashes)
        self.pending.add(request_id, target, request.block_hashes)
        cached = min(matched * self.config.block_size, request.prompt_len)
        self.loads.move_queued(request_id, target, request.prompt_len - cached, cached)

    def _decode_key(self, instance_id: str) -> tuple[float, int]:
        """Decode instances are ordered by KV pressure, then running requests, then join order."""
        load = self.loads.loads[instance_id]
        return load.kv_pressure, load.num_running_requests

    def _touch(self, *instance_ids: str | None) -> None:
        for instance_id in instance_ids:
            if instance_id is not None:
                self._decode.touch(instance_id)

    def _place_images(self, request: RouteRequest) -> tuple[str, ...]:
        if not request.image_hashes:
            return ()
        if not len(self._encode_ring):
            raise NoInstanceAvailable(InstanceRole.ENCODE.value, "the request has images")
        return tuple(self._encode_ring.lookup(h) for h in request.image_hashes)

    def _commit_local(
        self, request: RouteRequest, decode: str, cached: int, encode: tuple[str, ...]
    ) -> Placement:
        self.loads.on_add(
            request.request_id, None, decode, 0, len(request.block_hashes), self._kv_blocks(request)
        )
        self._touch(decode)
        return Placement(request.request_id, None, decode, True, encode, cached, 0.0)

    def _kv_blocks(self, request: RouteRequest) -> int:
        return math.ceil((request.prompt_len + request.max_output_tokens) / self.config.block_size)

    def _instance(self, instance_id: str) -> _Instance:
        instance = self._instances.get(instance_id)
        if instance is None:
            raise UnknownInstanceError(instance_id)
        return instance

    def _instance_id(self, instance_id: str) -> str:
        self._instance(instance_id)
        return instance_id

    def _set_serving(self, instance_id: str, healthy: bool) -> None:
        instance = self._instance(instance_id)
        if instance.healthy == healthy:
            return
        instance.healthy = healthy
        for role in instance.roles:
            members = self._healthy[role]
            if healthy:
                members.append(instance_id)
            else:
                members.remove(instance_id)
        if InstanceRole.DECODE in instance.roles:
            (self._decode.add if healthy else self._decode.remove)(instance_id)
        self._prefill_loads[:] = [self.loads.loads[i] for i in self._healthy[InstanceRole.PREFILL]]
        self._prefill_set.clear()
        self._prefill_set.update(self._healthy[InstanceRole.PREFILL])
        if InstanceRole.PREFILL in instance.roles:
            (self.policy.add_instance if healthy else self.policy.remove_instance)(instance_id)
        if InstanceRole.ENCODE in instance.roles:
            (self._encode_ring.add if healthy else self._encode_ring.remove)(instance_id)
