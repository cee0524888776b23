"""Router facade: membership, placement across tiers, events, bad input, orphan re-placement."""

from __future__ import annotations

import pytest

from splitserve.errors import ConfigError, InvalidRequestError, NoHealthyWorkerError
from splitserve.hashing import hash_block_tokens, hash_bytes
from splitserve.router import (
    InstanceRole,
    NoInstanceAvailable,
    Router,
    RouterConfig,
    RouteRequest,
    UnknownInstanceError,
)

P, D, E = InstanceRole.PREFILL, InstanceRole.DECODE, InstanceRole.ENCODE


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cluster(policy: str = "dualmap", **config: object) -> tuple[Router, Clock]:
    clock = Clock()
    router = Router(policy, RouterConfig(block_size=16, ttft_slo_s=2.0, **config), clock=clock)
    for i in range(3):
        router.add_instance(f"p{i}", {P}, prefill_rate_tps=1000)
    for i in range(2):
        router.add_instance(f"d{i}", {D}, kv_capacity_blocks=100)
    return router, clock


def request(
    rid: str, n_tokens: int = 64, offset: int = 0, images: tuple[int, ...] = ()
) -> RouteRequest:
    ids = [offset + t for t in range(n_tokens)]
    return RouteRequest(rid, n_tokens, hash_block_tokens(ids, 16), images, max_output_tokens=16)


def test_empty_instance_set_raises_typed_error_at_once() -> None:
    router = Router("dualmap", RouterConfig(block_size=16))
    with pytest.raises(NoInstanceAvailable, match="no healthy prefill instance") as info:
        router.route(request("r"))
    assert isinstance(info.value, NoHealthyWorkerError) and info.value.role == "prefill"
    router.add_instance("p0", {P})
    with pytest.raises(NoInstanceAvailable, match="decode"):
        router.route(request("r"))


def test_decode_only_router_places_prompts_within_the_local_bound() -> None:
    """No prefill instance (a colocated cluster): prompts that prefill on decode are placed;
    a longer one still needs a prefill instance."""
    router = Router("dualmap", RouterConfig(block_size=16, local_prefill_max_tokens=100))
    router.add_instance("d0", {D}, kv_capacity_blocks=100)
    placement = router.route(request("r", 100))
    assert placement.skip_remote_prefill and placement.prefill_instance is None
    assert placement.decode_instance == "d0"
    with pytest.raises(NoInstanceAvailable, match="prefill"):
        router.route(request("long", 101))


def test_unhealthy_instances_are_skipped_and_all_unhealthy_raises() -> None:
    router, _ = cluster("round_robin")
    router.set_healthy("p1", False)
    got = [router.route(request(f"r{i}")).prefill_instance for i in range(4)]
    assert got == ["p0", "p2", "p0", "p2"]
    for i in (0, 2):
        router.set_healthy(f"p{i}", False)
    with pytest.raises(NoInstanceAvailable, match="prefill"):
        router.route(request("late"))
    router.set_healthy("p1", True)
    assert router.route(request("later")).prefill_instance == "p1"


def test_placement_charges_loads_and_events_release_them() -> None:
    router, clock = cluster()
    placement = router.route(request("r1", 64))
    prefill = placement.prefill_instance
    assert prefill is not None and placement.decode_instance == "d0"
    assert not placement.skip_remote_prefill and placement.cached_tokens == 0
    assert placement.predicted_ttft_s == pytest.approx(0.064)
    load = router.loads.get(prefill)
    assert load.num_queued_prefill_tokens == 64 and list(load.queue) == ["r1"]
    assert router.loads.get("d0").num_reserved_kv_blocks == 5  # ceil((64 + 16) / 16)
    router.on_prefill_start("r1")
    assert load.num_queued_prefill_tokens == 0 and load.prefill_tokens_in_progress == 64
    clock.now = 0.032
    assert load.pending_prefill_work(clock.now) == pytest.approx(32)
    clock.now = 0.128  # 500 tok/s, but prefills under 256 tokens are overhead: not learned
    router.on_prefill_done("r1")
    assert load.prefill_rate_tps == 1000
    assert load.num_running_requests == 0
    router.on_kv_stored(prefill, placement and request("r1").block_hashes)
    router.on_finish("r1")
    assert router.loads.get("d0").num_reserved_kv_blocks == 0
    assert router.loads.get("d0").num_running_requests == 0
    router.on_finish("r1")  # idempotent
    # Next request with the same prefix finds the cache at the instance that stored it.
    again = router.route(request("r2", 64))
    assert again.prefill_instance == prefill and again.cached_tokens == 64


