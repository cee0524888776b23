"""The transport interface: the one small ABC every byte mover implements, and its factory.

Owns ``KvTransport`` (register memory, read remote blocks, send lease control, poll
completion, close), ``ServeHandler`` (what the serving side's connector answers reads
with), ``Completion`` and ``FaultInjector`` (test-only faults a real run cannot produce on
demand). Implementations: ``UcxTransport`` (ucx_transport.py) and ``LoopbackTransport``
(loopback.py), chosen through ``create_transport``.

A read names the serving side's block ids and a layer range; the transport fills the
caller's staging buffer ``[layers, 2, n, block_size, kv_heads, head_dim]``. Two-sided
backends ask the serving side to gather and send; an RMA backend could instead get the
bytes from memory registered with ``register_memory`` without changing this interface.
Transports never verify checksums, hold leases or touch the engine: the connector does.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

import torch

from splitserve.errors import IncompatibleKVLayoutError, KVTransferError, RequestAbortedError
from splitserve.kvtransfer.layout import KvLayout
from splitserve.kvtransfer.lease import LeaseExpiredError, TransferSecretError
from splitserve.kvtransfer.params import Control, ReadRequest, Reply

DEFAULT_TIMEOUT_S = 10.0
"""Deadline of one read or control round trip, connection set-up included."""
STREAM_WAIT_S = 60.0
"""Longest a read of a streamed transfer waits on the serving side for its layers to be
computed before it is refused (the reader then recomputes the prompt)."""


class TransportConnectionError(KVTransferError):
    """The peer could not be reached, went away or did not answer in time; worth one retry."""


def error_reply(xfer_id: int, error: BaseException) -> Reply:
    """The reply that carries ``error`` to the reading side (see ``reply_error``)."""
    code = "bad"
    if isinstance(error, IncompatibleKVLayoutError):
        code = "layout"
    elif isinstance(error, RequestAbortedError):
        code = "aborted"
    elif isinstance(error, LeaseExpiredError):
        code = "lease"
    elif isinstance(error, TransferSecretError):
        code = "secret"
    field = getattr(error, "field", None) or ""
    return Reply(xfer_id=xfer_id, ok=False, error=str(error), code=code, field=field)


def reply_error(reply: Reply, peer: str) -> BaseException:
    """The exception a failed ``Reply`` stands for, raised on the reading side."""
    message = f"{peer}: {reply.error}"
    if reply.code == "layout":
        return IncompatibleKVLayoutError(message, field=reply.field or None)
    if reply.code == "aborted":
        return RequestAbortedError(message)
    if reply.code == "lease":
        return LeaseExpiredError(message)
    if reply.code == "secret":
        return TransferSecretError(message)
    return KVTransferError(message)


class ServeHandler(Protocol):
    """The serving side's connector, as its transport sees it. Called on the transport's thread."""

    def stage(self, read: ReadRequest) -> torch.Tensor:
        """Check the lease, gather the blocks into a fresh contiguous staging buffer, return it.

        Raises ``KVTransferError`` (bad lease or blocks) or ``RequestAbortedError``.
        """
        ...

    def stage_parts(
        self, read: ReadRequest, layers_per_part: int
    ) -> Generator[torch.Tensor, None, None]:
        """``stage`` in groups of ``layers_per_part`` layers, for pipelined sends.

        Checks the lease at once (raising like ``stage``), then holds it pinned until the
        iterator is exhausted or closed; every part goes back through ``release_staging``.
        """
        ...

    def serve_regions(
        self, read: ReadRequest
    ) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """Zero-copy read (``read.runs``): check the lease and the runs, pin the blocks, and
        return the regions of the KV pool to send (one per run, no copy) with the ``unpin``
        to call (idempotent) once they are sent or dropped. Raises like ``stage``, or
        ``KVTransferError`` for a bad run."""
        ...

    def release_staging(self, staging: torch.Tensor) -> None:
        """The bytes of ``staging`` (from ``stage``) are sent or dropped; it may be reused."""
        ...

    def layers_ready(self, read: ReadRequest) -> list[list[int]] | None:
        """Layer-wise streaming: None while ``read``'s layers are still being computed (the
        transport asks again, up to ``STREAM_WAIT_S``); then the checksums to send with
        the reply (``[]`` for a transfer that was complete when offered). Raises like
        ``stage`` once the lease is gone (aborted, expired)."""
        ...

    def check_lease(self, read: ReadRequest) -> None:
        """Raise unless ``read``'s lease is still live (called again just before bytes go out)."""
        ...

    def on_control(self, control: Control) -> None:
        """Apply a heartbeat, release or abort; raises ``KVTransferError`` for a dead lease."""
        ...


