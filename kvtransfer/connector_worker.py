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
import logging
import threading
import time
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from typing import Any

import torch

from splitserve import env
from splitserve.errors import KVChecksumError, KVTransferError, RequestAbortedError
from splitserve.integrity import IntegrityReport
from splitserve.kernels.kv_cache import BLOCK_MAJOR, kv_pool
from splitserve.kernels.ops import get_ops
from splitserve.kvtransfer.connector_scheduler import FinishedTransfers, KvConnectorMeta
from splitserve.kvtransfer.layout import (
    KvLayout,
    block_regions,
    cache_checksums,
    merge_runs,
    staging_checksums,
)
from splitserve.kvtransfer.lease import (
    DEFAULT_LEASE_TTL_S,
    LeaseEnd,
    LeaseManager,
    TransferSecretError,
)
from splitserve.kvtransfer.params import Control, KvTransferParams, ReadRequest
from splitserve.kvtransfer.staging import StagingPool
from splitserve.kvtransfer.transport import (
    STREAM_WAIT_S,
    Dest,
    KvTransport,
    TransportConnectionError,
)

logger = logging.getLogger(__name__)

MAX_RUNS_PER_READ = 4096
"""More runs than this in one read (blocks scattered all over the pool) fall back to staging:
past it the per-message cost outweighs the copy it saves (and the UCX tag space is bounded)."""


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
    zero_copy: bool = True
    """Read straight into the destination blocks, one message per run of consecutive blocks,
    when both caches are block-major and a read moves every layer (a streamed group: one
    message per block); False always stages."""
    stream_layers: int = dataclasses.field(
        default_factory=lambda: env.SPLITSERVE_KV_LAYERWISE.get()
    )
    """Layer-wise streaming, serving side: > 0 offers a request's KV when its last prompt
    chunk is scheduled, before the forward computes it, and serves it in groups of this
    many layers as each group is computed (``offer_stream``); 0 offers after the first
    token (``offer``). The reading side follows whatever the params say."""

    stream_zero_copy_max_blocks: int = 16
    """Reading side of a streamed transfer: a layer group of at most this many blocks goes
    zero-copy (one message per block: a run of blocks is contiguous only across every
    layer); a bigger group goes as one staged message (gathered, sent, scattered), which
    bounds the messages per group (the per-block alternative is not measured at that size)."""

    def __post_init__(self) -> None:
        if self.read_timeout_s <= 0 or self.load_timeout_s <= 0:
            raise ValueError("read_timeout_s and load_timeout_s must be > 0")
        for name in ("stream_layers", "stream_zero_copy_max_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
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
    runs: list[int] = dataclasses.field(default_factory=list)
    """Zero-copy (every layer, block-major pools): run lengths, each one message straight
    into the destination blocks. Empty: staged through ``dest``."""
    dest: torch.Tensor | None = None
    handle: int | None = None
    checksums: list[list[int]] | None = None
    """A streamed transfer's group: the checksums its reply carried."""
    refetches: int = 0
    retries: int = 0
    done: bool = False


@dataclasses.dataclass
class _Stream:
    """Serving side of a layer-wise streamed transfer: how far the forward has got."""

    block_ids: list[int]
    checksums: list[list[int]] = dataclasses.field(default_factory=list)
    """``[layer][i]`` for the layers computed so far (the watermark is its length)."""
    num_served: int = 0
    """Reads whose bytes went out so far."""

    @property
    def num_computed(self) -> int:
        return len(self.checksums)


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
        layer_windows: str = "",
        model_signature: str = "",
    ) -> None:
        self.engine_id = engine_id
        self.kv_caches = list(kv_caches)
        self.layout = KvLayout.from_kv_caches(
            self.kv_caches, model_id, layer_windows, model_signature
        )
        self.transport = transport
        self.config = config or TransferConfig()
        self._ops = get_ops(self.kv_caches[0].device)
        self._pool = kv_pool(self.kv_caches) if self.layout.layout_kind == BLOCK_MAJOR else None
        """[num_blocks, num_layers, 2, block_size, heads, head_dim]: zero-copy reads and sends
        address runs of blocks in it (None for layer-major caches: staged only)."""
        self._clock = clock
        self._on_release = on_release
        self.leases = LeaseManager(self._lease_ended, lease_ttl_s, clock)
        self.staging = StagingPool()
        self._loads: dict[str, _Load] = {}
        self._orphans: set[int] = set()  # handles whose outcome no longer matters
        self._heartbeats: dict[int, str] = {}
        self._kept_alive: dict[str, float] = {}  # request id -> last keep-alive (not loading)
        self._finished = FinishedTransfers()
        self._streams: dict[str, _Stream] = {}
        """Serving side: streamed transfers offered and not ended, by request id."""
        self._forward: list[str] = []
        """Streams the running forward computes (``offer_stream`` .. ``end_forward``)."""
        self._stream_cond = threading.Condition()
        """Guards ``_streams``' watermarks (the engine thread advances them, the transport's
        thread reads them)."""
        self._stream_hold_s = env.SPLITSERVE_TEST_KV_STREAM_HOLD_S.get()
        self.counters = {"kv_transfer_bytes": 0, "kv_transfer_seconds": 0.0,
                         "kv_transfer_failures": 0, "kv_transfers": 0,
                         "kv_transfer_refused": 0, "kv_streamed_transfers": 0,
                         "kv_stream_groups": 0, "kv_stream_offers": 0,
                         "kv_stream_early_reads": 0, "kv_stuck_reads": 0}
        """Pulls of this engine (decode side): verified bytes, seconds, count, failed loads,
        streamed loads and their verified layer groups; serving side: reads and controls
        refused for a wrong transfer secret, reads that never unwound (their lease freed
        anyway, see ``lease.py``), streamed offers, and streamed reads answered
        while the forward that computes their KV was still running."""
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
        return self._params(request_id, block_ids, num_tokens, lease.lease_id, lease.ttl_s,
                            lease.secret, checksums)

    def _params(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int, lease_id: int,
        ttl_s: float, secret: str, checksums: list[list[int]], stream_layers: int = 0,
    ) -> KvTransferParams:
        return KvTransferParams(
            request_id=request_id,
            engine_id=self.engine_id,
            address=self.transport.address,
            block_ids=list(block_ids),
            num_tokens=num_tokens,
            lease_id=lease_id,
            lease_ttl_s=ttl_s,
            checksums=checksums,
            compat_hash=self.layout.compatibility_hash(),
            secret=secret,
            stream_layers=stream_layers,
            num_stream_layers=self.layout.num_layers if stream_layers else 0,
        )

    # ------------------------------------------------------------------ layer-wise streaming

    @property
    def streaming(self) -> bool:
        """Offer KV layer-wise, before the forward that computes it (``stream_layers``)."""
        return self.config.stream_layers > 0

    def offer_stream(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int, ttl_s: float | None = None
    ) -> KvTransferParams:
        """Lease ``block_ids`` before the forward of the request's last prompt chunk has run;
        its layers are served as the forward computes them (``on_layer_computed``). Call
        ``end_forward`` once that forward returned (or failed)."""
        self.layout.check_block_ids(block_ids)
        if num_tokens > len(block_ids) * self.layout.block_size:
            raise ValueError(
                f"request {request_id!r}: {num_tokens} tokens do not fit {len(block_ids)} blocks"
            )
        group = min(self.config.stream_layers, self.layout.num_layers)
        lease = self.leases.grant(request_id, block_ids, ttl_s)
        with self._stream_cond:
            self._streams[request_id] = _Stream(list(block_ids))
        self._forward.append(request_id)
        self.counters["kv_stream_offers"] += 1
        return self._params(request_id, block_ids, num_tokens, lease.lease_id, lease.ttl_s,
                            lease.secret, [], stream_layers=group)

    def on_layer_computed(self, layer: int) -> None:
        """The running forward has stored layer ``layer``'s KV (engine thread, in the model's
        per-layer hook). At the end of each group of ``stream_layers`` layers, checksum the
        group's blocks of every stream in this forward and let their reads go out."""
        done = layer + 1
        if not self._forward or (done % self.config.stream_layers and done < self.layout.num_layers):
            return
        for request_id in self._forward:
            with self._stream_cond:
                stream = self._streams.get(request_id)
                start = stream.num_computed if stream is not None else done
            if stream is None or start >= done:
                continue
            rows = cache_checksums(self.kv_caches[start:done], stream.block_ids)
            with self._stream_cond:
                stream.checksums.extend(rows)
                self._stream_cond.notify_all()
            if start == 0 and self._stream_hold_s > 0:
                self._hold_until_served(stream)

    def _hold_until_served(self, stream: _Stream) -> None:
        """Tests only (``SPLITSERVE_TEST_KV_STREAM_HOLD_S``): pause the forward after the first
        group until a read of it was sent, so that a test sees reads served while the forward
        still runs (or kills the worker mid-forward) whatever this machine's speed."""
        with self._stream_cond:
            self._stream_cond.wait_for(lambda: stream.num_served > 0, self._stream_hold_s)

    def end_forward(self) -> None:
        """The forward that ``offer_stream``'s requests were offered for returned or failed;
        a stream it did not finish is never served past what it did compute."""
        self._forward.clear()

    def layers_ready(self, read: ReadRequest) -> list[list[int]] | None:
        """ServeHandler: None while a streamed read's layers are not computed yet; then the
        checksums of its layers and blocks (``[]`` for a transfer offered complete)."""
        self._authenticate(read.request_id, read.lease_id, read.secret)
        self.leases.renew(read.request_id, read.lease_id)  # raises once the lease is gone
        with self._stream_cond:
            stream = self._streams.get(read.request_id)
            if stream is None:
                return []
            if stream.num_computed < read.layer_end:
                return None
            where = {b: i for i, b in enumerate(stream.block_ids)}
            try:
                rows = [[stream.checksums[layer][where[b]] for b in read.block_ids]
                        for layer in range(read.layer_start, read.layer_end)]
            except KeyError as e:
                raise KVTransferError(f"block {e} is not part of {read.request_id!r}") from e
            return rows

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
        self._authenticate(read.request_id, read.lease_id, read.secret)
        self.leases.pin(read.request_id, read.lease_id, read.block_ids)
        return _PinnedParts(self._gather_parts(read, layers_per_part), self._unpin_once(read))

    def _gather_parts(
        self, read: ReadRequest, layers_per_part: int
    ) -> Generator[torch.Tensor, None, None]:
        device = self.kv_caches[0].device
        ids = torch.tensor(read.block_ids, dtype=torch.long, device=device)
        for l0 in range(read.layer_start, read.layer_end, layers_per_part):
            l1 = min(l0 + layers_per_part, read.layer_end)
            shape = self.layout.staging_shape(l1 - l0, len(read.block_ids))
            out = self.staging.take(shape, self.layout.torch_dtype, device)
            yield self._ops.gather_blocks(self.kv_caches[l0:l1], ids, out=out)

    def serve_regions(
        self, read: ReadRequest
    ) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """ServeHandler: the pool regions of a zero-copy read, pinned until ``unpin()``."""
        if self._pool is None:
            raise KVTransferError("this engine's KV cache is not block-major: no zero-copy reads")
        if read.layer_end > self.layout.num_layers:
            raise KVTransferError(
                f"read asks for layers up to {read.layer_end}, "
                f"this engine has {self.layout.num_layers}"
            )
        try:
            self.layout.check_block_ids(read.block_ids)
            layers = range(read.layer_start, read.layer_end)
            regions = block_regions(self._pool, read.block_ids, read.runs, layers)
        except ValueError as e:
            raise KVTransferError(f"request {read.request_id!r}: {e}") from e
        self._authenticate(read.request_id, read.lease_id, read.secret)
        self.leases.pin(read.request_id, read.lease_id, read.block_ids)
        return regions, self._unpin_once(read)

    def _unpin_once(self, read: ReadRequest) -> Callable[[], None]:
        done = False

        def unpin() -> None:
            nonlocal done
            if not done:
                done = True
                self.leases.unpin(read.request_id, read.lease_id)

        return unpin

    def release_staging(self, staging: torch.Tensor) -> None:
        """ServeHandler: the transport is done with a buffer from ``stage``."""
        self.staging.give(staging)

    def check_lease(self, read: ReadRequest) -> None:
        """ServeHandler: the request may have been aborted or expired while its read was staged.
        Its bytes go out next: a streamed read is counted as served (early while the forward
        that computes the request's KV still runs)."""
        self._authenticate(read.request_id, read.lease_id, read.secret)
        self.leases.renew(read.request_id, read.lease_id)
        with self._stream_cond:
            stream = self._streams.get(read.request_id)
            if stream is None:
                return
            if stream.num_computed < self.layout.num_layers:
                self.counters["kv_stream_early_reads"] += 1
            stream.num_served += 1
            self._stream_cond.notify_all()

    def on_control(self, control: Control) -> None:
        """ServeHandler: a reader's heartbeat, release or abort (with the transfer's secret)."""
        self._authenticate(control.request_id, control.lease_id, control.secret)
        if control.kind == "heartbeat":
            self.leases.renew(control.request_id, control.lease_id)
        elif control.kind == "release":
            self.leases.release(control.request_id, control.lease_id)
        else:
            self.leases.abort(control.request_id, control.lease_id)

    def _authenticate(self, request_id: str, lease_id: int, secret: str) -> None:
        """The reader must present the transfer's secret; a refusal is counted in stats."""
        try:
            self.leases.authenticate(request_id, lease_id, secret)
        except TransferSecretError:
            self.counters["kv_transfer_refused"] = self.leases.num_refused  # one atomic store
            logger.warning("KV read/control for %r refused: wrong transfer secret", request_id)
            raise

    def _lease_ended(self, request_id: str, reason: LeaseEnd) -> None:
        with self._stream_cond:
            self._streams.pop(request_id, None)
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
        # a streamed load spans the remote forward too: the serving side bounds that wait
        wait = STREAM_WAIT_S if params.stream_layers else 0.0
        every = self.config.heartbeat_interval_s or params.lease_ttl_s / 3
        load = _Load(
            request_id,
            params,
            torch.tensor(list(local_block_ids), dtype=torch.long, device=self.kv_caches[0].device),
            self._plan_chunks(params, list(local_block_ids)),
            now + wait + self.config.load_timeout_s,
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
        if len(set(local_block_ids)) != len(local_block_ids):
            raise ValueError(f"request {request_id!r}: local block ids repeat (runs would overlap)")
        loading = set().union(*(load.local_ids.tolist() for load in self._loads.values()))
        busy = set(local_block_ids) & loading
        if busy:
            raise ValueError(
                f"request {request_id!r}: blocks {sorted(busy)[:8]} are being loaded by "
                "another request"
            )

    def _plan_chunks(self, params: KvTransferParams, local_ids: list[int]) -> list[_Chunk]:
        """Reads of ``layers x blocks``. A streamed transfer reads in its own layer groups (all
        in flight at once: the serving side answers each when its layers are computed)."""
        remote_ids = params.block_ids
        num_blocks = len(local_ids)
        lpc = params.stream_layers or self.config.layers_per_chunk or self.layout.num_layers
        bpc = self.config.blocks_per_chunk or num_blocks
        chunks = [
            _Chunk(
                range(l0, min(l0 + lpc, self.layout.num_layers)),
                slice(b0, min(b0 + bpc, num_blocks)),
            )
            for l0 in range(0, self.layout.num_layers, lpc)
            for b0 in range(0, num_blocks, bpc)
        ]
        if self._zero_copy(lpc, streamed=params.stream_layers > 0):
            for chunk in chunks:
                if len(chunk.layers) < self.layout.num_layers:  # a group: one block per run
                    n = len(local_ids[chunk.blocks])
                    chunk.runs = [1] * n if n <= self.config.stream_zero_copy_max_blocks else []
                else:
                    chunk.runs = merge_runs(remote_ids[chunk.blocks], local_ids[chunk.blocks])
                if len(chunk.runs) > MAX_RUNS_PER_READ:
                    chunk.runs = []  # scattered blocks: one staged message is cheaper
        return chunks

    def _zero_copy(self, layers_per_chunk: int, streamed: bool = False) -> bool:
        """Reads go straight into the destination blocks when both pools are block-major (the
        handshake guarantees the peer's kind equals ours) and each read moves every layer,
        or is a streamed group (one message per block: a block's layers are contiguous)."""
        return (
            self.config.zero_copy
            and env.SPLITSERVE_KV_ZERO_COPY.get()
            and self._pool is not None
            and (streamed or layers_per_chunk >= self.layout.num_layers)
        )

    def _issue(self, load: _Load, chunk: _Chunk) -> None:
        params = load.params
        block_ids = params.block_ids[chunk.blocks]
        dest: Dest
        if chunk.runs:
            assert self._pool is not None
            local = load.local_ids[chunk.blocks].tolist()
            dest = block_regions(self._pool, local, chunk.runs, chunk.layers)
        else:
            if chunk.dest is None:
                shape = self.layout.staging_shape(len(chunk.layers), len(block_ids))
                chunk.dest = self.staging.take(
                    shape, self.layout.torch_dtype, self.kv_caches[0].device
                )
            dest = chunk.dest
        read = ReadRequest(
            xfer_id=0,
            request_id=load.request_id,
            lease_id=params.lease_id,
            block_ids=block_ids,
            layer_start=chunk.layers.start,
            layer_end=chunk.layers.stop,
            secret=params.secret,
            runs=chunk.runs,
        )
        # a streamed group waits on the serving side until the forward computed it
        wait = STREAM_WAIT_S if params.stream_layers else 0.0
        timeout = wait + self.config.read_timeout_s
        chunk.handle = self.transport.read_blocks(params.address, read, dest, timeout)

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
            if chunk.handle is not None and chunk.runs:
                # it writes into KV blocks the engine frees next: stop it before returning
                self.transport.cancel(chunk.handle, self.config.read_timeout_s)
                self._orphans.add(chunk.handle)
            elif chunk.handle is not None:
                self._orphans.add(chunk.handle)  # its buffer may still be written: not reused
            elif chunk.dest is not None:
                self.staging.give(chunk.dest)
            chunk.dest = None
        self._tell(load.params, kind)

    def _tell(self, params: KvTransferParams, kind: str) -> None:
        control = Control(
            xfer_id=0,
            kind=kind,
            request_id=params.request_id,
            lease_id=params.lease_id,
            secret=params.secret,
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
        if self.leases.num_stuck_reads != self.counters["kv_stuck_reads"]:
            logger.warning("%d KV reads never unwound; their leases were freed one ttl after "
                           "they ran out", self.leases.num_stuck_reads)
            self.counters["kv_stuck_reads"] = self.leases.num_stuck_reads
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
        chunk.checksums = done.checksums
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
        """The (layer, remote block id) pairs whose bytes do not match their checksum: read in
        place from the destination blocks (zero-copy) or from the staging buffer."""
        if chunk.runs:
            caches = self.kv_caches[chunk.layers.start : chunk.layers.stop]
            got = cache_checksums(caches, load.local_ids[chunk.blocks].tolist())
        else:
            assert chunk.dest is not None
            got = staging_checksums(chunk.dest)
        block_ids = load.params.block_ids[chunk.blocks]
        wants = self._expected(load, chunk, len(block_ids))
        bad = []
        for row, layer, want in zip(got, chunk.layers, wants, strict=True):
            bad += [(layer, b) for b, g, w in zip(block_ids, row, want, strict=True) if g != w]
        return bad

    def _expected(self, load: _Load, chunk: _Chunk, num_blocks: int) -> list[list[int]]:
        """The checksums ``[layer][i]`` a chunk must match: from the params, or (streamed)
        from its reply, which must cover exactly its layers and blocks."""
        if not load.params.stream_layers:
            return [load.params.checksums[layer][chunk.blocks] for layer in chunk.layers]
        rows = chunk.checksums or []
        if len(rows) != len(chunk.layers) or any(len(row) != num_blocks for row in rows):
            raise KVTransferError(
                f"request {load.request_id!r}: the reply for layers {chunk.layers} carries "
                f"no checksums for its {num_blocks} blocks"
            )
        return rows

    def _scatter(self, load: _Load, chunk: _Chunk) -> None:
        if load.params.stream_layers:
            self.counters["kv_stream_groups"] += 1
        if chunk.runs:  # already in place
            chunk.done = True
            return
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
            xfer_id=0,
            kind="heartbeat",
            request_id=load.request_id,
            lease_id=load.params.lease_id,
            secret=load.params.secret,
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
        c["kv_streamed_transfers"] += int(load.params.stream_layers > 0)
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

    def check_integrity(
        self, held: Mapping[str, Sequence[int]], loading: Collection[str]
    ) -> IntegrityReport:
        """Against the engine's view (``held``: request -> block ids kept for a reader;
        ``loading``: requests pulling KV): every lease covers blocks its request holds, every
        held request has a lease or a reported end (else its blocks are leaked), and no load
        writes into blocks of a request the engine no longer loads."""
        report = self.leases.check_integrity(set(held))
        leased = {lease.request_id: lease for lease in self.leases.leases()}
        for request_id, block_ids in held.items():
            lease = leased.get(request_id)
            if lease is None and request_id not in self._finished.finished_sending:
                report.add(f"held request {request_id!r} has no lease: its blocks never free")
                report.leaked_blocks += len(block_ids)
            elif lease is not None and not set(lease.block_ids) <= set(block_ids):
                report.add(f"lease of {request_id!r} covers blocks its request does not hold")
        for request_id in sorted(set(self._loads) - set(loading)):
            report.add(f"load of {request_id!r} writes into blocks of a request not loading")
        return report

    def close(self) -> None:
        """Abort every load, then close the transport."""
        for request_id in list(self._loads):
            self.abort_load(request_id)
        self.transport.close()


class _PinnedParts(Generator[torch.Tensor, None, None]):
    """The staged parts of one read, holding its lease pinned until exhausted, failed or
    closed. Unlike a bare generator, closing it unpins even if no part was ever asked for
    (a read cancelled before its first gather), and only once."""

    def __init__(self, parts: Generator[torch.Tensor, None, None], unpin: Callable[[], None]):
        self._parts = parts
        self._unpin = unpin

    def send(self, value: None) -> torch.Tensor:
        try:
            return self._parts.send(value)
        except BaseException:
            self._unpin()
            raise

    def throw(self, *args: Any) -> torch.Tensor:  # type: ignore[override]
        try:
            return self._parts.throw(*args)
        except BaseException:
            self._unpin()
            raise

    def close(self) -> None:
        try:
            self._parts.close()
        finally:
            self._unpin()
