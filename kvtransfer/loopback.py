"""In-process transport for unit tests: peers find each other in a module-level registry.

Owns ``LoopbackTransport``. A read runs synchronously inside ``read_blocks`` (handshake,
the server's ``stage``, the fault hook, one copy into ``dest``) and its completion waits
for ``poll``; a read of a streamed transfer whose layers are not computed yet stays
pending and is tried again by each ``poll`` (both engines may step on one thread). It goes through the same handshake, lease and fault paths as UCX, so the
connector is tested against the real semantics without sockets. Not for production.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence

import torch

from splitserve.errors import KVTransferError
from splitserve.kvtransfer.layout import KvLayout
from splitserve.kvtransfer.params import Control, ReadRequest
from splitserve.kvtransfer.transport import (
    DEFAULT_TIMEOUT_S,
    STREAM_WAIT_S,
    Completion,
    Dest,
    FaultInjector,
    KvTransport,
    ServeHandler,
    check_dest,
    split_address,
)

_REGISTRY: dict[str, LoopbackTransport] = {}
_REGISTRY_LOCK = threading.Lock()
_NAMES = itertools.count()


class LoopbackTransport(KvTransport):
    """Transport between engines of one process. Thread-safe."""

    def __init__(self, name: str | None = None, fault: FaultInjector | None = None) -> None:
        self._name = name or f"engine-{next(_NAMES)}"
        self.fault = fault
        self._layout: KvLayout | None = None
        self._server: ServeHandler | None = None
        self._handles = itertools.count(1)
        self._done: dict[int, Completion] = {}
        self._waiting: dict[int, tuple[str, ReadRequest, Dest, float]] = {}
        """Reads of streamed transfers whose layers are not computed yet (and deadlines)."""
        self._lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        return f"loopback://{self._name}"

    def register_memory(self, layout: KvLayout, server: ServeHandler | None = None) -> None:
        self._layout, self._server = layout, server
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self._name, self) is not self:
                raise ValueError(f"loopback transport name {self._name!r} is taken")
            _REGISTRY[self._name] = self

    def read_blocks(
        self,
        address: str,
        read: ReadRequest,
        dest: Dest,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> int:
        layout = self._require_layout()
        check_dest(layout, read, dest)
        handle = next(self._handles)
        with self._lock:
            self._waiting[handle] = (address, read, dest, time.monotonic() + STREAM_WAIT_S)
        self._try_read(handle)
        return handle

    def _try_read(self, handle: int) -> None:
        """Run a waiting read if its layers are computed (or fail it past its deadline)."""
        with self._lock:
            address, read, dest, deadline = self._waiting.pop(handle)
        checksums: list[list[int]] | None = None
        error: BaseException | None = None
        try:
            checksums = self._serving_peer(address).layers_ready(read)
            if checksums is None and time.monotonic() < deadline:
                with self._lock:
                    self._waiting[handle] = (address, read, dest, deadline)
                return
            if checksums is None:
                raise KVTransferError(f"layers of {read.request_id!r} were never computed")
            self._read(address, read, dest)
        except Exception as e:  # every failure is reported through poll, as over a network
            error = e
        with self._lock:
            self._done[handle] = Completion(handle, error, (checksums or None) if not error else None)

    def cancel(self, handle: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """A waiting read is dropped (completed as cancelled); others already finished."""
        with self._lock:
            if self._waiting.pop(handle, None) is not None:
                self._done[handle] = Completion(handle, KVTransferError("cancelled"))

    def send_control(
        self, address: str, control: Control, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> int:
        self._require_layout()
        return self._complete(lambda: self._serving_peer(address).on_control(control))

    def poll(self, handle: int) -> Completion | None:
        with self._lock:
            waiting = handle in self._waiting
        if waiting:
            self._try_read(handle)
        with self._lock:
            if handle in self._waiting:
                return None
            if handle not in self._done:
                raise KeyError(f"unknown or already polled transfer handle {handle}")
            return self._done.pop(handle)

    def close(self) -> None:
        self._closed = True
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self._name) is self:
                del _REGISTRY[self._name]

    # ------------------------------------------------------------------ internals

    def _complete(self, op: object) -> int:
        handle = next(self._handles)
        error: BaseException | None = None
        try:
            op()  # type: ignore[operator]
        except Exception as e:  # every failure is reported through poll, as over a network
            error = e
        with self._lock:
            self._done[handle] = Completion(handle, error)
        return handle

    def _read(self, address: str, read: ReadRequest, dest: Dest) -> None:
        if read.runs:
            assert not isinstance(dest, torch.Tensor)
            self._read_regions(address, read, dest)
            return
        assert isinstance(dest, torch.Tensor)
        server = self._serving_peer(address)
        staging = server.stage(read)
        try:
            peer = self._peer(address)
            if peer.fault is not None:
                time.sleep(peer.fault.delay())
                staging = peer.fault.before_send(staging)
            server.check_lease(read)
            dest.copy_(staging)
        finally:
            server.release_staging(staging)

    def _read_regions(
        self, address: str, read: ReadRequest, dest: Sequence[torch.Tensor]
    ) -> None:
        """Zero-copy read: one copy per run, pool region to pool region (as UCX sends it)."""
        server = self._serving_peer(address)
        regions, unpin = server.serve_regions(read)
        try:
            peer = self._peer(address)
            if peer.fault is not None:
                time.sleep(peer.fault.delay())
                regions = peer.fault.before_send_regions(regions)
            server.check_lease(read)
            for src, dst in zip(regions, dest, strict=True):
                dst.view(-1).view(torch.uint8).copy_(src.reshape(-1).view(torch.uint8))
        finally:
            unpin()

    def _serving_peer(self, address: str) -> ServeHandler:
        peer = self._peer(address)
        self._require_layout().check_compatible(peer._require_layout())
        if peer._server is None:
            raise KVTransferError(f"{address} does not serve KV reads")
        return peer._server

    def _peer(self, address: str) -> LoopbackTransport:
        if self._closed:
            raise KVTransferError("transport is closed")
        scheme, name = split_address(address)
        with _REGISTRY_LOCK:
            peer = _REGISTRY.get(name) if scheme == "loopback" else None
        if peer is None:
            raise KVTransferError(f"no loopback peer at {address}")
        return peer

    def _require_layout(self) -> KvLayout:
        if self._layout is None:
            raise RuntimeError("call register_memory(layout) before using the transport")
        return self._layout
