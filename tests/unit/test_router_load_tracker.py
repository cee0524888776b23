"""LoadTracker accounting: exact counters through add, start, done, finish, move, removal."""

from __future__ import annotations

import pytest

from splitserve.router.errors import UnknownInstanceError
from splitserve.router.load_tracker import LoadTracker


def tracker() -> LoadTracker:
    loads = LoadTracker(default_prefill_rate_tps=1000.0, default_kv_capacity_blocks=10)
    for name in ("p0", "p1", "d0"):
        loads.add_instance(name)
    return loads


def test_lifecycle_counters_are_exact() -> None:
    loads = tracker()
    loads.on_add("a", "p0", "d0", prefill_tokens=300, prompt_blocks=2, kv_blocks=4)
    loads.on_add("b", "p0", "d0", prefill_tokens=200, prompt_blocks=1, kv_blocks=3)
    p0, d0 = loads.get("p0"), loads.get("d0")
    assert (
        p0.num_queued_prefill_tokens,
        p0.num_active_prefill_blocks,
        p0.num_running_requests,
    ) == (500, 3, 2)
    assert (d0.num_reserved_kv_blocks, d0.num_running_requests) == (7, 2)
    assert d0.kv_pressure == pytest.approx(0.7)
    assert p0.predicted_ttft(100, now=0.0) == pytest.approx(0.6)
    loads.on_prefill_start("a", now=1.0)
    assert list(p0.queue) == ["b"] and p0.num_queued_prefill_tokens == 200
    assert p0.pending_prefill_work(now=1.1) == pytest.approx(200 + 300 - 100)
    loads.on_prefill_done("a", now=1.3)  # 300 tokens in 0.3 s = 1000 tok/s
    assert p0.prefill_rate_tps == pytest.approx(1000.0)
    assert (p0.num_active_prefill_blocks, p0.num_running_requests, p0.num_prefilled_tokens) == (
        1,
        1,
        300,
    )
    loads.on_finish("a")
    assert (d0.num_reserved_kv_blocks, d0.num_running_requests) == (3, 1)
    loads.on_finish("b")  # aborted before its prefill started
    assert (
        p0.num_queued_prefill_tokens,
        p0.num_active_prefill_blocks,
        p0.num_running_requests,
    ) == (0, 0, 0)
    assert (d0.num_reserved_kv_blocks, d0.num_running_requests) == (0, 0)


def test_a_prefill_started_beside_the_end_of_another_keeps_its_instance_busy() -> None:
    """c starts while a has 100 tokens left (chunked prefill packs both into one step). When a
    finishes, c's work is still in progress: the instance must not look idle."""
    loads = tracker()
    loads.on_add("a", "p0", "d0", prefill_tokens=3000, prompt_blocks=0, kv_blocks=0)
    loads.on_add("c", "p0", "d0", prefill_tokens=1000, prompt_blocks=0, kv_blocks=0)
    p0 = loads.get("p0")
    loads.on_prefill_start("a", now=0.0)
    loads.on_prefill_start("c", now=2.9)  # a: 100 left; in progress 100 + 1000
    assert p0.pending_prefill_work(now=2.9) == pytest.approx(1100)
    loads.on_prefill_done("a", now=3.0)  # 3000 tokens in 3 s: the rate stays 1000 tok/s
    assert p0.pending_prefill_work(now=3.0) == pytest.approx(1000)  # (was 0: 1100 - 3000)
    assert p0.predicted_ttft(0, now=3.5) == pytest.approx(0.5)
    loads.on_prefill_done("c", now=4.0)
    assert p0.pending_prefill_work(now=4.0) == 0 and p0.in_progress == {}


def test_move_queued_moves_work_and_refuses_started_requests() -> None:
    loads = tracker()
    loads.on_add("a", "p0", "d0", 300, 2, 4)
    loads.move_queued("a", "p1", prefill_tokens=100)  # p1 holds part of its prefix
    assert (
        loads.get("p0").num_queued_prefill_tokens == 0 and loads.get("p0").num_running_requests == 0
    )
    assert loads.get("p1").num_queued_prefill_tokens == 100 and list(loads.get("p1").queue) == ["a"]
    loads.on_prefill_start("a", now=0.0)
    with pytest.raises(ValueError, match="cannot migrate"):
        loads.move_queued("a", "p0", 300)


