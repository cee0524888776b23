"""Worker half of the KV connector: moves a request's KV blocks and reports what finished.

Owns, per engine: the lease manager of offered KV (serving side), the loads in flight
(reading side), and the copies between the KV cache and staging buffers (through
``kernels.ops``). On the serving side ``offer`` checksums and leases a finished prefill's
blocks and returns the ``KvTransferParams`` for the reader; the transport calls ``stage``
to gather blocks for a read. On the reading side ``start_load`` pulls the blocks in
chunks (layers x blocks), verifies every (layer, block) checksum, re-fetches a chunk once
on mismatch, scatters verified chunks into the local blocks, renews the lease by
heartbeats and releases it when done. ``get_finished`` (once per engine step, on the
engine's thread) drives all of it and reports finished sends, finished and failed loads.

Threading: ``stage`` and ``on_control`` run on the transport's thread and only read the
KV cache under a pinned lease; everything else, every write into the KV cache included,
runs on the caller's thread. It must not import the engine or decide scheduling: that is
the scheduler half (connector_scheduler.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence

import torch

from splitserve.errors import KVChecksumError, KVTransferError, RequestAbortedError
from splitserve.kernels.ops import get_ops
from splitserve.kvtransfer.connector_scheduler import FinishedTransfers, KvConnectorMeta
from splitserve.kvtransfer.layout import KvLayout, cache_checksums, staging_checksums
from splitserve.kvtransfer.lease import DEFAULT_LEASE_TTL_S, LeaseEnd, LeaseManager
from splitserve.kvtransfer.params import Control, KvTransferParams, ReadRequest
from splitserve.kvtransfer.staging import StagingPool
from splitserve.kvtransfer.transport import KvTransport, TransportConnectionError


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Timeouts, retries and chunking of loads on the reading side."""

    read_timeout_s: float = 10.0
    """Deadline of one chunk read (round trip, connection set-up included)."""
    load_timeout_s: float = 60.0
    """Deadline of a whole load; past it the load fails and the lease is aborted."""
    max_retries: int = 1
    """Re-reads of a chunk after a connection failure (checksums get exactly one re-fetch)."""
    heartbeat_interval_s: float | None = None
    """Lease renewal period; None means a third of the offered lease's ttl."""
    layers_per_chunk: int | None = None
    """Layers per read; None reads all layers at once (layer-by-layer is 1)."""
    blocks_per_chunk: int | None = None
    """Blocks per read; None reads all of the request's blocks at once."""

    def __post_init__(self) -> None:
        if self.read_timeout_s <= 0 or self.load_timeout_s <= 0:
            raise ValueError("read_timeout_s and load_timeout_s must be > 0")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("layers_per_chunk", "blocks_per_chunk", "heartbeat_interval_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")


@dataclasses.dataclass
class _Chunk:
    """One read: ``layers`` x ``blocks`` (positions into the request's block lists)."""

    layers: range
    blocks: slice
    dest: torch.Tensor | None = None
    handle: int | None = None
    refetches: int = 0
    retries: int = 0
    done: bool = False


@dataclasses.dataclass
class _Load:
    request_id: str
    params: KvTransferParams
    local_ids: torch.Tensor
    chunks: list[_Chunk]
    deadline: float
    heartbeat_every: float
    last_heartbeat: float
    started: float = 0.0


