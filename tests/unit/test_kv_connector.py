"""Both connector halves over the loopback transport, with the engine's real BlockPool.

The scheduler half is driven through the hooks the engine's scheduler calls
(``on_new_request``, ``get_num_new_matched_tokens``, ``update_state_after_alloc``,
``request_finished``, ``build_connector_meta``, ``update_from_worker``) with a minimal
request object. Every test ends with both pools full: no path may leak a block.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from splitserve.errors import (
    IncompatibleKVLayoutError,
    KVChecksumError,
    KVTransferError,
    RequestAbortedError,
)
from splitserve.kernels.kv_cache import BLOCK_MAJOR, LAYER_MAJOR, allocate_kv_caches, kv_pool
from splitserve.kvtransfer.connector_scheduler import KvConnectorScheduler, RemoteMatch
from splitserve.kvtransfer.connector_worker import KvConnectorWorker, TransferConfig
from splitserve.kvtransfer.layout import merge_runs
from splitserve.kvtransfer.lease import LeaseEnd, LeaseExpiredError
from splitserve.kvtransfer.loopback import LoopbackTransport
from splitserve.kvtransfer.params import ReadRequest
from splitserve.kvtransfer.transport import FaultInjector
from splitserve.request import RequestStatus
from splitserve.roles.engine.block_pool import BlockPool

NUM_BLOCKS = 12
BLOCK_SIZE = 4
_names = itertools.count()


@dataclasses.dataclass
class Req:
    """The part of an engine request the scheduler half reads and writes."""

    request_id: str
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    remote_kv_source: object = None
    remote_kv_sink: bool = False


@dataclasses.dataclass
class Step:
    """One step's ``SchedulerUpdate``, by request id."""

    ready: list[str]
    recompute: list[str]
    aborted: list[str]
    failed: dict[str, BaseException]
    free_held: list[str]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Engine:
    """An engine's KV side: pool, caches, connector halves; frees held blocks on lease end."""

    pool: BlockPool
    caches: list[torch.Tensor]
    worker: KvConnectorWorker
    sched: KvConnectorScheduler[Req]
    fault: FaultInjector
    held: dict[str, list]
    reqs: dict[str, Req] = dataclasses.field(default_factory=dict)

    def allocate(self, n: int) -> list:
        blocks = self.pool.get_new_blocks(n)
        assert blocks is not None
        return blocks

    def step(self) -> Step:
        """What the engine's scheduler does with the update: free failed loads' and ended
        holds' blocks (a recomputed request would prefill again; none does here)."""
        self.worker.apply(self.sched.build_connector_meta())
        update = self.sched.update_from_worker(self.worker.get_finished())
        for req in update.free_held + update.recompute + update.aborted:
            self.pool.free_blocks(self.held.pop(req.request_id))

        def ids(reqs: list[Req]) -> list[str]:
            return [r.request_id for r in reqs]

        return Step(
            ids(update.ready), ids(update.recompute), ids(update.aborted), update.failures,
            ids(update.free_held),
        )

    def run(self, request_id: str, max_steps: int = 10) -> Step:
        """Step until ``request_id``'s load ends (a re-fetch takes one more step)."""
        for _ in range(max_steps):
            update = self.step()
            if request_id in update.ready or request_id in update.failed:
                return update
        raise AssertionError(f"load of {request_id} did not end in {max_steps} steps")


def make_engine(
    seed: int,
    clock: Clock,
    head_dim: int = 8,
    ttl: float = 30.0,
    config: TransferConfig | None = None,
    kind: str = LAYER_MAJOR,
    dtype: torch.dtype = torch.float32,
) -> Engine:
    g = torch.Generator().manual_seed(seed)
    caches = allocate_kv_caches(3, NUM_BLOCKS, 4, 2, head_dim, dtype, "cpu", kind)
    for cache in caches:
        cache.copy_(torch.randn(2, NUM_BLOCKS, 4, 2, head_dim, generator=g).to(dtype))
    fault = FaultInjector()
    transport = LoopbackTransport(f"kv-unit-{next(_names)}", fault=fault)
    worker = KvConnectorWorker(
        f"e{seed}", caches, transport, "tiny", config=config, lease_ttl_s=ttl, clock=clock
    )
    sched = KvConnectorScheduler[Req](BLOCK_SIZE)
    return Engine(BlockPool(NUM_BLOCKS), caches, worker, sched, fault, {})


