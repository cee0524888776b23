"""KV transfer over real UCX between OS processes, and the faults it must survive.

Each engine process (``_engine_main``) owns a deterministic KV cache, the engine's
``BlockPool``, a ``UcxTransport`` and a ``KvConnectorWorker``, and obeys commands from
the test over a pipe (test plumbing only; the KV path is UCX). Every test ends with
both pools back to full.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.ucx

NUM_BLOCKS = 32
LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 16, 2, 32
MODEL = "tiny-random"
PART = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 4 * 4  # one layer of 4 blocks: reads go in parts


def _caches(
    seed: int, head_dim: int = HEAD_DIM, kind: str = "layer_major", device: str = "cpu"
) -> list[torch.Tensor]:
    """Deterministic caches: the same values on every device (drawn on the CPU)."""
    from splitserve.kernels.kv_cache import allocate_kv_caches

    g = torch.Generator().manual_seed(seed)
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, head_dim)
    caches = allocate_kv_caches(
        LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, head_dim, torch.float32, device, kind
    )
    for cache in caches:
        cache.copy_(torch.randn(shape, generator=g))
    return caches


# ====================================================================== engine process


class _Peer:
    """The engine side of one process: pool, caches, connector; answers commands."""

    def __init__(
        self, seed: int, read_timeout_s: float, shared_memory: bool, port: int,
        zero_copy: bool = False, device: str = "cpu",
    ) -> None:
        from splitserve.kvtransfer.connector_worker import KvConnectorWorker, TransferConfig
        from splitserve.kvtransfer.transport import FaultInjector, create_transport
        from splitserve.roles.engine.block_pool import BlockPool

        self.pool = BlockPool(NUM_BLOCKS)
        # zero-copy: block-major pools, every layer in one read (one message per run)
        self.caches = _caches(
            seed, kind="block_major" if zero_copy else "layer_major", device=device
        )
        self.fault = FaultInjector()
        config = TransferConfig(
            read_timeout_s=read_timeout_s,
            load_timeout_s=3 * read_timeout_s,
            layers_per_chunk=None if zero_copy else 2,
            blocks_per_chunk=None if zero_copy else 4,
        )
        self.worker = KvConnectorWorker(
            f"engine-{seed}",
            self.caches,
            create_transport(
                "ucx", fault=self.fault, port=port, shared_memory=shared_memory, part_bytes=PART
            ),
            MODEL,
            config,
        )
        self.held: dict[str, list[Any]] = {}
        self.results: dict[str, tuple[str, Any]] = {}

    def step(self) -> None:
        finished = self.worker.get_finished()
        for request_id in finished.finished_sending:
            self._free(request_id)
        for request_id in finished.finished_recving:
            ids = [b.block_id for b in self.held[request_id]]
            self.results[request_id] = ("ok", [c[:, ids].cpu() for c in self.caches])
            self._free(request_id)
        for request_id, error in finished.failed_recving.items():
            self.results[request_id] = ("error", (type(error).__name__, str(error)))
            self._free(request_id)

    def _free(self, request_id: str) -> None:
        blocks = self.held.pop(request_id, None)
        if blocks is not None:
            self.pool.free_blocks(blocks)

    def _allocate(self, request_id: str, n: int) -> list[int]:
        blocks = self.pool.get_new_blocks(n)
        assert blocks is not None
        self.held[request_id] = blocks
        return [b.block_id for b in blocks]

    # ------------------------------------------------------------------ commands

    def cmd_address(self) -> str:
        return self.worker.transport.address

    def cmd_offer(self, request_id: str, n: int, ttl_s: float = 30.0) -> dict[str, Any]:
        self._allocate(request_id, 1)  # skew ids so that local and remote ids differ
        ids = self._allocate(request_id + "/", n)
        self.pool.free_blocks(self.held.pop(request_id))
        self.held[request_id] = self.held.pop(request_id + "/")
        params = self.worker.offer(request_id, ids, num_tokens=n * BLOCK_SIZE, ttl_s=ttl_s)
        return params.to_dict()

    def cmd_load(self, params: dict[str, Any]) -> list[int]:
        from splitserve.kvtransfer.params import KvTransferParams

        p = KvTransferParams.decode_any(params)
        ids = self._allocate(p.request_id, len(p.block_ids))
        self.worker.start_load(p.request_id, p, ids)
        return ids

    def cmd_result(self, request_id: str) -> tuple[str, Any] | None:
        return self.results.pop(request_id, None)

    def cmd_abort(self, request_id: str) -> None:
        self.worker.abort(request_id)
        self._free(request_id)  # the engine frees an aborted request's blocks itself

    def cmd_fault(self, corrupt_sends: int = 0, delay_send_s: float = 0.0) -> None:
        self.fault.corrupt_sends, self.fault.delay_send_s = corrupt_sends, delay_send_s

    def cmd_free(self) -> int:
        return self.pool.num_free_blocks

    def cmd_pinned(self, request_id: str) -> bool:
        lease = self.worker.leases.get(request_id)
        return lease is not None and lease.pins > 0

    def cmd_drop_peers(self) -> None:
        self.worker.transport.drop_peers()  # type: ignore[attr-defined]

    def cmd_refused(self) -> int:
        return int(self.worker.counters["kv_transfer_refused"])

    def cmd_connections(self) -> int:
        return self.worker.transport.num_connections  # type: ignore[attr-defined]

    def cmd_listening(self) -> list[tuple[str, int]]:
        """Every socket this process listens on (the transport's and UCX's)."""
        import psutil

        return [
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]

    def cmd_ucx_net_devices(self) -> str | None:
        return os.environ.get("UCX_NET_DEVICES")

    def cmd_record_wire(self) -> None:
        """From now on, note the device of every buffer handed to ucxx (sent or received)."""
        from splitserve.kvtransfer import ucx_transport

        original = ucx_transport._wire_bytes
        self.wire_devices: set[str] = set()

        def recording(tensor: torch.Tensor) -> Any:
            self.wire_devices.add(str(tensor.device))
            return original(tensor)

        ucx_transport._wire_bytes = recording  # type: ignore[assignment]

    def cmd_wire_devices(self) -> list[str]:
        return sorted(self.wire_devices)

    def cmd_on_device(self) -> list[str]:
        """The device of each cache tensor (the pool the transport reads from and writes to)."""
        return sorted({str(c.device) for c in self.caches})

    def cmd_ucx_started(self) -> bool:
        """Whether this process has a UCX context (and so its progress thread)."""
        import ucxx.core

        return ucxx.core._ctx is not None


def _engine_main(
    conn: Connection, seed: int, read_timeout_s: float, ucx_tls: str, port: int,
    zero_copy: bool = False, device: str = "cpu",
) -> None:
    os.environ["UCX_TLS"] = ucx_tls
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    torch.set_num_threads(1)
    # shared memory and CUDA IPC lanes: the data endpoint goes without peer-failure handling
    intra_node = bool({"sm", "cuda_ipc"} & set(ucx_tls.split(",")))
    peer = _Peer(seed, read_timeout_s, intra_node, port, zero_copy, device)
    conn.send(("ready", os.getpid()))
    while True:
        if conn.poll(0.002):
            name, args = conn.recv()
            if name == "exit":
                break
            try:
                conn.send(("ok", getattr(peer, "cmd_" + name)(*args)))
            except Exception:  # noqa: BLE001 - shipped to the test
                conn.send(("raise", traceback.format_exc()))
        peer.step()
    peer.worker.close()
    conn.send(("ok", None))


# ====================================================================== test side


class Engine:
    """Handle on an engine process."""

    def __init__(
        self, seed: int, read_timeout_s: float = 5.0, ucx_tls: str = "tcp,self", port: int = 0,
        zero_copy: bool = False, device: str = "cpu",
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_engine_main,
            args=(child, seed, read_timeout_s, ucx_tls, port, zero_copy, device),
            daemon=True,
        )
        self.proc.start()
        deadline = time.monotonic() + 60
        while not self.conn.poll(0.1):
            assert self.proc.is_alive(), f"engine process died (exit code {self.proc.exitcode})"
            assert time.monotonic() < deadline, "engine process did not start"
        assert self.conn.recv()[0] == "ready"
        self.seed = seed
        self.zero_copy = zero_copy

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.conn.send((name, args))
            assert self.conn.poll(30), f"engine did not answer {name}"
            status, value = self.conn.recv()
            if status == "raise":
                raise RuntimeError(f"engine {name} failed:\n{value}")
            return value

        return call

    def wait_result(self, request_id: str, timeout_s: float = 15.0) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.result(request_id)
            if result is not None:
                return result
            time.sleep(0.01)
        raise AssertionError(f"{request_id}: no result within {timeout_s} s")

    def wait_free(self, expected: int = NUM_BLOCKS, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.free() != expected:
            assert time.monotonic() < deadline, f"pool stuck at {self.free()} free blocks"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("exit", ()))
                self.conn.poll(10)
            except (BrokenPipeError, EOFError, OSError):
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)


@pytest.fixture(scope="module", params=[pytest.param(False, marks=pytest.mark.slow), True],
                ids=["staged", "zero-copy"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Engine]]:
    """Every pair test runs on the zero-copy path (block-major pools, one message per run
    straight into the blocks) and, under ``-m slow``, on the staged path (layer-major caches,
    chunked reads; the default suite keeps its shared-memory lane test below)."""
    prefill, decode = Engine(1, zero_copy=request.param), Engine(2, zero_copy=request.param)
    yield prefill, decode
    decode.stop()
    prefill.stop()


@pytest.fixture(autouse=True)
def _pools_full_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "pair" in request.fixturenames:
        for engine in request.getfixturevalue("pair"):
            engine.fault(0, 0.0)
            engine.wait_free()


def _expected(seed: int, block_ids: list[int]) -> list[torch.Tensor]:
    return [c[:, block_ids] for c in _caches(seed)]


def _move_and_check(prefill: Engine, decode: Engine, request_id: str, n: int) -> dict[str, Any]:
    """Offer ``n`` blocks on ``prefill``, load them on ``decode``: they arrive byte for byte.
    The transfer's params."""
    params = prefill.offer(request_id, n)
    decode.load(params)
    status, blocks = decode.wait_result(request_id)
    assert status == "ok", blocks
    for got, want in zip(blocks, _expected(prefill.seed, params["block_ids"]), strict=True):
        assert torch.equal(got, want)
    return params