class KvConnectorWorker:
    """One engine's KV mover, serving and reading. Not thread-safe except the serving hooks."""

    def __init__(
        self,
        engine_id: str,
        kv_caches: Sequence[torch.Tensor],
        transport: KvTransport,
        model_id: str,
        config: TransferConfig | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        on_release: Callable[[str, LeaseEnd], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine_id = engine_id
        self.kv_caches = list(kv_caches)
        self.layout = KvLayout.from_kv_caches(self.kv_caches, model_id)
        self.transport = transport
        self.config = config or TransferConfig()
        self._ops = get_ops(self.kv_caches[0].device)
        self._clock = clock
        self._on_release = on_release
        self.leases = LeaseManager(self._lease_ended, lease_ttl_s, clock)
        self.staging = StagingPool()
        self._loads: dict[str, _Load] = {}
        self._orphans: set[int] = set()  # handles whose outcome no longer matters
        self._heartbeats: dict[int, str] = {}
        self._kept_alive: dict[str, float] = {}  # request id -> last keep-alive (not loading)
        self._finished = FinishedTransfers()
        self.counters = {"kv_transfer_bytes": 0, "kv_transfer_seconds": 0.0,
                         "kv_transfers": 0, "kv_transfer_failures": 0}
        """Pulls of this engine (decode side): verified bytes, seconds, count, failed loads."""
        transport.register_memory(self.layout, server=self)

    # ================================================================== serving side

    def offer(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int, ttl_s: float | None = None
    ) -> KvTransferParams:
        """Hold ``block_ids`` under a lease for a reader; the params to hand it."""
        self.layout.check_block_ids(block_ids)
        if num_tokens > len(block_ids) * self.layout.block_size:
            raise ValueError(
                f"request {request_id!r}: {num_tokens} tokens do not fit {len(block_ids)} blocks"
            )
        checksums = cache_checksums(self.kv_caches, block_ids)
        lease = self.leases.grant(request_id, block_ids, ttl_s)
        return KvTransferParams(
            request_id=request_id,
            engine_id=self.engine_id,
            address=self.transport.address,
            block_ids=list(block_ids),
            num_tokens=num_tokens,
            lease_id=lease.lease_id,
            lease_ttl_s=lease.ttl_s,
            checksums=checksums,
            compat_hash=self.layout.compatibility_hash(),
        )

    def stage(self, read: ReadRequest) -> torch.Tensor:
        """ServeHandler: gather the asked blocks into a new staging buffer, under the lease."""
        parts = self.stage_parts(read, read.num_layers)
        try:
            return next(parts)
        finally:
            parts.close()

    def stage_parts(
        self, read: ReadRequest, layers_per_part: int
    ) -> Generator[torch.Tensor, None, None]:
        """ServeHandler: ``stage`` in layer groups, pinned until the iterator is closed.

        Lets the transport send part k while part k+1 is gathered.
        """
        if read.layer_end > self.layout.num_layers:
            raise KVTransferError(
                f"read asks for layers up to {read.layer_end}, "
                f"this engine has {self.layout.num_layers}"
            )
        self.leases.pin(read.request_id, read.lease_id, read.block_ids)
        return self._gather_parts(read, layers_per_part)

    def _gather_parts(
        self, read: ReadRequest, layers_per_part: int
    ) -> Generator[torch.Tensor, None, None]:
        try:
            device = self.kv_caches[0].device
            ids = torch.tensor(read.block_ids, dtype=torch.long, device=device)
            for l0 in range(read.layer_start, read.layer_end, layers_per_part):
                l1 = min(l0 + layers_per_part, read.layer_end)
                shape = self.layout.staging_shape(l1 - l0, len(read.block_ids))
                out = self.staging.take(shape, self.layout.torch_dtype, device)
                yield self._ops.gather_blocks(self.kv_caches[l0:l1], ids, out=out)
        finally:
            self.leases.unpin(read.request_id)

    def release_staging(self, staging: torch.Tensor) -> None:
        """ServeHandler: the transport is done with a buffer from ``stage``."""
        self.staging.give(staging)

    def check_lease(self, read: ReadRequest) -> None:
        """ServeHandler: the request may have been aborted or expired while its read was staged."""
        self.leases.renew(read.request_id, read.lease_id)

    def on_control(self, control: Control) -> None:
        """ServeHandler: a reader's heartbeat, release or abort."""
        if control.kind == "heartbeat":
            self.leases.renew(control.request_id, control.lease_id)
        elif control.kind == "release":
            self.leases.release(control.request_id, control.lease_id)
        else:
            self.leases.abort(control.request_id, control.lease_id)

    def _lease_ended(self, request_id: str, reason: LeaseEnd) -> None:
        self._finished.finished_sending[request_id] = reason
        if self._on_release is not None:
            self._on_release(request_id, reason)

    # ================================================================== reading side

    def start_load(
        self, request_id: str, params: KvTransferParams, local_block_ids: Sequence[int]
    ) -> None:
        """Start pulling ``params``' blocks into ``local_block_ids`` (same count, token order)."""
        self._check_load(request_id, params, local_block_ids)
        self._kept_alive.pop(request_id, None)
        now = self._clock()
        every = self.config.heartbeat_interval_s or params.lease_ttl_s / 3
        load = _Load(
            request_id,
            params,
            torch.tensor(list(local_block_ids), dtype=torch.long, device=self.kv_caches[0].device),
            self._plan_chunks(len(local_block_ids)),
            now + self.config.load_timeout_s,
            every,
            now,
            started=now,
        )
        self._loads[request_id] = load
        try:
            for chunk in load.chunks:
                self._issue(load, chunk)
        except KVTransferError as error:  # e.g. the transport is closed: report, do not raise
            self._fail(load, error)

    def _check_load(
        self, request_id: str, params: KvTransferParams, local_block_ids: Sequence[int]
    ) -> None:
        if request_id in self._loads:
            raise ValueError(f"request {request_id!r} is already loading")
        if params.request_id != request_id:
            raise ValueError(f"params are for {params.request_id!r}, not {request_id!r}")
        if len(local_block_ids) != len(params.block_ids):
            raise ValueError(
                f"request {request_id!r}: {len(local_block_ids)} local blocks for "
                f"{len(params.block_ids)} remote blocks"
            )
        if params.num_layers != self.layout.num_layers:
            raise ValueError(
                f"params carry checksums for {params.num_layers} layers, "
                f"this engine has {self.layout.num_layers}"
            )
        self.layout.check_block_ids(local_block_ids)

    def _plan_chunks(self, num_blocks: int) -> list[_Chunk]:
        lpc = self.config.layers_per_chunk or self.layout.num_layers
        bpc = self.config.blocks_per_chunk or num_blocks
        return [
            _Chunk(
                range(l0, min(l0 + lpc, self.layout.num_layers)),
                slice(b0, min(b0 + bpc, num_blocks)),
            )
            for l0 in range(0, self.layout.num_layers, lpc)
            for b0 in range(0, num_blocks, bpc)
        ]

    def _issue(self, load: _Load, chunk: _Chunk) -> None:
        params = load.params
        block_ids = params.block_ids[chunk.blocks]
        if chunk.dest is None:
            shape = self.layout.staging_shape(len(chunk.layers), len(block_ids))
            chunk.dest = self.staging.take(shape, self.layout.torch_dtype, self.kv_caches[0].device)
        read = ReadRequest(
            xfer_id=0,
            request_id=load.request_id,
            lease_id=params.lease_id,
            block_ids=block_ids,
            layer_start=chunk.layers.start,
            layer_end=chunk.layers.stop,
        )
        chunk.handle = self.transport.read_blocks(
            params.address, read, chunk.dest, self.config.read_timeout_s
        )

    def apply(self, meta: KvConnectorMeta) -> None:
        """Carry out what the scheduler half decided this step: aborts first, then loads."""
        for spec in meta.aborts:
            self.abort(spec.request_id, spec.params)
        for spec in meta.loads:
            self.start_load(spec.request_id, spec.params, spec.local_block_ids)
        for params in meta.keepalive:
            self.keep_alive(params)

    def keep_alive(self, params: KvTransferParams) -> None:
        """Renew the lease of a request not loading yet (waiting for blocks); rate-limited."""
        now = self._clock()
        every = self.config.heartbeat_interval_s or params.lease_ttl_s / 3
        if now - self._kept_alive.get(params.request_id, -float("inf")) < every:
            return
        self._kept_alive[params.request_id] = now
        self._tell(params, "heartbeat")

    def abort_load(self, request_id: str) -> bool:
        """Stop a load (the engine aborted the request); tells the serving side. Not reported."""
        load = self._loads.pop(request_id, None)
        if load is None:
            return False
        self._drop(load, "abort")
        return True

    def abort(self, request_id: str, params: KvTransferParams | None = None) -> None:
        """Abort the request on whichever side(s) this engine plays for it.

        With ``params`` of a load not yet started, the serving side is told too.
        """
        self._kept_alive.pop(request_id, None)
        if not self.abort_load(request_id) and params is not None:
            self._tell(params, "abort")
        self.leases.abort(request_id)

    def _drop(self, load: _Load, kind: str) -> None:
        """Forget a load: orphan its reads in flight, tell the serving side ``kind``."""
        for chunk in load.chunks:
            if chunk.handle is not None:
                self._orphans.add(chunk.handle)  # its buffer may still be written: not reused
            elif chunk.dest is not None:
                self.staging.give(chunk.dest)
            chunk.dest = None
        self._tell(load.params, kind)

    def _tell(self, params: KvTransferParams, kind: str) -> None:
        control = Control(
            xfer_id=0, kind=kind, request_id=params.request_id, lease_id=params.lease_id
        )
        try:
            self._orphans.add(
                self.transport.send_control(params.address, control, self.config.read_timeout_s)
            )
        except KVTransferError:
            pass  # best effort: the lease expires on its own

    # ================================================================== progress

    def get_finished(self) -> FinishedTransfers:
        """Drive every transfer one step; what finished since the last call."""
        self.leases.poll()
        self._reap_orphans()
        self._reap_heartbeats()
        for load in list(self._loads.values()):
            self._advance(load)
        finished, self._finished = self._finished, FinishedTransfers()
        return finished

    def _reap_orphans(self) -> None:
        for handle in list(self._orphans):
            if self.transport.poll(handle) is not None:
                self._orphans.discard(handle)

    def _reap_heartbeats(self) -> None:
        for handle, request_id in list(self._heartbeats.items()):
            done = self.transport.poll(handle)
            if done is None:
                continue
            del self._heartbeats[handle]
            load = self._loads.get(request_id)
            if (
                load is not None
                and done.error is not None
                and not isinstance(done.error, TransportConnectionError)
            ):
                self._fail(load, done.error)

    def _advance(self, load: _Load) -> None:
        try:
            for chunk in load.chunks:
                if not chunk.done and chunk.handle is not None:
                    self._check_chunk(load, chunk)
        except Exception as error:  # noqa: BLE001 - every failure fails this load only
            self._fail(load, error)
            return
        if all(chunk.done for chunk in load.chunks):
            self._succeed(load)
        elif self._clock() >= load.deadline:
            self._fail(
                load,
                KVTransferError(
                    f"request {load.request_id!r}: KV load timed out after "
                    f"{self.config.load_timeout_s} s"
                ),
            )
        else:
            self._maybe_heartbeat(load)

    def _check_chunk(self, load: _Load, chunk: _Chunk) -> None:
        assert chunk.handle is not None
        done = self.transport.poll(chunk.handle)
        if done is None:
            return
        chunk.handle = None
        if done.error is not None:
            self._retry_or_raise(load, chunk, done.error)
            return
        bad = self._verify(load, chunk)
        if not bad:
            self._scatter(load, chunk)
        elif chunk.refetches < 1:
            chunk.refetches += 1
            self._issue(load, chunk)
        else:
            raise KVChecksumError(
                f"request {load.request_id!r}: KV from {load.params.address} failed its checksum "
                f"twice at (layer, block) {bad[:8]}; refusing to use it"
            )

    def _retry_or_raise(self, load: _Load, chunk: _Chunk, error: BaseException) -> None:
        retryable = isinstance(error, TransportConnectionError)
        if retryable and chunk.retries < self.config.max_retries and self._clock() < load.deadline:
            chunk.retries += 1
            chunk.dest = None  # the failed read may still own the old buffer
            self._issue(load, chunk)
            return
        raise error

    def _verify(self, load: _Load, chunk: _Chunk) -> list[tuple[int, int]]:
        """The (layer, remote block id) pairs whose bytes do not match their checksum."""
        assert chunk.dest is not None
        got = staging_checksums(chunk.dest)
        block_ids = load.params.block_ids[chunk.blocks]
        bad = []
        for row, layer in zip(got, chunk.layers, strict=True):
            want = load.params.checksums[layer][chunk.blocks]
            bad += [(layer, b) for b, g, w in zip(block_ids, row, want, strict=True) if g != w]
        return bad

    def _scatter(self, load: _Load, chunk: _Chunk) -> None:
        assert chunk.dest is not None
        caches = self.kv_caches[chunk.layers.start : chunk.layers.stop]
        self._ops.scatter_blocks(chunk.dest, caches, load.local_ids[chunk.blocks])
        self.staging.give(chunk.dest)
        chunk.dest, chunk.done = None, True

    def _maybe_heartbeat(self, load: _Load) -> None:
        now = self._clock()
        if now - load.last_heartbeat < load.heartbeat_every:
            return
        load.last_heartbeat = now
        control = Control(
            xfer_id=0, kind="heartbeat", request_id=load.request_id, lease_id=load.params.lease_id
        )
        handle = self.transport.send_control(
            load.params.address, control, self.config.read_timeout_s
        )
        self._heartbeats[handle] = load.request_id

    def _succeed(self, load: _Load) -> None:
        del self._loads[load.request_id]
        self._drop(load, "release")
        self._finished.finished_recving.add(load.request_id)
        c = self.counters
        c["kv_transfers"] += 1
        c["kv_transfer_seconds"] += self._clock() - load.started
        c["kv_transfer_bytes"] += self.layout.staging_nbytes(
            self.layout.num_layers, len(load.local_ids)
        )

    def _fail(self, load: _Load, error: BaseException) -> None:
        if self._loads.pop(load.request_id, None) is None:
            return
        self._drop(load, "abort")
        self._finished.failed_recving[load.request_id] = error
        if not isinstance(error, RequestAbortedError):
            self.counters["kv_transfer_failures"] += 1

    # ================================================================== introspection

    @property
    def num_loading(self) -> int:
        return len(self._loads)

    def is_loading(self, request_id: str) -> bool:
        return request_id in self._loads

    def num_layers_ready(self, request_id: str) -> int:
        """Leading layers whose every chunk is verified and in place (for layer-wise overlap).

        A finished load reports nothing here: it is in ``finished_recving`` instead.
        """
        load = self._loads.get(request_id)
        if load is None:
            return 0
        pending = [c.layers.start for c in load.chunks if not c.done]
        return min(pending, default=self.layout.num_layers)

    def close(self) -> None:
        """Abort every load, then close the transport."""
        for request_id in list(self._loads):
            self.abort_load(request_id)
        self.transport.close()