def offer(engine: Engine, request_id: str, n: int) -> object:
    """KV source side: the request was handed off; the connector holds its blocks."""
    blocks = engine.allocate(n)
    engine.held[request_id] = blocks
    req = Req(request_id, RequestStatus.HANDED_OFF, remote_kv_sink=True)
    assert engine.sched.request_finished(req)
    return engine.worker.offer(
        request_id, [b.block_id for b in blocks], num_tokens=BLOCK_SIZE * n - 1
    )


def arrive(engine: Engine, request_id: str, params: object) -> Req:
    req = Req(request_id, remote_kv_source=params)
    engine.sched.on_new_request(req)
    engine.reqs[request_id] = req
    return req


def allocate(engine: Engine, req: Req, num_local: int = 0) -> list[int]:
    """KV sink side admission: match (nothing cached), allocate, hand over to the connector."""
    match = engine.sched.get_num_new_matched_tokens(req, num_local)
    assert match is not None
    blocks = engine.allocate(len(req.remote_kv_source.block_ids))
    engine.held[req.request_id] = blocks
    ids = [b.block_id for b in blocks]
    assert not engine.sched.update_state_after_alloc(req, ids, match)
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KV
    return ids


def admit(engine: Engine, request_id: str, params: object) -> list[int]:
    return allocate(engine, arrive(engine, request_id, params))


def assert_blocks_equal(dst: Engine, dst_ids: list[int], src: Engine, src_ids: list[int]) -> None:
    for d_cache, s_cache in zip(dst.caches, src.caches, strict=True):
        assert torch.equal(d_cache[:, dst_ids], s_cache[:, src_ids])


def finish(engine: Engine, request_id: str) -> None:
    assert engine.sched.request_finished(engine.reqs[request_id]) is False
    engine.pool.free_blocks(engine.held.pop(request_id))


@pytest.mark.parametrize("kind", [LAYER_MAJOR, BLOCK_MAJOR])
@pytest.mark.parametrize("layers, blocks", [(None, None), (1, None), (None, 2), (2, 3)])
def test_pull_moves_bytes_exactly_and_frees_both_pools(
    layers: int | None, blocks: int | None, kind: str
) -> None:
    clock = Clock()
    prefill = make_engine(1, clock, kind=kind)
    decode = make_engine(
        2, clock, config=TransferConfig(layers_per_chunk=layers, blocks_per_chunk=blocks),
        kind=kind,
    )
    decode.allocate(1)  # so local ids differ from remote ids
    params = offer(prefill, "r1", 5)
    local = admit(decode, "r1", params)
    assert decode.sched.loading == {"r1": decode.reqs["r1"]}
    update = decode.run("r1")
    assert update.ready == ["r1"] and not decode.sched.loading
    assert decode.reqs["r1"].num_computed_tokens == 19
    assert decode.reqs["r1"].remote_kv_source is None
    assert_blocks_equal(decode, local, prefill, params.block_ids)
    assert prefill.step().free_held == ["r1"]
    assert prefill.pool.num_free_blocks == NUM_BLOCKS
    finish(decode, "r1")
    assert decode.pool.num_free_blocks == NUM_BLOCKS - 1


