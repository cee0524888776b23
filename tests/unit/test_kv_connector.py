"""Both connector halves over the loopback transport, with the engine's real BlockPool.

Every test ends with both pools full: no path may leak a block.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from splitserve.errors import IncompatibleKVLayoutError, KVChecksumError, RequestAbortedError
from splitserve.kvtransfer.connector_scheduler import KvConnectorScheduler, SchedulerUpdate
from splitserve.kvtransfer.connector_worker import KvConnectorWorker, TransferConfig
from splitserve.kvtransfer.lease import LeaseEnd, LeaseExpiredError
from splitserve.kvtransfer.loopback import LoopbackTransport
from splitserve.kvtransfer.transport import FaultInjector
from splitserve.request import RequestStatus
from splitserve.roles.engine.block_pool import BlockPool

NUM_BLOCKS = 12
_names = itertools.count()


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
    sched: KvConnectorScheduler
    fault: FaultInjector
    held: dict[str, list]

    def allocate(self, n: int) -> list:
        blocks = self.pool.get_new_blocks(n)
        assert blocks is not None
        return blocks

    def step(self) -> SchedulerUpdate:
        self.worker.apply(self.sched.build_meta())
        update = self.sched.update_from_worker(self.worker.get_finished())
        for request_id in update.free_held + list(update.failed):
            self.pool.free_blocks(self.held.pop(request_id))
        return update

    def run(self, request_id: str, max_steps: int = 10) -> SchedulerUpdate:
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
) -> Engine:
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randn(2, NUM_BLOCKS, 4, 2, head_dim, generator=g) for _ in range(3)]
    fault = FaultInjector()
    transport = LoopbackTransport(f"kv-unit-{next(_names)}", fault=fault)
    worker = KvConnectorWorker(
        f"e{seed}", caches, transport, "tiny", config=config, lease_ttl_s=ttl, clock=clock
    )
    return Engine(BlockPool(NUM_BLOCKS), caches, worker, KvConnectorScheduler(), fault, {})


def offer(engine: Engine, request_id: str, n: int) -> object:
    blocks = engine.allocate(n)
    engine.held[request_id] = blocks
    assert engine.sched.request_finished(request_id, remote_decode=True)
    return engine.worker.offer(request_id, [b.block_id for b in blocks], num_tokens=4 * n - 1)


def admit(engine: Engine, request_id: str, params: object) -> list[int]:
    assert (
        engine.sched.add_remote_request(request_id, params) == RequestStatus.WAITING_FOR_REMOTE_KV
    )
    blocks = engine.allocate(engine.sched.num_blocks_needed(request_id))
    engine.held[request_id] = blocks
    ids = [b.block_id for b in blocks]
    engine.sched.on_blocks_allocated(request_id, ids)
    return ids


def assert_blocks_equal(dst: Engine, dst_ids: list[int], src: Engine, src_ids: list[int]) -> None:
    for d_cache, s_cache in zip(dst.caches, src.caches, strict=True):
        assert torch.equal(d_cache[:, dst_ids], s_cache[:, src_ids])


def finish(engine: Engine, request_id: str) -> None:
    engine.sched.forget(request_id)
    engine.pool.free_blocks(engine.held.pop(request_id))


@pytest.mark.parametrize("layers, blocks", [(None, None), (1, None), (None, 2), (2, 3)])
def test_pull_moves_bytes_exactly_and_frees_both_pools(
    layers: int | None, blocks: int | None
) -> None:
    clock = Clock()
    prefill = make_engine(1, clock)
    decode = make_engine(
        2, clock, config=TransferConfig(layers_per_chunk=layers, blocks_per_chunk=blocks)
    )
    decode.allocate(1)  # so local ids differ from remote ids
    params = offer(prefill, "r1", 5)
    local = admit(decode, "r1", params)
    assert not decode.sched.may_run("r1")
    update = decode.run("r1")
    assert update.ready == ["r1"] and decode.sched.may_run("r1")
    assert decode.sched.num_external_tokens("r1") == 19
    assert_blocks_equal(decode, local, prefill, params.block_ids)
    assert prefill.step().free_held == ["r1"]
    assert prefill.pool.num_free_blocks == NUM_BLOCKS
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
    assert decode.sched.status("r1") == RequestStatus.FINISHED_ERROR
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
    prefill.sched.abort("r1")
    prefill.worker.apply(prefill.sched.build_meta())
    prefill.pool.free_blocks(prefill.held.pop("r1"))  # the engine frees an aborted request itself
    assert prefill.worker.get_finished().finished_sending == {"r1": LeaseEnd.ABORTED}
    admit(decode, "r1", params)
    update = decode.run("r1")
    assert isinstance(update.failed["r1"], RequestAbortedError)
    assert decode.sched.status("r1") == RequestStatus.FINISHED_ABORTED
    assert prefill.pool.num_free_blocks == decode.pool.num_free_blocks == NUM_BLOCKS


def test_abort_on_reading_side_releases_the_lease() -> None:
    clock = Clock()
    prefill, decode = make_engine(1, clock), make_engine(2, clock)
    params = offer(prefill, "r1", 2)
    admit(decode, "r1", params)
    decode.sched.abort("r1")  # before the load even went out
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
    decode.worker.apply(decode.sched.build_meta())
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
    decode.sched.add_remote_request("r1", params)  # no blocks yet: the decode pool is busy
    for _ in range(6):  # 12 s of waiting, twice the lease
        clock.now += 2.0
        decode.step()
        assert prefill.step().free_held == []
    blocks = decode.allocate(2)
    decode.held["r1"] = blocks
    decode.sched.on_blocks_allocated("r1", [b.block_id for b in blocks])
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
    )
    whole = prefill.worker.stage(read)
    parts = prefill.worker.stage_parts(read, 2)
    first = next(parts)
    assert prefill.worker.leases.get("r1").pins == 1
    assert prefill.worker.leases.abort("r1")
    assert prefill.worker.get_finished().finished_sending == {}  # pinned: not freed yet
    assert torch.equal(torch.cat([first, *parts]), whole)  # exhausting the parts unpins
    assert prefill.worker.get_finished().finished_sending == {"r1": LeaseEnd.ABORTED}