def test_same_instance_for_prefill_and_decode_counts_once() -> None:
    loads = tracker()
    loads.on_add("a", "p0", "p0", 100, 1, 2)
    assert loads.get("p0").num_running_requests == 1
    loads.on_prefill_done("a", now=0.1)
    assert loads.get("p0").num_running_requests == 1
    loads.on_finish("a")
    assert loads.get("p0").num_running_requests == 0 and loads.get("p0").num_reserved_kv_blocks == 0


def test_unknown_instances_and_duplicates_are_errors() -> None:
    loads = tracker()
    with pytest.raises(UnknownInstanceError, match="'zz'"):
        loads.on_add("a", "zz", "d0", 1, 1, 1)
    assert "a" not in loads and loads.get("d0").num_reserved_kv_blocks == 0  # nothing charged
    loads.on_add("a", "p0", "d0", 1, 1, 1)
    with pytest.raises(ValueError, match="already placed"):
        loads.on_add("a", "p0", "d0", 1, 1, 1)
    with pytest.raises(ValueError, match="already tracked"):
        loads.add_instance("p0")
    with pytest.raises(ValueError, match="kv_capacity_blocks must be positive"):
        loads.add_instance("x", kv_capacity_blocks=0)


def test_rate_is_learned_from_throughput_when_prefills_are_batched() -> None:
    # Two 500-token prompts prefilled in one engine step finishing at t=1.0: the instance did
    # 1000 tokens in 1 s. Per request (500 tokens / 1 s) it would look half as fast.
    loads = tracker()
    for rid in ("a", "b"):
        loads.on_add(rid, "p0", "d0", prefill_tokens=500, prompt_blocks=1, kv_blocks=1)
        loads.on_prefill_start(rid, now=0.0)
    p0 = loads.get("p0")
    p0.prefill_rate_tps = 1000.0
    loads.on_prefill_done("a", now=1.0)
    assert p0.prefill_rate_tps == pytest.approx(0.8 * 1000 + 0.2 * 500)  # alone so far
    loads.on_prefill_done("b", now=1.0)  # its batch-mate: the sample is re-done with both
    assert p0.prefill_rate_tps == pytest.approx(1000.0)
    # A chunked pair: c finishes at 2.5, d (started with it) at 3.0: each is charged the time
    # since the previous completion, 0.5 s for 500 tokens.
    for rid in ("c", "d"):
        loads.on_add(rid, "p0", "d0", prefill_tokens=500, prompt_blocks=1, kv_blocks=1)
        loads.on_prefill_start(rid, now=2.0)
    loads.on_prefill_done("c", now=2.5)
    loads.on_prefill_done("d", now=3.0)
    assert p0.prefill_rate_tps == pytest.approx(1000.0)