@pytest.mark.parametrize("kind", [LAYER_MAJOR, BLOCK_MAJOR])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_caches_move_exactly_in_place_and_staged(kind: str, dtype: torch.dtype) -> None:
    """fp8 KV (``kv_cache_dtype="fp8"``): runs sent in place (block-major) and staged layer
    chunks (layer-major, gathered and scattered: torch has no fp8 index_copy_ on CPU)."""
    clock = Clock()
    prefill = make_engine(1, clock, kind=kind, dtype=dtype)
    decode = make_engine(2, clock, config=TransferConfig(layers_per_chunk=2, blocks_per_chunk=3),
                         kind=kind, dtype=dtype)
    decode.allocate(1)
    params = offer(prefill, "r1", 5)
    local = admit(decode, "r1", params)
    assert decode.run("r1").ready == ["r1"]
    assert_blocks_equal(decode, local, prefill, params.block_ids)
    assert decode.worker.counters["kv_transfer_bytes"] == 3 * 2 * 5 * 4 * 2 * 8  # 1 byte each
    assert prefill.step().free_held == ["r1"]
    finish(decode, "r1")
    assert decode.pool.num_free_blocks == NUM_BLOCKS - 1


def test_corruption_is_refetched_once() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    prefill.fault.corrupt_sends = 1
    params = offer(prefill, "r1", 3)
    local = admit(decode, "r1", params)
    assert decode.run("r1").ready == ["r1"]
    assert prefill.fault.num_sends == 2
    assert_blocks_equal(decode, local, prefill, params.block_ids)


def test_persistent_corruption_fails_and_never_reaches_the_cache() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    prefill.fault.corrupt_sends = 100
    params = offer(prefill, "r1", 3)
    before = [c.clone() for c in decode.caches]
    admit(decode, "r1", params)
    update = decode.run("r1")
    assert isinstance(update.failed["r1"], KVChecksumError)
    assert "checksum twice" in str(update.failed["r1"])
    assert update.recompute == ["r1"] and decode.sched.num_remote_fallbacks == 1
    assert all(torch.equal(a, b) for a, b in zip(before, decode.caches, strict=True))
    assert prefill.step().free_held == ["r1"]  # the reader aborted the lease
    assert prefill.pool.num_free_blocks == decode.pool.num_free_blocks == NUM_BLOCKS


def test_lease_expiry_before_the_read_frees_and_fails_cleanly() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock, ttl=5.0), make_engine(2, clock)
    params = offer(prefill, "r1", 4)
    clock.now += 6.0
    assert prefill.step().free_held == ["r1"]
    assert prefill.pool.num_free_blocks == NUM_BLOCKS
    admit(decode, "r1", params)
    update = decode.run("r1")
    assert isinstance(update.failed["r1"], LeaseExpiredError)
    assert decode.pool.num_free_blocks == NUM_BLOCKS


def test_abort_on_serving_side_before_read() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    params = offer(prefill, "r1", 2)
    prefill.worker.abort("r1")  # what the engine does to a held request it aborts
    assert prefill.step().free_held == ["r1"]
    admit(decode, "r1", params)
    update = decode.run("r1")
    assert isinstance(update.failed["r1"], RequestAbortedError)
    assert update.aborted == ["r1"] and decode.sched.num_remote_fallbacks == 0
    assert prefill.pool.num_free_blocks == decode.pool.num_free_blocks == NUM_BLOCKS


def test_abort_on_reading_side_releases_the_lease() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    params = offer(prefill, "r1", 2)
    admit(decode, "r1", params)
    req = decode.reqs["r1"]
    req.status = RequestStatus.FINISHED_ABORTED  # the scheduler finishes it...
    assert decode.sched.request_finished(req) is False  # ...before the load even went out
    decode.step()
    decode.pool.free_blocks(decode.held.pop("r1"))
    assert not decode.worker.is_loading("r1")
    assert prefill.step().free_held == ["r1"]
    assert prefill.worker.get_finished().finished_sending == {}
    assert prefill.pool.num_free_blocks == decode.pool.num_free_blocks == NUM_BLOCKS