def test_blocks_arrive_byte_for_byte(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    for i, n in enumerate((1, 7, 13)):
        params = prefill.offer(f"r{i}", n)
        local = decode.load(params)
        assert local != params["block_ids"]
        status, blocks = decode.wait_result(f"r{i}")
        assert status == "ok", blocks
        for got, want in zip(blocks, _expected(prefill.seed, params["block_ids"]), strict=True):
            assert torch.equal(got, want)
        prefill.wait_free()  # released by the reader


def test_listens_only_on_its_host(pair: tuple[Engine, Engine]) -> None:
    """The serving side binds its control listener to ``host`` (127.0.0.1 here) and keeps
    UCX's own data sockets on that interface: nothing listens on the wildcard or on the
    machine's other addresses (ucxx's listener, no longer used, bound 0.0.0.0)."""
    prefill, decode = pair
    params = prefill.offer("bound", 2)
    decode.load(params)
    assert decode.wait_result("bound")[0] == "ok"  # the data moved with UCX so restricted
    port = int(prefill.address().rsplit(":", 1)[1])
    for engine in (prefill, decode):
        listening = engine.listening()
        assert listening, "no listening socket at all"
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        assert engine.ucx_net_devices() == "lo"
    assert ("127.0.0.1", port) in prefill.listening()


def test_strangers_bytes_on_the_control_port_are_dropped(pair: tuple[Engine, Engine]) -> None:
    """Anyone who reaches the KV port: an oversized frame, bytes that are no message, a read
    before any hello and a hello without a data address each end that connection only; the
    worker keeps serving."""
    import socket as sk

    from splitserve.kvtransfer.params import Hello, ReadRequest

    prefill, decode = pair
    host, port = prefill.address().removeprefix("ucx://").rsplit(":", 1)

    def frame(payload: bytes) -> bytes:
        return len(payload).to_bytes(8, "little") + payload

    read = ReadRequest(xfer_id=1, request_id="x", lease_id=1, block_ids=[0], layer_start=0,
                       layer_end=1, secret="0" * 32)
    hello = Hello(engine_id="stranger", layout={}, compat_hash=0, data_address=b"")
    for junk in (b"\xff" * 8, frame(b"not msgpack at all"), frame(read.encode()),
                 frame(hello.encode()) + frame(read.encode())):
        with sk.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(junk)
            s.settimeout(10)
            try:
                while s.recv(65536):  # a refusing reply may come first; then the close
                    pass
            except ConnectionResetError:
                pass  # closed: what we want
    params = prefill.offer("after-strangers", 2)
    decode.load(params)
    assert decode.wait_result("after-strangers")[0] == "ok"


def test_concurrent_loads_share_one_endpoint(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    params = [prefill.offer(f"c{i}", 3) for i in range(4)]
    for p in params:
        decode.load(p)
    for p in params:
        status, blocks = decode.wait_result(p["request_id"])
        assert status == "ok"
        assert torch.equal(blocks[3], _expected(prefill.seed, p["block_ids"])[3])
    assert decode.connections() == 1  # one pooled endpoint served every load


def test_corruption_in_flight_is_refetched_then_refused(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    prefill.fault(1)
    params = prefill.offer("once", 4)
    decode.load(params)
    status, blocks = decode.wait_result("once")
    assert status == "ok"
    assert torch.equal(blocks[0], _expected(prefill.seed, params["block_ids"])[0])
    prefill.fault(10_000)
    decode.load(prefill.offer("always", 4))
    status, (kind, message) = decode.wait_result("always")
    assert status == "error" and kind == "KVChecksumError", message


def test_forged_read_with_a_wrong_secret_is_refused_and_counted(
    pair: tuple[Engine, Engine],
) -> None:
    """A reader that knows the request, lease and blocks but not the transfer's secret reads
    nothing: its read and its abort are refused and counted; the lease stays intact, and the
    rightful reader (with the secret) still gets every byte."""
    import secrets

    prefill, decode = pair
    params = prefill.offer("forged", 3)
    refused = prefill.refused()
    forged = {**params, "secret": secrets.token_hex(16)}
    decode.load(forged)
    status, error = decode.wait_result("forged")
    assert status == "error" and "wrong transfer secret" in error[1], error
    assert prefill.refused() > refused  # the read (and the reader's abort after it) refused
    decode.load(params)  # the lease survived the forged abort
    status, blocks = decode.wait_result("forged")
    assert status == "ok", blocks
    for got, want in zip(blocks, _expected(prefill.seed, params["block_ids"]), strict=True):
        assert torch.equal(got, want)


def test_lease_expires_before_the_read(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    params = prefill.offer("late", 2, 0.3)
    prefill.wait_free(timeout_s=5.0)  # expired and freed without any reader
    decode.load(params)
    status, (kind, message) = decode.wait_result("late")
    assert status == "error" and kind == "LeaseExpiredError", message


def test_heartbeats_keep_a_slow_transfer_alive(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    prefill.fault(0, 2.5)  # every send stalls longer than the lease
    params = prefill.offer("slow", 2, 1.5)
    decode.load(params)
    status, _ = decode.wait_result("slow")
    assert status == "ok"


def _wait_serving(prefill: Engine, request_id: str, timeout_s: float = 10.0) -> None:
    """Until a read of ``request_id`` is being served (pins its lease; stalled by a fault)."""
    deadline = time.monotonic() + timeout_s
    while not prefill.pinned(request_id):
        assert time.monotonic() < deadline, "the read never reached the serving side"
        time.sleep(0.02)


def test_abort_on_prefill_side_mid_transfer(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    prefill.fault(0, 1.0)
    decode.load(prefill.offer("pa", 3))
    _wait_serving(prefill, "pa")  # mid-transfer: a read is in flight
    prefill.abort("pa")
    status, (kind, message) = decode.wait_result("pa")
    assert status == "error" and kind == "RequestAbortedError", message


def test_abort_on_decode_side_mid_transfer(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    prefill.fault(0, 1.0)
    decode.load(prefill.offer("da", 3))
    _wait_serving(prefill, "da")
    decode.abort("da")
    prefill.wait_free(timeout_s=5.0)  # lease aborted by the reader, not expired (ttl is 30 s)
    assert decode.result("da") is None


def test_layout_mismatch_is_refused_at_handshake(pair: tuple[Engine, Engine]) -> None:
    from splitserve.errors import IncompatibleKVLayoutError
    from splitserve.kvtransfer.connector_worker import KvConnectorWorker
    from splitserve.kvtransfer.params import KvTransferParams
    from splitserve.kvtransfer.ucx_transport import UcxTransport

    prefill, _ = pair
    params = KvTransferParams.decode_any(prefill.offer("mm", 2))
    kind = "block_major" if prefill.zero_copy else "layer_major"
    worker = KvConnectorWorker(
        "odd", _caches(3, head_dim=HEAD_DIM * 2, kind=kind), UcxTransport(), MODEL
    )
    try:
        worker.start_load("mm", params, [0, 1])
        deadline = time.monotonic() + 10
        while not (finished := worker.get_finished()).failed_recving:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        error = finished.failed_recving["mm"]
        assert isinstance(error, IncompatibleKVLayoutError) and error.field == "head_dim"
        assert "head_dim" in str(error)
    finally:
        worker.close()
    prefill.abort("mm")


def _kill_prefill_mid_transfer(prefill: Engine, decode: Engine, request_id: str) -> None:
    prefill.fault(0, 30.0)
    decode.load(prefill.offer(request_id, 3))
    _wait_serving(prefill, request_id)
    num_connections = decode.connections()
    prefill.kill()
    started = time.monotonic()
    status, (kind, message) = decode.wait_result(request_id, timeout_s=12.0)
    assert status == "error" and kind == "TransportConnectionError", message
    assert time.monotonic() - started < 12.0
    assert decode.connections() == num_connections - 1  # the broken endpoint left the pool
    decode.wait_free()


def test_prefill_killed_mid_transfer(pair: tuple[Engine, Engine]) -> None:
    _, decode = pair
    prefill = Engine(5, zero_copy=decode.zero_copy)
    try:
        _kill_prefill_mid_transfer(prefill, decode, "k1")
    finally:
        prefill.kill()


def test_broken_endpoint_is_reestablished(pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pair
    decode.load(prefill.offer("e1", 2))
    assert decode.wait_result("e1")[0] == "ok"
    assert decode.connections() == 1
    prefill.drop_peers()  # the serving side cuts every connection
    deadline = time.monotonic() + 5
    while decode.connections() != 0:
        assert time.monotonic() < deadline, "the reader never noticed its endpoint broke"
        time.sleep(0.02)
    params = prefill.offer("e2", 2)
    decode.load(params)
    status, blocks = decode.wait_result("e2")
    assert status == "ok", blocks
    assert torch.equal(blocks[1], _expected(prefill.seed, params["block_ids"])[1])
    assert decode.connections() == 1


def test_decode_killed_mid_transfer(pair: tuple[Engine, Engine]) -> None:
    prefill, _ = pair
    decode = Engine(7, zero_copy=prefill.zero_copy)
    try:
        prefill.fault(0, 1.0)
        decode.load(prefill.offer("k2", 3, 5.0))  # a lease that outlives a slow first connect
        _wait_serving(prefill, "k2")  # the read is being served when the reader dies
        decode.kill()
        prefill.wait_free(timeout_s=30.0)  # heartbeats stopped: the lease expires
    finally:
        decode.kill()


def test_ucx_starts_at_the_first_transfer() -> None:
    """A serving transport listens without UCX: its context and progress thread (~5% of a
    core while idle) start at the first read, on both sides. A worker that never moves KV
    (the colocated default's decode worker) never starts them."""
    prefill, decode = Engine(21, zero_copy=True), Engine(22, zero_copy=True)
    try:
        assert prefill.address().startswith("ucx://127.0.0.1:")  # listening already
        assert not prefill.ucx_started() and not decode.ucx_started()
        _move_and_check(prefill, decode, "first", 3)
        assert prefill.ucx_started() and decode.ucx_started()
        prefill.wait_free()
        decode.wait_free()
    finally:
        decode.stop()
        prefill.stop()


@pytest.mark.parametrize("zero_copy", [False, True], ids=["staged", "zero-copy"])
def test_shared_memory_lane_moves_bytes_exactly(zero_copy: bool) -> None:
    """``UCX_TLS=sm,tcp,self`` + ``shared_memory=True``: control on TCP, data on shared memory."""
    prefill = Engine(8, ucx_tls="sm,tcp,self", zero_copy=zero_copy)
    decode = Engine(9, ucx_tls="sm,tcp,self", zero_copy=zero_copy)
    try:
        _move_and_check(prefill, decode, "sm1", 9)
        prefill.wait_free()
        decode.wait_free()
        _kill_prefill_mid_transfer(prefill, decode, "sm2")  # data lane has no failure handler
    finally:
        decode.stop()
        prefill.kill()


# ====================================================================== CUDA memory (gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("zero_copy", [False, True], ids=["staged", "zero-copy"])
@pytest.mark.parametrize(
    "ucx_tls", ["tcp,cuda_copy,self", "sm,cuda_copy,cuda_ipc,tcp,self"], ids=["tcp", "cuda-ipc"]
)
def test_cuda_pools_over_ucx(ucx_tls: str, zero_copy: bool) -> None:
    """The same transport and connector with CUDA KV pools: ucxx is handed device memory on
    both sides (never a host copy of it), bytes arrive exactly, checksums (read back from the
    device) catch a corrupted send, a killed peer fails the read with its blocks released.
    Over TCP UCX stages through host memory itself (cuda_copy); over CUDA IPC it copies
    device to device. (Run on the device machine: ``pytest -m gpu``.)"""
    if not torch.cuda.is_available():
        pytest.fail("a gpu test needs CUDA; run it with -m gpu on a machine that has it")
    prefill = Engine(31, ucx_tls=ucx_tls, zero_copy=zero_copy, device="cuda")
    decode = Engine(32, ucx_tls=ucx_tls, zero_copy=zero_copy, device="cuda")
    try:
        assert prefill.on_device() == decode.on_device() == ["cuda:0"]
        prefill.record_wire()
        decode.record_wire()
        for i, n in enumerate((1, 9, 17)):
            _move_and_check(prefill, decode, f"g{i}", n)
            prefill.wait_free()
            decode.wait_free()
        assert prefill.wire_devices() == decode.wire_devices() == ["cuda:0"]
        prefill.fault(10_000)  # every send corrupted: refetched once, then refused
        decode.load(prefill.offer("bad", 4))
        status, (kind, message) = decode.wait_result("bad")
        assert status == "error" and kind == "KVChecksumError", message
        prefill.fault(0)
        decode.wait_free()
        prefill.wait_free()
        _kill_prefill_mid_transfer(prefill, decode, "gk")
    finally:
        decode.stop()
        prefill.kill()