@dataclasses.dataclass(frozen=True)
class Completion:
    """Outcome of one read or control operation."""

    handle: int
    error: BaseException | None = None
    checksums: list[list[int]] | None = None
    """A read of a streamed transfer: the served group's ``[layer][i]`` checksums (from the
    reply), to verify the bytes against; None otherwise."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class FaultInjector:
    """Faults for tests, applied by the serving side just before it sends staged bytes.

    Corruption flips one byte of the staged copy (never of the KV cache itself), so the
    bytes on the wire no longer match the checksums offered with the request.
    """

    corrupt_sends: int = 0
    """How many of the next sends to corrupt."""
    delay_send_s: float = 0.0
    """Sleep this long before each send (to kill a peer or abort mid-transfer)."""
    num_sends: int = 0
    """Sends seen so far."""
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def before_send(self, staging: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.num_sends += 1
            corrupt = self.corrupt_sends > 0
            self.corrupt_sends -= int(corrupt)
        if corrupt:
            flat = staging.reshape(-1).view(torch.uint8)
            flat[flat.numel() // 2] ^= 0xFF
        return staging

    def before_send_regions(self, regions: list[torch.Tensor]) -> list[torch.Tensor]:
        """``before_send`` for a zero-copy send: a corrupted send goes from a copy of the
        first region, so the KV pool itself is never touched."""
        with self._lock:
            corrupt = self.corrupt_sends > 0
        if not corrupt or not regions:
            with self._lock:
                self.num_sends += 1
            return regions
        return [self.before_send(regions[0].clone()), *regions[1:]]

    def delay(self) -> float:
        return self.delay_send_s


class KvTransport(abc.ABC):
    """Moves KV bytes between engines. Thread-safe; every call returns without blocking on I/O.

    Mutates only its own connections and the ``dest`` buffers handed to ``read_blocks``.
    """

    fault: FaultInjector | None = None

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Where peers reach this transport (``scheme://...``), once ``register_memory`` ran."""

    @abc.abstractmethod
    def register_memory(self, layout: KvLayout, server: ServeHandler | None = None) -> None:
        """Declare this engine's KV layout; with ``server``, also start answering peers' reads.

        Called once, before any other method. The layout is checked against every peer at
        handshake; a mismatch fails the operation with ``IncompatibleKVLayoutError``.
        """

    @abc.abstractmethod
    def read_blocks(
        self,
        address: str,
        read: ReadRequest,
        dest: torch.Tensor,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> int:
        """Start filling ``dest`` (contiguous, ``layout.staging_shape(...)``) from a peer; a handle.

        ``dest`` must stay untouched until ``poll`` returns this handle's completion.
        """

    @abc.abstractmethod
    def send_control(
        self, address: str, control: Control, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> int:
        """Start a heartbeat, release or abort round trip to a peer; a handle."""

    @abc.abstractmethod
    def poll(self, handle: int) -> Completion | None:
        """The completion of ``handle`` (and forget it), or None while it is in flight."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop serving, drop every connection, fail every operation in flight. Idempotent."""

    def cancel(self, handle: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Stop ``handle`` and return only once nothing writes into its ``dest`` any more
        (zero-copy reads land in KV blocks the engine is about to free). Its completion is
        still collected through ``poll``. Default: nothing to stop (synchronous transports
        finish every read inside ``read_blocks``)."""
        return None

    def wait(self, handle: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Completion:
        """Block until ``handle`` completes (tests, benchmarks and synchronous callers)."""
        deadline = time.monotonic() + timeout_s
        while True:
            done = self.poll(handle)
            if done is not None:
                return done
            if time.monotonic() >= deadline:
                return Completion(handle, KVTransferError(f"operation {handle} timed out"))
            time.sleep(0.0005)


Dest = torch.Tensor | Sequence[torch.Tensor]
"""Where a read lands: a staging buffer, or (zero-copy, ``read.runs``) one contiguous
region of the reader's block-major pool per run."""


def check_dest(layout: KvLayout, read: ReadRequest, dest: Dest) -> None:
    """Raise ``ValueError`` unless ``dest`` can hold what ``read`` asks for."""
    if read.runs:
        _check_regions(layout, read, dest)
        return
    if not isinstance(dest, torch.Tensor):
        raise ValueError("a staged read (no runs) needs one staging tensor as dest")
    shape = layout.staging_shape(read.num_layers, len(read.block_ids))
    if tuple(dest.shape) != shape or dest.dtype != layout.torch_dtype:
        raise ValueError(
            f"dest must be {shape} {layout.dtype}, got {tuple(dest.shape)} {dest.dtype}"
        )
    if not dest.is_contiguous():
        raise ValueError("dest must be contiguous")


def _check_regions(layout: KvLayout, read: ReadRequest, dest: Dest) -> None:
    if isinstance(dest, torch.Tensor) or len(dest) != len(read.runs):
        raise ValueError(f"a zero-copy read needs {len(read.runs)} destination regions")
    every_layer = read.num_layers == layout.num_layers
    if not every_layer and any(n != 1 for n in read.runs):
        raise ValueError("a zero-copy read of some layers goes one block per run")
    for n, region in zip(read.runs, dest, strict=True):
        want = n * read.num_layers * layout.bytes_per_layer_block
        got = region.numel() * region.element_size()
        if got != want or not region.is_contiguous():
            raise ValueError(f"region for a run of {n} blocks must be {want} contiguous bytes")


def split_address(address: str) -> tuple[str, str]:
    """``"ucx://host:port"`` -> ``("ucx", "host:port")``."""
    scheme, sep, rest = address.partition("://")
    if not sep or not rest:
        raise ValueError(f"transport address must look like scheme://where, got {address!r}")
    return scheme, rest


def create_transport(kind: str, **kwargs: Any) -> KvTransport:
    """A transport by name: ``"ucx"`` (``UcxTransport(host=..., port=...)``) or ``"loopback"``."""
    if kind == "ucx":
        from splitserve.kvtransfer.ucx_transport import UcxTransport

        return UcxTransport(**kwargs)
    if kind == "loopback":
        from splitserve.kvtransfer.loopback import LoopbackTransport

        return LoopbackTransport(**kwargs)
    raise ValueError(f"unknown KV transport {kind!r}; choose 'ucx' or 'loopback'")