def test_layout_mismatch_is_refused_naming_the_field() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock, head_dim=16)
    params = offer(prefill, "r1", 2)
    admit(decode, "r1", params)
    error = decode.run("r1").failed["r1"]
    assert isinstance(error, IncompatibleKVLayoutError) and error.field == "head_dim"
    assert "head_dim" in str(error)


def test_bad_loads_are_refused_up_front() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    params = offer(prefill, "r1", 2)
    with pytest.raises(ValueError, match="1 local blocks for 2 remote"):
        decode.worker.start_load("r1", params, [0])
    with pytest.raises(ValueError, match="out of range"):
        decode.worker.start_load("r1", params, [0, NUM_BLOCKS])
    with pytest.raises(ValueError, match="not 'r2'"):
        decode.worker.start_load("r2", params, [0, 1])
    with pytest.raises(ValueError, match="do not fit"):
        prefill.worker.offer("r9", [1], num_tokens=5)


def test_layer_by_layer_load_reports_layers_as_they_land() -> None:
    clock = Clock()
    prefill = make_engine(1, clock)
    decode = make_engine(2, clock, config=TransferConfig(layers_per_chunk=1))
    params = offer(prefill, "r1", 2)
    local = admit(decode, "r1", params)
    decode.worker.apply(decode.sched.build_connector_meta())
    assert decode.worker.num_layers_ready("r1") == 0  # reads issued, none checked yet
    chunks = decode.worker._loads["r1"].chunks
    decode.worker._check_chunk(decode.worker._loads["r1"], chunks[0])
    assert decode.worker.num_layers_ready("r1") == 1
    assert torch.equal(decode.caches[0][:, local], prefill.caches[0][:, params.block_ids])
    assert not torch.equal(decode.caches[1][:, local], prefill.caches[1][:, params.block_ids])
    assert decode.run("r1").ready == ["r1"]
    assert_blocks_equal(decode, local, prefill, params.block_ids)


def test_lease_of_a_request_waiting_for_blocks_is_kept_alive() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock, ttl=6.0), make_engine(2, clock)
    params = offer(prefill, "r1", 2)
    req = arrive(decode, "r1", params)  # no blocks yet: the decode pool is busy
    for _ in range(6):  # 12 s of waiting, twice the lease
        clock.now += 2.0
        decode.step()
        assert prefill.step().free_held == []
    allocate(decode, req)
    assert decode.run("r1").ready == ["r1"]
    assert prefill.step().free_held == ["r1"]


def test_stage_parts_match_one_gather_and_pin_until_closed() -> None:
    from splitserve.kvtransfer.params import ReadRequest

    clock = Clock()
    prefill = make_engine(1, clock)
    params = offer(prefill, "r1", 3)
    read = ReadRequest(
        xfer_id=1,
        request_id="r1",
        lease_id=params.lease_id,
        block_ids=params.block_ids,
        layer_start=0,
        layer_end=3,
        secret=params.secret,
    )
    whole = prefill.worker.stage(read)
    parts = prefill.worker.stage_parts(read, 2)
    first = next(parts)
    assert prefill.worker.leases.get("r1").pins == 1
    assert prefill.worker.leases.abort("r1")
    assert prefill.worker.get_finished().finished_sending == {}  # pinned: not freed yet
    assert torch.equal(torch.cat([first, *parts]), whole)  # exhausting the parts unpins
    assert prefill.worker.get_finished().finished_sending == {"r1": LeaseEnd.ABORTED}