def test_rate_is_learned_from_long_prefills() -> None:
    router, clock = cluster()
    p = router.route(request("long", 1024)).prefill_instance or ""
    router.on_prefill_start("long")
    clock.now = 0.5  # 2048 tok/s
    router.on_prefill_done("long")
    assert router.loads.get(p).prefill_rate_tps == pytest.approx(0.8 * 1000 + 0.2 * 2048)


def test_decode_goes_to_least_kv_pressure() -> None:
    router, _ = cluster()
    router.report_kv_usage("d0", 50)
    assert router.route(request("a")).decode_instance == "d1"
    router.report_kv_usage("d0", 0)
    router.report_kv_usage("d1", 90)
    assert router.route(request("b", offset=999)).decode_instance == "d0"


def test_short_uncached_prompt_skips_remote_prefill() -> None:
    router, _ = cluster(local_prefill_max_tokens=32)
    short = router.route(request("short", 32))
    assert short.skip_remote_prefill and short.prefill_instance is None
    assert short.decode_instance == "d0"
    long = router.route(request("long", 48, offset=5))
    assert not long.skip_remote_prefill and long.prefill_instance is not None
    # The decode instance's own cache counts: 64 tokens, 48 of them cached there.
    router.on_kv_stored("d1", request("x", 64, offset=100).block_hashes[:3])
    router.report_kv_usage("d0", 99)
    cached = router.route(request("cached", 64, offset=100))
    assert cached.decode_instance == "d1" and cached.skip_remote_prefill
    assert cached.cached_tokens == 48


def test_images_go_to_encode_instances_by_content_hash() -> None:
    router, _ = cluster()
    with pytest.raises(NoInstanceAvailable, match="encode"):
        router.route(request("img", images=(hash_bytes(b"cat"),)))
    for i in range(4):
        router.add_instance(f"e{i}", {E})
    images = tuple(hash_bytes(f"img{i}".encode()) for i in range(40))
    first = router.route(request("a", images=images)).encode_instances
    second = router.route(request("b", images=images[::-1], offset=7)).encode_instances
    assert len(first) == 40 and first == second[::-1]  # same image, same encoder
    assert len(set(first)) == 4  # different images spread over the encoders
    assert router.route(request("c", offset=3)).encode_instances == ()


def test_remove_instance_returns_its_unfinished_requests() -> None:
    router, _ = cluster("round_robin")
    placed = {rid: router.route(request(rid, offset=i)) for i, rid in enumerate("abcdef")}
    on_p1 = sorted(rid for rid, p in placed.items() if p.prefill_instance == "p1")
    router.on_prefill_start(on_p1[0])
    router.on_prefill_done(on_p1[0])  # prefill done: no longer held by p1
    orphans = router.remove_instance("p1")
    assert sorted(orphans) == on_p1[1:]
    assert "p1" not in router.instances(P)
    for rid in orphans:  # the cluster routes them again
        assert router.route(request(rid)).prefill_instance in ("p0", "p2")
    with pytest.raises(UnknownInstanceError, match="'p1'"):
        router.on_kv_stored("p1", [1])


def test_scale_out_at_run_time_receives_traffic() -> None:
    router, _ = cluster("dualmap")
    router.add_instance("p3", {P}, prefill_rate_tps=1000)
    got = {router.route(request(f"r{i}", offset=100 * i)).prefill_instance for i in range(60)}
    assert "p3" in got


def test_bad_input_is_named() -> None:
    router, _ = cluster()
    router.route(request("dup"))
    with pytest.raises(InvalidRequestError, match="already placed"):
        router.route(request("dup"))
    with pytest.raises(InvalidRequestError, match="block hashes") as info:
        router.route(RouteRequest("bad", 10, (1, 2)))
    assert info.value.field == "block_hashes"
    with pytest.raises(InvalidRequestError, match="prompt_len"):
        RouteRequest("neg", -1)
    with pytest.raises(InvalidRequestError, match="request_id"):
        RouteRequest("", 1)
    with pytest.raises(ValueError, match="already registered"):
        router.add_instance("p0")
    with pytest.raises(ValueError, match="at least one role"):
        router.add_instance("x", ())
    with pytest.raises(ValueError, match="'gpu'"):
        router.add_instance("y", {"gpu"})
    with pytest.raises(ValueError, match="prefill_rate_tps must be positive"):
        router.add_instance("z", prefill_rate_tps=0)
    with pytest.raises(UnknownInstanceError):
        router.set_healthy("nope", False)
    with pytest.raises(ConfigError, match="block_size"):
        RouterConfig(block_size=0)
    router.on_finish("never-placed")  # events for unknown requests are ignored
    router.on_prefill_done("never-placed")
