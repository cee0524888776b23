"""KV transport on UCX (the ``ucxx`` package): TCP, shared memory, and CUDA memory where present.

Owns ``UcxTransport``: a control listener that answers peers' reads, a pool of client
connections (one per peer, reused across requests, replaced when broken), and the
background thread that runs ucxx's asyncio event loop so that synchronous engine code can
call in.

Two planes:
  * control: msgpack messages (params.py) in length-prefixed frames on a TCP connection
    (asyncio streams). The serving side listens on ``host:port`` and nothing else: ucxx
    0.52's own listener cannot be bound to an address (it always takes the wildcard), so
    it is not used. A broken connection is how either side learns that its peer is gone.
  * data: UCX tagged messages between workers. The connecting side's ``Hello`` carries its
    UCX worker address; the serving side opens an endpoint to that worker and sends each
    read's bytes there, under the read's random tag plus the part's index. UCX's network
    transports are kept to the interface that owns ``host`` (``UCX_NET_DEVICES``, set at
    the first transport of a process unless the environment sets it).

The serving side refuses a ``Hello`` whose layout does not match, naming the field. A
``ReadRequest`` is answered by a ``Reply`` (ok, nbytes, part_layers; or an error code), then
the staged bytes as one message per group of layers, so that the server gathers part k+1
while part k is on the wire. The reader receives straight into the caller's staging buffer
(probing first, so a receive is never left posted), the server sends straight from the
buffers its connector gathered: no copy beyond the gather. With ``shared_memory=True`` the
data endpoint has no peer-failure handling, which lets UCX use shared memory (the control
connection still detects a dead peer). A read of a layer-wise streamed transfer is answered
only once the serving engine's forward has computed its layers (polled, at most
``STREAM_WAIT_S``); its reply carries their checksums.

It must not verify checksums, hold leases or touch the KV cache: the connector does.
Every ucxx object is created and used on the loop thread only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import secrets
import socket
import threading
from collections.abc import Coroutine, Generator
from typing import Any

import torch

from splitserve.errors import KVTransferError
from splitserve.kvtransfer.layout import KvLayout, regions_nbytes
from splitserve.kvtransfer.params import (
    Control,
    Hello,
    ReadRequest,
    Reply,
    WireMessage,
    decode_message,
)
from splitserve.kvtransfer.transport import (
    DEFAULT_TIMEOUT_S,
    STREAM_WAIT_S,
    Completion,
    Dest,
    FaultInjector,
    KvTransport,
    ServeHandler,
    TransportConnectionError,
    check_dest,
    error_reply,
    reply_error,
    split_address,
)

logger = logging.getLogger(__name__)


# ====================================================================== event loop thread


class _LoopThread:
    """The process's one asyncio loop for ucxx (ucxx keeps one context per process)."""

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ucx-loop", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            # A forked child inherits the object but not the thread: start its own.
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        return self.submit(coro).result(timeout_s)


_PART_BITS = 12
_MAX_PARTS = 1 << _PART_BITS
DEFAULT_PART_BYTES = 8 << 20
"""Reads bigger than this go out in layer groups of about this size, gathered while sent."""