def test_stage_parts_closed_before_any_gather_unpin_once() -> None:
    """A read cancelled before its first gather closes parts that never ran: the lease is
    unpinned all the same (a bare generator's ``finally`` would never run), and only once."""
    from splitserve.kvtransfer.params import ReadRequest

    clock = Clock()
    prefill = make_engine(1, clock)
    params = offer(prefill, "r1", 3)
    read = ReadRequest(
        xfer_id=1, request_id="r1", lease_id=params.lease_id, block_ids=params.block_ids,
        layer_start=0, layer_end=3, secret=params.secret,
    )
    other = prefill.worker.stage_parts(read, 1)
    next(other)  # a second read of the same lease, still running: holds its own pin
    parts = prefill.worker.stage_parts(read, 2)
    assert prefill.worker.leases.get("r1").pins == 2
    parts.close()
    parts.close()
    assert prefill.worker.leases.get("r1").pins == 1
    assert prefill.worker.leases.abort("r1")
    assert prefill.worker.get_finished().finished_sending == {}
    other.close()
    assert prefill.worker.get_finished().finished_sending == {"r1": LeaseEnd.ABORTED}


def test_local_prefix_hits_are_kept_and_only_the_rest_is_pulled() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    params = offer(prefill, "r1", 5)  # 19 tokens: blocks of 4, 4, 4, 4, 3
    req = arrive(decode, "r1", params)
    match = decode.sched.get_num_new_matched_tokens(req, 8)
    assert match == RemoteMatch(num_local_tokens=8, num_external_tokens=11)
    local = allocate(decode, req, num_local=8)
    meta = decode.sched.build_connector_meta()
    (load,) = meta.loads
    assert load.local_block_ids == tuple(local[2:])
    assert load.params.block_ids == params.block_ids[2:] and load.params.num_tokens == 11
    decode.worker.apply(meta)
    assert decode.run("r1").ready == ["r1"] and req.num_computed_tokens == 19
    assert_blocks_equal(decode, local[2:], prefill, params.block_ids[2:])


def test_everything_cached_runs_at_once_and_releases_the_remote_copy() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    blocks = prefill.allocate(2)
    prefill.held["r1"] = blocks
    assert prefill.sched.request_finished(Req("r1", RequestStatus.HANDED_OFF, remote_kv_sink=True))
    params = prefill.worker.offer("r1", [b.block_id for b in blocks], num_tokens=8)
    req = arrive(decode, "r1", params)
    match = decode.sched.get_num_new_matched_tokens(req, 8)
    assert match == RemoteMatch(num_local_tokens=8, num_external_tokens=0)
    assert decode.sched.update_state_after_alloc(req, [0, 1], match)  # may run now
    assert req.num_computed_tokens == 8 and req.remote_kv_source is None
    meta = decode.sched.build_connector_meta()
    assert not meta.loads and [a.params for a in meta.aborts] == [params]
    decode.worker.apply(meta)
    assert prefill.step().free_held == ["r1"]  # the lease ended at once
    assert prefill.pool.num_free_blocks == NUM_BLOCKS
    assert decode.sched.check_integrity({}).ok


def test_requests_without_remote_kv_are_not_the_connectors() -> None:
    sched = KvConnectorScheduler[Req](BLOCK_SIZE)
    req = Req("local")
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) is None
    assert sched.request_finished(req) is False
    meta = sched.build_connector_meta()
    assert not (sched.has_transfers() or meta.loads or meta.aborts or meta.keepalive)


def test_integrity_names_a_remote_request_only_one_side_knows() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    params = offer(prefill, "r1", 2)
    req = arrive(decode, "r1", params)
    assert decode.sched.check_integrity({"r1": req}).ok
    report = decode.sched.check_integrity({})
    assert "waits for remote KV only in the connector's view" in report.problems[0]
    other = Req("r2", remote_kv_source=params)
    report = decode.sched.check_integrity({"r1": req, "r2": other})
    assert "'r2' waits for remote KV only in the scheduler's view" in report.problems[0]


# --------------------------------------------------------------------------- zero-copy


def record_reads(engine: Engine) -> list:
    """The ReadRequests ``engine`` issues (the real transport still runs them)."""
    reads: list = []
    transport = engine.worker.transport
    real = transport.read_blocks

    def spy(address, read, dest, timeout_s=10.0):  # type: ignore[no-untyped-def]
        reads.append((read, dest))
        return real(address, read, dest, timeout_s)

    transport.read_blocks = spy  # type: ignore[method-assign]
    return reads


