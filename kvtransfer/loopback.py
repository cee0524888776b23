"""In-process transport for unit tests: peers find each other in a module-level registry.

Owns ``LoopbackTransport``. A read runs synchronously inside ``read_blocks`` (handshake,
the server's ``stage``, the fault hook, one copy into ``dest``) and its completion waits
for ``poll``. It goes through the same handshake, lease and fault paths as UCX, so the
connector is tested against the real semantics without sockets. Not for production.
"""

from __future__ import annotations

import itertools
import threading
import time

import torch

from splitserve.errors import KVTransferError
from splitserve.kvtransfer.layout import KvLayout
from splitserve.kvtransfer.params import Control, ReadRequest
from splitserve.kvtransfer.transport import (
    DEFAULT_TIMEOUT_S,
    Completion,
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
        dest: torch.Tensor,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> int:
        layout = self._require_layout()
        check_dest(layout, read, dest)
        return self._complete(lambda: self._read(address, read, dest))

    def send_control(
        self, address: str, control: Control, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> int:
        self._require_layout()
        return self._complete(lambda: self._serving_peer(address).on_control(control))

    def poll(self, handle: int) -> Completion | None:
        with self._lock:
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

    def _read(self, address: str, read: ReadRequest, dest: torch.Tensor) -> None:
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