def _part_layers(layout: KvLayout, read: ReadRequest, part_bytes: int) -> int:
    """Layers per data message: whole layers, about ``part_bytes`` each."""
    per_layer = layout.staging_nbytes(1, len(read.block_ids))
    wanted = max(1, -(-part_bytes // per_layer))
    return max(min(wanted, read.num_layers), -(-read.num_layers // _MAX_PARTS))


def _wire_bytes(tensor: torch.Tensor) -> Any:
    """A flat uint8 view of a contiguous tensor that ucxx can send from or receive into."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


_MAX_FRAME_BYTES = 64 << 20
"""Largest control message accepted (a read of a million blocks stays well below)."""


async def _send_frame(
    writer: asyncio.StreamWriter, lock: asyncio.Lock, message: WireMessage
) -> None:
    """Send one control message: its length (8 bytes, little-endian), then its bytes."""
    payload = message.encode()
    async with lock:  # concurrent senders' frames must not interleave
        writer.write(len(payload).to_bytes(8, "little") + payload)
        await writer.drain()


async def _recv_frame(reader: asyncio.StreamReader) -> WireMessage:
    """Receive one control message sent by ``_send_frame`` (one reader per connection)."""
    try:
        nbytes = int.from_bytes(await reader.readexactly(8), "little")
        if not 0 < nbytes <= _MAX_FRAME_BYTES:
            raise KVTransferError(f"control message of {nbytes} bytes refused")
        payload = await reader.readexactly(nbytes)
    except asyncio.IncompleteReadError as e:
        raise ConnectionResetError("the peer closed the connection") from e
    return decode_message(payload)


def _is_ucx_error(error: BaseException) -> bool:
    """An error of the connection or the endpoint (as opposed to a refused message)."""
    return type(error).__module__.startswith("ucxx") or isinstance(error, OSError)


async def _data_endpoint(worker_address: bytes, shared_memory: bool) -> Any:
    """An endpoint to a reader's worker for bulk data. With ``shared_memory`` it has no
    peer-failure handling, so that UCX may use shared memory (it refuses sm lanes on
    endpoints that need it); the control connection detects a dead peer either way."""
    import ucxx

    ucxx.continuous_ucx_progress()  # the first send of this process starts UCX (see _listen)
    address = ucxx.get_ucx_address_from_buffer(worker_address)
    return await ucxx.create_endpoint_from_worker_address(
        address, endpoint_error_handling=not shared_memory
    )


def _interface_of(host: str) -> str | None:
    """The network interface that owns ``host``'s address, or None (wildcard, unknown)."""
    import psutil

    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return None
    wanted = {info[4][0] for info in infos}
    if wanted & {"0.0.0.0", "::"}:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] in wanted for a in addrs):
            return name
    return None


def _restrict_ucx_devices(host: str) -> None:
    """Keep UCX's network transports (their listening sockets included) on ``host``'s
    interface: sets ``UCX_NET_DEVICES`` before this process's UCX context exists, unless
    the environment already chose. A later transport on another interface is warned about."""
    import ucxx.core

    device = _interface_of(host)
    if device is None:
        return
    if "UCX_NET_DEVICES" not in os.environ and ucxx.core._ctx is None:
        os.environ["UCX_NET_DEVICES"] = device
    elif os.environ.get("UCX_NET_DEVICES") not in (device, "all"):
        logger.warning(
            "UCX_NET_DEVICES=%s, not %s (the interface of %s): UCX's data sockets may listen "
            "on other interfaces", os.environ.get("UCX_NET_DEVICES", "all"), device, host,
        )


async def _probe_on_worker(tag: int, conn: _Connection) -> Any:
    """Wait until a bulk-data message sent with ``force_tag`` to this worker is there; its
    probe (removed from UCX's queue: the caller must receive it with ``recv_with_handle``).

    Receives are posted only once their message is there, so that a timeout or a dead peer
    never leaves a receive posted into a destination (a worker-level receive cannot be
    cancelled on its own).
    """
    import ucxx
    from ucxx.types import Tag

    worker = ucxx.core._get_ctx().worker
    delay = 0.00005
    while not (probe := worker.tag_probe(Tag(tag), remove=True)).matched:
        if conn.broken:
            raise TransportConnectionError(f"connection to {conn.peer} broke before its data")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.001)
    return probe


async def _recv_probed(dest: torch.Tensor, probe: Any) -> None:
    import ucxx

    await ucxx.core._get_ctx().recv_with_handle(_wire_bytes(dest), probe)


async def _recv_all_on_worker(
    views: list[torch.Tensor], first_tag: int, conn: _Connection
) -> None:
    """Receive message ``first_tag + k`` into ``views[k]`` for every k: each receive is
    posted as soon as its message is there, and they complete concurrently (a read of many
    runs pays one Python round trip per message, not one per message plus its transfer).
    Whatever ends this early (an error, a cancel), the receives already posted finish
    first: none writes into a destination after this returns."""
    receiving: list[asyncio.Future[None]] = []
    try:
        for index, view in enumerate(views):
            probe = await _probe_on_worker(first_tag + index, conn)
            receiving.append(asyncio.ensure_future(_recv_probed(view, probe)))
        await asyncio.gather(*receiving)
    except BaseException:
        if receiving:
            await asyncio.shield(asyncio.gather(*receiving, return_exceptions=True))
        raise


class _Gathering:
    """A staged read's gathers, run one at a time on a worker thread.

    ``close()`` is synchronous, so it also runs when the serving task is cancelled: it
    closes the parts (unpinning the lease) at once, or as soon as a gather still running
    on its thread finishes, and gives back a part gathered for a send that never happened.
    """

    def __init__(self, parts: Generator[torch.Tensor, None, None], server: ServeHandler) -> None:
        self._parts = parts
        self._server = server
        self._busy: asyncio.Future[torch.Tensor | None] | None = None

    async def next(self) -> torch.Tensor | None:
        """The next part (None after the last); a cancel does not interrupt the gather."""
        loop = asyncio.get_running_loop()
        self._busy = busy = loop.run_in_executor(None, next, self._parts, None)
        part = await asyncio.shield(busy)
        self._busy = None
        return part

    def close(self) -> None:
        busy, self._busy = self._busy, None
        if busy is None or busy.done():
            self._finish(busy)
        else:
            busy.add_done_callback(self._finish)

    def _finish(self, busy: asyncio.Future[torch.Tensor | None] | None) -> None:
        try:
            if busy is not None and not busy.cancelled() and busy.exception() is None:
                part = busy.result()
                if part is not None:
                    self._server.release_staging(part)
        finally:
            self._parts.close()


# ====================================================================== client connections


class _Connection:
    """One control connection to one serving peer, shared by every read to it. Loop thread
    only. Data arrives on this process's UCX worker (``_recv_all_on_worker``)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.broken = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._send_lock = asyncio.Lock()
        # Peer loss shows up as this reader's receive failing.
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, message: WireMessage, xfer_id: int) -> Reply:
        """Send a control or read message; its reply."""
        if self.broken:
            raise TransportConnectionError(f"connection to {self.peer} is broken")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[xfer_id] = future
        try:
            await _send_frame(self.writer, self._send_lock, message)
            return await future
        except Exception as e:
            raise self.fail(e) from e
        finally:
            self._pending.pop(xfer_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by _break while the send was still going: seen

    async def _read_replies(self) -> None:
        try:
            while True:
                reply = await _recv_frame(self.reader)
                if not isinstance(reply, Reply):
                    raise KVTransferError(f"unexpected {reply.TYPE!r} from {self.peer}")
                future = self._pending.get(reply.xfer_id)
                if future is not None and not future.done():
                    future.set_result(reply)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # the connection broke or the peer spoke nonsense
            self._break(TransportConnectionError(f"connection to {self.peer} failed: {e!r}"))

    def fail(self, error: BaseException) -> BaseException:
        """Mark broken, fail waiters, drop the connection; the error to raise to the caller."""
        if isinstance(error, KVTransferError) and not _is_ucx_error(error):
            return error
        wrapped = TransportConnectionError(f"connection to {self.peer} failed: {error!r}")
        self._break(wrapped)
        return wrapped

    def abort(self) -> None:
        self._break(TransportConnectionError(f"connection to {self.peer} was closed"))

    def _break(self, error: TransportConnectionError) -> None:
        if self.broken:
            return
        self.broken = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self.writer.transport.abort()  # the peer's server sees it and cancels its sends


# ====================================================================== the transport


@dataclasses.dataclass
class _Serving:
    """Server-side state of one accepted endpoint."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    greeted: bool = False
    send_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    data_address: bytes = b""
    """The reader's UCX worker address, from its hello."""
    data_ep: Any = None
    """UCX endpoint to ``data_address``: every read's bytes go there. Opened at the first
    read that presents a live lease's secret, so that a stranger's bytes never reach UCX."""
    data_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)