@pytest.mark.gpu
def test_zero_copy_between_cuda_pools() -> None:
    """The same zero-copy code path with device buffers: runs of CUDA pool memory as the
    regions, checksums read back from the device. (Not run on the CPU-only CI machine.)"""

    def cuda_engine(seed: int) -> Engine:
        g = torch.Generator().manual_seed(seed)
        caches = allocate_kv_caches(3, NUM_BLOCKS, 4, 2, 8, torch.float16, "cuda", BLOCK_MAJOR)
        for cache in caches:
            cache.copy_(torch.randn(2, NUM_BLOCKS, 4, 2, 8, generator=g).half())
        worker = KvConnectorWorker(
            f"g{seed}", caches, LoopbackTransport(f"kv-gpu-{next(_names)}"), "tiny"
        )
        return Engine(BlockPool(NUM_BLOCKS), caches, worker, KvConnectorScheduler[Req](BLOCK_SIZE),
                      FaultInjector(), {})

    prefill, decode = cuda_engine(1), cuda_engine(2)
    decode.allocate(1)
    params = offer(prefill, "r1", 5)
    local = admit(decode, "r1", params)
    reads = record_reads(decode)
    assert decode.run("r1").ready == ["r1"]
    assert_blocks_equal(decode, local, prefill, params.block_ids)
    ((read, dest),) = reads
    assert read.runs and all(region.is_cuda for region in dest)


def test_zero_copy_sends_one_message_per_merged_run_into_the_blocks() -> None:
    """Block-major pools: no staging buffer, each run of consecutive ids on both sides is one
    message whose destination is the reader's own pool memory."""
    clock = Clock()
    prefill = make_engine(1, clock, kind=BLOCK_MAJOR)
    decode = make_engine(2, clock, kind=BLOCK_MAJOR)
    blocks = prefill.allocate(6)
    prefill.held["r1"] = blocks
    assert prefill.sched.request_finished(Req("r1", RequestStatus.HANDED_OFF, remote_kv_sink=True))
    sent = [b.block_id for b in blocks[:2] + blocks[3:]]  # a gap: two runs on this side
    params = prefill.worker.offer("r1", sent, num_tokens=4 * 5 - 1)
    decode.allocate(1)
    local = admit(decode, "r1", params)
    reads = record_reads(decode)
    assert decode.run("r1").ready == ["r1"]
    assert_blocks_equal(decode, local, prefill, params.block_ids)
    ((read, dest),) = reads
    assert read.runs == merge_runs(params.block_ids, local) and len(read.runs) >= 2
    pool = kv_pool(decode.caches)
    assert pool is not None
    at = 0
    for n, region in zip(read.runs, dest, strict=True):
        assert region.data_ptr() == pool[local[at]].data_ptr()  # straight into the block
        at += n
    assert decode.worker.staging.cached_bytes == 0  # no staging buffer was ever taken
    assert prefill.worker.staging.cached_bytes == 0
    assert prefill.step().free_held == ["r1"]
    assert prefill.pool.num_free_blocks == NUM_BLOCKS