def test_an_instance_without_samples_follows_the_learned_rate() -> None:
    """An instance with no completion of its own takes its given rate times learned / given of
    the instances that learned; its own first sample detaches it."""
    loads = LoadTracker(default_prefill_rate_tps=1000.0, default_kv_capacity_blocks=10)
    loads.add_instance("p0")
    loads.add_instance("slow", prefill_rate_tps=500.0)  # a hint: half as fast as p0
    loads.on_add("a", "p0", None, prefill_tokens=1000, prompt_blocks=1, kv_blocks=0)
    loads.on_prefill_start("a", now=0.0)
    loads.on_prefill_done("a", now=0.25)  # 4000 tokens/s: p0's EWMA 0.8 * 1000 + 0.2 * 4000
    assert loads.get("p0").prefill_rate_tps == pytest.approx(1600.0)
    assert loads.learned_rate_scale == pytest.approx(1.6)
    assert loads.get("slow").prefill_rate_tps == pytest.approx(800.0)
    loads.add_instance("late")  # joins after learning began: default rate, same scale
    assert loads.get("late").prefill_rate_tps == pytest.approx(1600.0)
    loads.on_add("b", "slow", None, prefill_tokens=1000, prompt_blocks=1, kv_blocks=0)
    loads.on_prefill_start("b", now=1.0)
    loads.on_prefill_done("b", now=2.0)  # its own sample: 0.8 * 800 + 0.2 * 1000
    assert loads.get("slow").prefill_rate_tps == pytest.approx(840.0)
    loads.on_add("c", "p0", None, prefill_tokens=1000, prompt_blocks=1, kv_blocks=0)
    loads.on_prefill_start("c", now=3.0)
    loads.on_prefill_done("c", now=3.25)  # p0 learns on; "slow" keeps its own rate
    assert loads.get("slow").prefill_rate_tps == pytest.approx(840.0)
    assert loads.learned_rate_scale == pytest.approx((2080.0 + 840.0) / 1500.0)
    assert loads.get("late").prefill_rate_tps == pytest.approx(1000.0 * (2080.0 + 840.0) / 1500)


def test_an_idle_instance_that_never_prefilled_is_not_taken_for_slow() -> None:
    """The placement this changes: p0 learned it is faster than the starting estimate; idle p1,
    never used, is as fast and predicted so, so a request goes there, not behind p0's queue."""
    from splitserve.router.router import Router
    from splitserve.router.schema import InstanceRole, RouterConfig, RouteRequest

    now = [0.0]
    router = Router("least_loaded", RouterConfig(default_prefill_rate_tps=1000.0), lambda: now[0])
    for name in ("p0", "p1"):
        router.add_instance(name, {InstanceRole.PREFILL})
    router.add_instance("d0", {InstanceRole.DECODE})
    assert router.route(RouteRequest("a", 1000)).prefill_instance == "p0"  # tie: first joined
    router.on_prefill_start("a")
    now[0] = 0.25
    router.on_prefill_done("a")  # p0: 1600 tokens/s learned
    router.loads.on_add("queued", "p0", None, prefill_tokens=500, prompt_blocks=1, kv_blocks=0)
    # p0: (500 + 1000) / 1600 = 0.94 s. p1 at the old 1000 tokens/s would predict 1.0 s and
    # lose; at the learned scale it predicts 1000 / 1600 = 0.625 s.
    placement = router.route(RouteRequest("b", 1000))
    assert placement.prefill_instance == "p1"
    assert placement.predicted_ttft_s == pytest.approx(0.625)


def test_kappa_learns_only_from_prefills_that_ran_alone() -> None:
    """Prefills timed exactly as 1e-4 s per token + 1e-9 s per (token, context) pair give
    kappa = 1e-5; a prefill that started beside another one (its time holds the other's chunks)
    must not feed the fit, or kappa follows the batch-mates' attention instead."""
    loads = tracker()
    now = 0.0
    for i in range(20):
        n, cached = 1000 + 100 * i, 500 * i
        loads.on_add(f"alone{i}", "p0", None, n, 1, 0, cached_tokens=cached)
        loads.on_prefill_start(f"alone{i}", now=now)
        now += 1e-4 * n + 1e-9 * n * (cached + n / 2)
        loads.on_prefill_done(f"alone{i}", now=now)
        # On p1: a short prompt starts while a long one is in progress and is done first,
        # charged 50x its own time; the long one is then charged only the time since.
        loads.on_add(f"long{i}", "p1", None, 8000, 1, 0)
        loads.on_add(f"beside{i}", "p1", None, 1000, 1, 0)
        loads.on_prefill_start(f"long{i}", now=now)
        loads.on_prefill_start(f"beside{i}", now=now + 0.01)
        loads.on_prefill_done(f"beside{i}", now=now + 5.0)
        loads.on_prefill_done(f"long{i}", now=now + 5.5)
        now += 6.0
    assert loads.attention_coeff == pytest.approx(1e-5, rel=1e-6)