class UcxTransport(KvTransport):
    """KV transport over UCX between processes and machines. Thread-safe."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        fault: FaultInjector | None = None,
        connect_timeout_s: float = 5.0,
        engine_id: str = "",
        shared_memory: bool = False,
        part_bytes: int = DEFAULT_PART_BYTES,
    ) -> None:
        """``host``: the address the control listener binds (and advertises) and whose
        interface UCX's network transports are kept to. ``shared_memory``: the data endpoint
        goes without UCX peer-failure handling, which is what lets UCX pick shared memory
        (cma/posix) between processes of one host (set ``UCX_TLS`` to include ``sm`` and
        ``tcp``); the control connection still detects a dead peer."""
        if part_bytes < 1:
            raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
        self._shared_memory = shared_memory
        self._part_bytes = part_bytes
        self._host = host
        self._port = port
        self.fault = fault
        self._connect_timeout_s = connect_timeout_s
        self._engine_id = engine_id
        self._layout: KvLayout | None = None
        self._server: ServeHandler | None = None
        _restrict_ucx_devices(host)
        self._loop = _LoopThread.get()
        self._listener: asyncio.Server | None = None
        self._accepted: dict[int, _Serving] = {}
        self._pool: dict[str, _Connection] = {}
        self._pool_locks: dict[str, asyncio.Lock] = {}
        self._handles = itertools.count(1)
        self._ops: dict[int, concurrent.futures.Future[Any]] = {}
        self._settled: dict[int, threading.Event] = {}
        self._ops_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ KvTransport

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("this UcxTransport serves no reads (register_memory without server)")
        return f"ucx://{self._host}:{self._port}"

    def register_memory(self, layout: KvLayout, server: ServeHandler | None = None) -> None:
        if self._layout is not None:
            raise RuntimeError("register_memory was already called")
        self._layout, self._server = layout, server
        if server is not None:
            self._port = self._loop.call(self._listen(), self._connect_timeout_s)

    def read_blocks(
        self,
        address: str,
        read: ReadRequest,
        dest: Dest,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> int:
        check_dest(self._require_layout(), read, dest)
        regions = [dest] if isinstance(dest, torch.Tensor) else list(dest)
        return self._start(self._read(address, read, regions), timeout_s)

    def cancel(self, handle: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Cancel the read's task (its receives are cancelled with its endpoint, see
        ``_read``) and wait until it has unwound, so nothing lands in its ``dest`` later."""
        with self._ops_lock:
            future = self._ops.get(handle)
            done = self._settled.get(handle)
        if future is None or done is None:
            return
        future.cancel()
        if not done.wait(timeout_s):
            logger.warning("UCX read %d did not unwind within %s s of its cancel", handle, timeout_s)

    def send_control(
        self, address: str, control: Control, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> int:
        self._require_layout()
        return self._start(self._control(address, control), timeout_s)

    def poll(self, handle: int) -> Completion | None:
        with self._ops_lock:
            future = self._ops.get(handle)
            if future is None:
                raise KeyError(f"unknown or already polled transfer handle {handle}")
            if not future.done():
                return None
            del self._ops[handle]
            self._settled.pop(handle, None)
        error = future.exception() if not future.cancelled() else KVTransferError("cancelled")
        checksums = future.result() if error is None else None
        return Completion(handle, error, checksums if isinstance(checksums, list) else None)

    def drop_peers(self) -> None:
        """Abort every endpoint peers opened to this transport (drain, or a fault in tests).

        Readers see their connection break and reconnect on their next read.
        """
        self._loop.call(self._drop_accepted(), self._connect_timeout_s)

    async def _drop_accepted(self) -> None:
        for state in list(self._accepted.values()):
            for task in state.tasks:
                task.cancel()
            state.writer.transport.abort()
            try:
                if state.data_ep is not None:
                    state.data_ep.abort()
            except Exception:  # noqa: BLE001 - already gone
                pass

    @property
    def num_connections(self) -> int:
        """Pooled client endpoints that are up (one per serving peer when healthy)."""
        return sum(not conn.broken for conn in list(self._pool.values()))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.call(self._shutdown(), 10.0)
        except (concurrent.futures.TimeoutError, RuntimeError) as e:
            logger.warning("UcxTransport.close: %r", e)

    # ------------------------------------------------------------------ client side

    def _start(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> int:
        if self._closed:
            coro.close()
            raise KVTransferError("transport is closed")
        handle = next(self._handles)
        settled = threading.Event()
        with self._ops_lock:
            self._settled[handle] = settled
            self._ops[handle] = self._loop.submit(self._with_timeout(coro, timeout_s, settled))
        return handle

    async def _with_timeout(
        self, coro: Coroutine[Any, Any, Any], timeout_s: float, settled: threading.Event
    ) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await coro
        except TimeoutError as e:
            raise TransportConnectionError(f"KV transfer timed out after {timeout_s} s") from e
        finally:
            settled.set()  # the coroutine has unwound: nothing of it writes any more

    async def _read(
        self, address: str, read: ReadRequest, dest: list[torch.Tensor]
    ) -> list[list[int]] | None:
        """Send the read, receive its data; the checksums its reply carried (streamed)."""
        conn = await self._connection(address)
        xfer_id = conn.next_id()
        data_tag = (secrets.randbits(48) | 1) << _PART_BITS
        read = dataclasses.replace(read, xfer_id=xfer_id, data_tag=data_tag)
        reply = await conn.request(read, xfer_id)
        if not reply.ok:
            raise reply_error(reply, address)
        if reply.nbytes != regions_nbytes(dest):
            raise KVTransferError(
                f"{address} offers {reply.nbytes} bytes, expected {regions_nbytes(dest)}"
            )
        if read.runs:
            views = dest  # zero-copy: one message per run, straight into the blocks
        else:
            staging, step = dest[0], reply.part_layers or read.num_layers
            views = [staging[l0 : l0 + step] for l0 in range(0, staging.shape[0], step)]
        try:
            await self._recv_parts(conn, views, data_tag)
            return reply.checksums or None
        except asyncio.CancelledError:
            # Closing the connection makes the server cancel the read's remaining sends
            # (other reads on it fail and are retried).
            conn.abort()
            if self._pool.get(address) is conn:
                del self._pool[address]
            raise

    async def _recv_parts(
        self, conn: _Connection, views: list[torch.Tensor], data_tag: int
    ) -> None:
        """Receive part k into ``views[k]``: layer groups of a staging buffer, or runs of
        blocks of the pool; probed one by one, so never a receive posted that cannot be
        cancelled."""
        if len(views) > _MAX_PARTS:
            raise KVTransferError(f"{conn.peer} splits a read into {len(views)} parts")
        await _recv_all_on_worker(views, data_tag, conn)

    async def _control(self, address: str, control: Control) -> None:
        conn = await self._connection(address)
        xfer_id = conn.next_id()
        reply = await conn.request(dataclasses.replace(control, xfer_id=xfer_id), xfer_id)
        if not reply.ok:
            raise reply_error(reply, address)

    async def _connection(self, address: str) -> _Connection:
        """The pooled connection to ``address``, (re)connecting and greeting as needed."""
        lock = self._pool_locks.setdefault(address, asyncio.Lock())
        async with lock:
            conn = self._pool.get(address)
            if conn is not None and not conn.broken and not conn.closed:
                return conn
            self._pool.pop(address, None)
            conn = await self._connect(address)
            self._pool[address] = conn
            return conn

    async def _connect(self, address: str) -> _Connection:
        import ucxx

        scheme, where = split_address(address)
        host, _, port = where.rpartition(":")
        if scheme != "ucx" or not host or not port.isdigit():
            raise KVTransferError(f"not a UCX address: {address!r} (want ucx://host:port)")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), self._connect_timeout_s
            )
        except (OSError, TimeoutError) as e:
            raise TransportConnectionError(f"cannot connect to {address}: {e!r}") from e
        conn = _Connection(reader, writer, address)
        layout = self._require_layout()
        ucxx.continuous_ucx_progress()  # the data arrives on this worker
        data_address = bytes(ucxx.get_worker_address())
        hello = Hello(
            engine_id=self._engine_id,
            layout=layout.to_wire(),
            compat_hash=layout.compatibility_hash(),
            data_address=data_address,
        )
        reply = await conn.request(hello, 0)
        if not reply.ok:
            conn.abort()
            raise reply_error(reply, address)
        return conn

    # ------------------------------------------------------------------ serving side

    async def _listen(self) -> int:
        # Only the control socket: UCX itself (its context and progress thread, ~5% of a
        # core while idle) starts at the first read this process makes or serves, so a
        # worker that never moves KV (a colocated decode worker) never pays for it.
        self._listener = await asyncio.start_server(
            self._serve, host=self._host.strip("[]"), port=self._port or 0
        )
        return int(self._listener.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state = _Serving(reader, writer)
        self._accepted[id(state)] = state
        try:
            while not self._closed:
                message = await _recv_frame(reader)
                await self._dispatch(state, message)
        except Exception as e:  # noqa: BLE001 - the peer went away or spoke nonsense
            logger.debug("UCX serving connection ended: %r", e)
        finally:
            for task in state.tasks:
                task.cancel()
            self._accepted.pop(id(state), None)
            writer.transport.abort()
            try:
                if state.data_ep is not None:
                    state.data_ep.abort()
            except Exception:  # noqa: BLE001
                pass

    async def _dispatch(self, state: _Serving, message: WireMessage) -> None:
        if isinstance(message, Hello):
            reply = self._greet(state, message)
            if reply.ok:
                state.data_address = message.data_address
            await self._answer(state, reply)
        elif not state.greeted:
            raise KVTransferError("peer sent a request before its hello")
        elif isinstance(message, ReadRequest):
            task = asyncio.get_running_loop().create_task(self._serve_read(state, message))
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)
        elif isinstance(message, Control):
            await self._answer(state, self._serve_control(message))
        else:
            raise KVTransferError(f"unexpected {message.TYPE!r} message")

    def _greet(self, state: _Serving, hello: Hello) -> Reply:
        try:
            self._require_layout().check_compatible(hello.layout)
            if not hello.data_address:
                raise KVTransferError("hello without a UCX worker address for the data")
        except KVTransferError as e:
            return error_reply(0, e)
        state.greeted = True
        return Reply(xfer_id=0, ok=True)

    def _serve_control(self, control: Control) -> Reply:
        try:
            assert self._server is not None
            self._server.on_control(control)
        except Exception as e:  # noqa: BLE001 - reported to the peer
            return error_reply(control.xfer_id, e)
        return Reply(xfer_id=control.xfer_id, ok=True)

    async def _serve_read(self, state: _Serving, read: ReadRequest) -> None:
        """Gather part k+1 (on a worker thread) while part k is on the wire."""
        assert self._server is not None
        checksums = await self._await_layers(state, read)
        if checksums is None:
            return
        if read.runs:
            await self._serve_regions(state, read, checksums)
            return
        part_layers = _part_layers(self._require_layout(), read, self._part_bytes)
        try:
            gathering = _Gathering(self._server.stage_parts(read, part_layers), self._server)
        except Exception as e:  # noqa: BLE001 - reported to the peer
            await self._answer_quietly(state, error_reply(read.xfer_id, e))
            return
        try:  # closed however this ends, cancelled included: that unpins the lease
            try:
                staging = await gathering.next()
                assert staging is not None
            except Exception as e:  # noqa: BLE001 - reported to the peer
                await self._answer_quietly(state, error_reply(read.xfer_id, e))
                return
            if await self._begin_send(state, read, staging, part_layers, checksums):
                await self._send_parts(state, read, staging, gathering)
            else:
                self._server.release_staging(staging)
        finally:
            gathering.close()

    async def _await_layers(self, state: _Serving, read: ReadRequest) -> list[list[int]] | None:
        """Layer-wise streaming: wait (polling, at most ``STREAM_WAIT_S``) until the serving
        engine's forward computed the read's layers; their checksums. None when the read was
        refused (answered here): the lease ended, or the layers never came."""
        assert self._server is not None
        deadline = asyncio.get_running_loop().time() + STREAM_WAIT_S
        delay = 0.0002
        try:
            while (checksums := self._server.layers_ready(read)) is None:
                if asyncio.get_running_loop().time() >= deadline:
                    raise KVTransferError(
                        f"layers [{read.layer_start}, {read.layer_end}) of "
                        f"{read.request_id!r} were not computed within {STREAM_WAIT_S} s"
                    )
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.002)
        except Exception as e:  # noqa: BLE001 - reported to the peer
            await self._answer_quietly(state, error_reply(read.xfer_id, e))
            return None
        return checksums

    async def _serve_regions(
        self, state: _Serving, read: ReadRequest, checksums: list[list[int]]
    ) -> None:
        """Zero-copy: every run goes out at once, straight from the pinned KV pool."""
        assert self._server is not None
        if len(read.runs) > _MAX_PARTS:
            error = KVTransferError(f"a read of {len(read.runs)} runs exceeds {_MAX_PARTS}")
            await self._answer_quietly(state, error_reply(read.xfer_id, error))
            return
        try:
            regions, unpin = self._server.serve_regions(read)
        except Exception as e:  # noqa: BLE001 - reported to the peer
            await self._answer_quietly(state, error_reply(read.xfer_id, e))
            return
        try:
            if self.fault is not None:
                regions = self.fault.before_send_regions(regions)
            if await self._begin_send(state, read, None, 0, checksums):
                await asyncio.gather(
                    *(self._send_region(state, read, i, r) for i, r in enumerate(regions))
                )
        finally:
            unpin()

    async def _send_region(
        self, state: _Serving, read: ReadRequest, index: int, region: torch.Tensor
    ) -> None:
        try:
            await self._send_bytes(state, read, index, region)
        except Exception as e:  # noqa: BLE001 - the reader went away; its lease will expire
            logger.debug("UCX send of %s failed: %r", read.request_id, e)

    async def _send_bytes(
        self, state: _Serving, read: ReadRequest, index: int, tensor: torch.Tensor
    ) -> None:
        if not read.data_tag or state.data_ep is None:
            raise KVTransferError(f"read {read.xfer_id} names no data tag")
        await state.data_ep.send(_wire_bytes(tensor), tag=read.data_tag + index, force_tag=True)

    async def _begin_send(
        self, state: _Serving, read: ReadRequest, first: torch.Tensor | None, part_layers: int,
        checksums: list[list[int]],
    ) -> bool:
        """Apply test faults, re-check the lease last, then say ok; False if not sending."""
        assert self._server is not None
        try:
            if self.fault is not None:
                await asyncio.sleep(self.fault.delay())
                if first is not None:
                    self.fault.before_send(first)
            self._server.check_lease(read)  # authenticates the read
            async with state.data_lock:
                if state.data_ep is None:
                    state.data_ep = await _data_endpoint(state.data_address, self._shared_memory)
        except Exception as e:  # noqa: BLE001 - reported to the peer
            await self._answer_quietly(state, error_reply(read.xfer_id, e))
            return False
        layout = self._require_layout()
        nbytes = layout.staging_nbytes(read.num_layers, len(read.block_ids))
        reply = Reply(xfer_id=read.xfer_id, ok=True, nbytes=nbytes, part_layers=part_layers,
                      checksums=checksums)
        return await self._answer_quietly(state, reply)

    async def _send_parts(
        self,
        state: _Serving,
        read: ReadRequest,
        staging: torch.Tensor,
        gathering: _Gathering,
    ) -> None:
        assert self._server is not None
        loop = asyncio.get_running_loop()
        part: torch.Tensor | None = staging
        index = 0
        while part is not None:
            sending = loop.create_task(self._send_part(state, read, index, part))
            try:
                part = await gathering.next()
            except BaseException:
                sending.cancel()  # cancelled (the reader went away) or the gather failed
                raise
            await sending
            index += 1

    async def _send_part(
        self, state: _Serving, read: ReadRequest, index: int, staging: torch.Tensor
    ) -> None:
        assert self._server is not None
        try:
            await self._send_bytes(state, read, index, staging)
        except Exception as e:  # noqa: BLE001 - the reader went away; its lease will expire
            logger.debug("UCX send of %s failed: %r", read.request_id, e)
        finally:
            self._server.release_staging(staging)

    async def _answer_quietly(self, state: _Serving, reply: Reply) -> bool:
        try:
            await self._answer(state, reply)
        except Exception as e:  # noqa: BLE001 - the reader went away
            logger.debug("UCX reply failed: %r", e)
            return False
        return True

    async def _answer(self, state: _Serving, reply: Reply) -> None:
        await _send_frame(state.writer, state.send_lock, reply)

    async def _shutdown(self) -> None:
        for conn in self._pool.values():
            conn.abort()
        self._pool.clear()
        await self._drop_accepted()
        if self._listener is not None:
            self._listener.close()
        await asyncio.sleep(0)

    def _require_layout(self) -> KvLayout:
        if self._layout is None:
            raise RuntimeError("call register_memory(layout) before using the transport")
        return self._layout