def test_zero_copy_corruption_refetches_then_fails_and_frees_the_blocks() -> None:
    """The bytes land in the blocks before they are verified: a bad run is re-read once, and
    a second failure frees the blocks unpublished; the serving pool itself is never touched."""
    clock = Clock()
    prefill = make_engine(1, clock, kind=BLOCK_MAJOR)
    decode = make_engine(2, clock, kind=BLOCK_MAJOR)
    prefill.fault.corrupt_sends = 1
    params = offer(prefill, "r1", 3)
    source = [c.clone() for c in prefill.caches]
    local = admit(decode, "r1", params)
    assert decode.run("r1").ready == ["r1"]
    assert prefill.fault.num_sends == 2
    assert_blocks_equal(decode, local, prefill, params.block_ids)
    assert all(torch.equal(a, b) for a, b in zip(source, prefill.caches, strict=True))
    finish(decode, "r1")
    prefill.step()

    prefill.fault.corrupt_sends = 100
    params = offer(prefill, "r2", 3)
    before = [c.clone() for c in decode.caches]
    local = admit(decode, "r2", params)
    update = decode.run("r2")
    assert isinstance(update.failed["r2"], KVChecksumError)
    assert update.recompute == ["r2"]  # recomputed locally, blocks freed unpublished
    others = [b for b in range(NUM_BLOCKS) if b not in local]
    for a, b in zip(before, decode.caches, strict=True):
        assert torch.equal(a[:, others], b[:, others])  # only the load's own blocks written
    assert all(torch.equal(a, b) for a, b in zip(source, prefill.caches, strict=True))
    assert "r2" not in decode.held
    assert prefill.step().free_held == ["r2"]
    assert prefill.pool.num_free_blocks == decode.pool.num_free_blocks == NUM_BLOCKS


def test_zero_copy_and_staged_peers_refuse_each_other_naming_the_field() -> None:
    clock = Clock()
    prefill = make_engine(1, clock, kind=BLOCK_MAJOR)
    decode = make_engine(2, clock, kind=LAYER_MAJOR)
    params = offer(prefill, "r1", 2)
    admit(decode, "r1", params)
    update = decode.run("r1")
    assert isinstance(update.failed["r1"], IncompatibleKVLayoutError)
    assert update.failed["r1"].field == "layout_kind"
    assert decode.pool.num_free_blocks == NUM_BLOCKS
    clock.now += 31.0  # the refused peer cannot abort the lease: it expires
    assert prefill.step().free_held == ["r1"]
    assert prefill.pool.num_free_blocks == NUM_BLOCKS


def test_zero_copy_bad_runs_and_overlapping_loads_are_refused() -> None:
    clock = Clock()
    prefill = make_engine(1, clock, kind=BLOCK_MAJOR)
    decode = make_engine(2, clock, kind=BLOCK_MAJOR)
    params = offer(prefill, "r1", 4)
    ids = params.block_ids
    read = ReadRequest(xfer_id=1, request_id="r1", lease_id=params.lease_id, block_ids=ids,
                       layer_start=0, layer_end=3, secret=params.secret, runs=[1, 3])
    regions, unpin = prefill.worker.serve_regions(read)  # the good split works
    assert [r.shape[0] for r in regions] == [1, 3]
    assert prefill.worker.leases.get("r1").pins == 1
    unpin()
    unpin()  # idempotent
    assert prefill.worker.leases.get("r1").pins == 0
    for runs, ids_, match in (
        ([4], [ids[0], ids[2], ids[1], ids[3]], "not consecutive"),
        ([2, 2], [ids[0], ids[1], NUM_BLOCKS, NUM_BLOCKS + 1], "out of range"),
    ):
        bad = dataclasses.replace(read, runs=runs, block_ids=ids_)
        with pytest.raises(KVTransferError, match=match):
            prefill.worker.serve_regions(bad)
    with pytest.raises(KVTransferError, match="one block per run"):
        prefill.worker.serve_regions(dataclasses.replace(read, layer_end=2))
    local = admit(decode, "r1", params)
    with pytest.raises(ValueError, match="repeat"):
        decode.worker.start_load("r1", params, [local[0]] * 4)
    decode.run("r1")
    params2 = offer(prefill, "r2", 1)
    decode.worker.start_load("r2x", dataclasses.replace(params2, request_id="r2x"), [local[0]])
    with pytest.raises(ValueError, match="being loaded"):
        decode.worker.start_load("r2y", dataclasses.replace(params2, request_id="r2y"), [local[0]])
    decode.worker.abort_load("r2x")
    finish(decode, "r1")
    prefill.worker.abort("r2")
    while prefill.held:
        prefill.step()
    assert prefill.pool.num_free_blocks == decode.pool.num_free_blocks == NUM_BLOCKS
