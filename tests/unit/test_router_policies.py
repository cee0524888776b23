"""Policies: exact choices, DualMap's SLO fallback and rebalancing at the threshold, registry."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.errors import ConfigError
from splitserve.router.errors import UnknownPolicyError
from splitserve.router.policies import (
    DualMap,
    RecentSlack,
    available_policies,
    create_policy,
    routing_key,
)
from splitserve.router.router import Router
from splitserve.router.schema import InstanceRole, RouterConfig, RouteRequest

PREFILL = {InstanceRole.PREFILL}
SLO = 2.0
RATE = 1000.0  # tokens/s, so 1000 queued tokens = 1 s of predicted TTFT


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_router(policy: str, n: int = 4, **config: object) -> Router:
    cfg = RouterConfig(ttft_slo_s=SLO, block_size=4, prefix_key_blocks=1, **config)
    router = Router(policy, cfg, clock=Clock())
    for i in range(n):
        router.add_instance(f"p{i}", PREFILL, prefill_rate_tps=RATE)
    router.add_instance("d0", {InstanceRole.DECODE}, kv_capacity_blocks=1000)
    return router


def req(rid: str, prompt_len: int, blocks: tuple[int, ...] = ()) -> RouteRequest:
    return RouteRequest(rid, prompt_len, blocks)


def load_instance(router: Router, instance: str, tokens: int, tag: str) -> None:
    """Queue ``tokens`` uncached tokens on ``instance`` as a not-started request."""
    router.loads.on_add(f"fill-{tag}", instance, None, tokens, 0, 0)


def test_registry_and_unknown_names() -> None:
    assert available_policies() == sorted(
        ["dualmap", "kv_overlap_cost", "least_loaded", "prefix_affinity", "round_robin"]
    )
    with pytest.raises(UnknownPolicyError, match=r"'nope'.*dualmap, kv_overlap_cost"):
        create_policy("nope")
    with pytest.raises(UnknownPolicyError):
        Router("dual_map")
    with pytest.raises(ConfigError, match="ttft_slo_s must be a positive"):
        RouterConfig(ttft_slo_s=0)
    with pytest.raises(ConfigError, match="ttft_slo_s must be a positive"):
        RouterConfig(ttft_slo_s=-1.5)


def test_round_robin_cycles_in_join_order() -> None:
    router = make_router("round_robin", 3)
    got = [router.route(req(f"r{i}", 10)).prefill_instance for i in range(7)]
    assert got == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]


def test_least_loaded_picks_smallest_backlog() -> None:
    router = make_router("least_loaded", 3)
    load_instance(router, "p0", 500, "a")
    load_instance(router, "p1", 100, "b")
    load_instance(router, "p2", 300, "c")
    assert router.route(req("r", 10)).prefill_instance == "p1"


def test_prefix_affinity_ignores_load() -> None:
    router = make_router("prefix_affinity", 4)
    first = router.route(req("r0", 8, (11, 12))).prefill_instance
    load_instance(router, first, 10_000, "x")
    assert router.route(req("r1", 8, (11, 12))).prefill_instance == first


def test_kv_overlap_cost_is_weighted_prefill_blocks_plus_active_blocks() -> None:
    router = make_router("kv_overlap_cost", 3)
    router.on_kv_stored("p1", [1, 2, 3])  # p1 holds 3 of the request's 4 blocks
    router.loads.on_add("busy", "p1", None, 0, 2, 0)  # 2 active blocks on p1
    placement = router.route(req("r", 16, (1, 2, 3, 4)))
    # costs: p0 = 4 + 0, p1 = 1 + 2, p2 = 4 + 0 -> p1
    assert placement.prefill_instance == "p1" and placement.cached_tokens == 12
    router.loads.on_add("busier", "p1", None, 0, 2, 0)  # p1 now 1 + 4 + 4 (r's own) = 9
    assert router.route(req("r2", 16, (1, 2, 3, 4))).prefill_instance == "p0"


def dualmap_setup() -> tuple[Router, RouteRequest, tuple[str, ...]]:
    router = make_router("dualmap", 6)
    request = req("probe", 400, (77,))
    policy = router.policy
    assert isinstance(policy, DualMap)
    candidates = policy.candidates(request)
    assert len(candidates) == 2
    assert candidates == policy.rings.candidates(routing_key(request, 1))
    return router, request, candidates


def load_others(router: Router, candidates: tuple[str, ...], tokens: int) -> None:
    """Queue ``tokens`` on every prefill instance that is not a candidate."""
    for instance in router.instances(InstanceRole.PREFILL):
        if instance not in candidates:
            load_instance(router, instance, tokens, f"other-{instance}")


def test_dualmap_picks_the_candidate_with_lower_predicted_ttft() -> None:
    router, request, (a, b) = dualmap_setup()
    load_instance(router, a, 600, "a")  # a: (600 + 400) / 1000 = 1.0 s
    load_instance(router, b, 300, "b")  # b: 0.7 s
    load_others(router, (a, b), 300)  # as fast as b: the affinity costs nothing
    placement = router.route(request)
    assert placement.prefill_instance == b and not placement.fallback
    assert placement.predicted_ttft_s == pytest.approx(0.7)
    assert placement.candidates == (a, b)


def test_dualmap_counts_the_candidates_cache_hit() -> None:
    router = make_router("dualmap", 6)
    request = req("probe", 400, tuple(range(1, 101)))  # 100 blocks of 4 tokens
    a, b = router.policy.candidates(request)  # type: ignore[attr-defined]
    load_instance(router, a, 600, "a")  # a: (600 + 400) / 1000 = 1.0 s uncached
    load_instance(router, b, 300, "b")  # b: 0.7 s
    load_others(router, (a, b), 300)
    router.on_kv_stored(a, range(1, 76))  # a holds 75 blocks = 300 tokens: 0.7 s; tie -> a
    placement = router.route(request)
    assert placement.prefill_instance == a and placement.cached_tokens == 300
    assert placement.predicted_ttft_s == pytest.approx(0.7)


def test_dualmap_leaves_its_candidates_exactly_past_the_slo_fraction() -> None:
    router, request, (a, b) = dualmap_setup()
    # Others predict 0.95 s; the candidates exactly half the SLO (1.0 s): stay with one.
    load_others(router, (a, b), 550)
    load_instance(router, a, 600, "a")
    load_instance(router, b, 600, "b")
    at_limit = router.route(request)
    assert at_limit.prefill_instance == a and not at_limit.fallback
    router.on_finish("probe")
    # One token more on each: 1.001 s > SLO / 2 -> the globally lowest predicted TTFT.
    load_instance(router, a, 1, "a2")
    load_instance(router, b, 1, "b2")
    past = router.route(RouteRequest("probe2", 400, (77,)))
    others = [i for i in router.instances(InstanceRole.PREFILL) if i not in (a, b)]
    assert past.fallback and past.prefill_instance == others[0]  # all equal: first joined
    assert past.predicted_ttft_s == pytest.approx(0.95)


def test_dualmap_leaves_its_candidates_exactly_past_a_quarter_of_the_headroom() -> None:
    router, request, (a, b) = dualmap_setup()
    # Others idle: 0.4 s, headroom 1.6 s. Candidates at 0.4 + 1.6 / 4 = 0.8 s: they keep it.
    load_instance(router, a, 400, "a")
    load_instance(router, b, 400, "b")
    at_share = router.route(request)
    assert at_share.prefill_instance == a and not at_share.fallback
    router.on_finish("probe")
    load_instance(router, a, 1, "a2")  # 0.801 s: past a quarter of the headroom
    load_instance(router, b, 1, "b2")
    past = router.route(RouteRequest("probe2", 400, (77,)))
    assert past.fallback and past.prefill_instance not in (a, b)
    assert past.predicted_ttft_s == pytest.approx(0.4)
    # A long prompt that barely fits the SLO anywhere has no headroom to spend on affinity.
    long_request = RouteRequest("long", 1900, (77,))  # 1.9 s idle: headroom 0.1 s
    c, d = router.policy.candidates(long_request)  # type: ignore[attr-defined]
    load_instance(router, c, 100, "c")  # 2.0 s: within the SLO, but 0.1 s > 0.025 s
    load_instance(router, d, 100, "d")
    long_placed = router.route(long_request)
    assert long_placed.prefill_instance not in (c, d)


def test_dualmap_affinity_never_prefills_again_what_the_fastest_instance_caches() -> None:
    """A candidate within the TTFT allowance still loses the request to the fastest instance
    when that one holds more of the prompt cached: keeping the affinity would compute the
    cached blocks a second time and store a second copy of them."""
    router, request, (a, b) = dualmap_setup()  # 400 tokens, one block of 4
    long_request = RouteRequest("session", 400, tuple(range(1, 101)))  # 100 blocks
    c, d = router.policy.candidates(long_request)  # type: ignore[attr-defined]
    others = [i for i in router.instances(InstanceRole.PREFILL) if i not in (c, d)]
    holder = others[0]
    router.on_kv_stored(holder, range(1, 51))  # 200 tokens cached: 0.2 s of work left
    load_instance(router, holder, 100, "holder")  # holder: 0.3 s, the fastest
    load_others(router, (c, d, holder), 1000)  # the rest: 1.4 s
    load_instance(router, d, 300, "d")  # d: 0.7 s; c idle: 0.4 s, within 0.3 + 1.7 / 4
    assert isinstance(router.policy, DualMap)
    assert router.policy.acceptable_ttft(SLO, 0.3) == pytest.approx(0.725)
    placement = router.route(long_request)
    assert placement.prefill_instance == holder and placement.fallback
    assert placement.cached_tokens == 200
    assert placement.predicted_ttft_s == pytest.approx(0.3)
    # Once a candidate caches as much, the affinity holds again even though it is slower.
    router.on_finish("session")
    router.on_kv_stored(c, range(1, 51))  # c: 0.2 s of work, idle
    router.on_kv_stored(holder, range(51, 61))  # the holder: 240 tokens cached, 0.16 + 0.1 s
    load_instance(router, c, 300, "c")  # c: 0.5 s, within 0.26 + 1.74 / 4 = 0.695 s
    placement = router.route(RouteRequest("session2", 400, tuple(range(1, 101))))
    assert placement.prefill_instance == holder  # holder caches more than c: no affinity
    router.on_finish("session2")
    router.on_kv_stored(c, range(51, 61))  # now c caches as much as the holder
    placement = router.route(RouteRequest("session3", 400, tuple(range(1, 101))))
    assert placement.prefill_instance == c and not placement.fallback
    assert placement.predicted_ttft_s == pytest.approx(0.3 + 0.16)


def test_dualmap_sends_a_request_late_everywhere_to_its_longest_cached_prefix() -> None:
    """Predicted past the SLO even at the fastest instance: the request goes where its prefix
    is cached (least prefill work, no second copy of the prefix), not to the fastest."""
    router = make_router("dualmap", 6)
    blocks = tuple(range(1, 501))  # 500 blocks of 4 tokens
    request = req("late", 2000, blocks)  # 2.0 s uncached on an idle instance: at the SLO
    a, b = router.policy.candidates(request)  # type: ignore[attr-defined]
    holder, shallow = [i for i in router.instances(InstanceRole.PREFILL) if i not in (a, b)][:2]
    router.on_kv_stored(holder, blocks[:250])  # 1000 tokens cached: 1.0 s of work there
    router.on_kv_stored(shallow, blocks[:100])  # 400 tokens cached: 1.6 s
    load_instance(router, holder, 1500, "holder")  # holder: 2.5 s, the slowest of all
    load_instance(router, shallow, 500, "shallow")  # shallow: 2.1 s
    load_instance(router, a, 100, "a")  # a, b: 2.1 s uncached
    load_instance(router, b, 150, "b")
    for other in router.instances(InstanceRole.PREFILL):
        if other not in (a, b, holder, shallow):
            load_instance(router, other, 50, other)  # 2.05 s: the fastest, still late
    placement = router.route(request)
    assert placement.prefill_instance == holder and placement.fallback
    assert placement.cached_tokens == 1000
    assert placement.predicted_ttft_s == pytest.approx(2.5)
    # With one instance able to meet the SLO, the usual rule applies again.
    router.on_finish("late")
    router.on_finish("fill-b")
    early = router.route(req("early", 2000, blocks))
    assert early.prefill_instance == b and early.predicted_ttft_s == pytest.approx(2.0)


def express_setup(deep: int = 7000) -> tuple[Router, RouteRequest, tuple[str, ...], str]:
    """Six instances: a patient request's candidates ``deep`` tokens (1 s per 1000) deep, three
    others 1 s, one idle."""
    router = make_router("dualmap", 6)
    patient = RouteRequest("patient", 1000, (77,), ttft_slo_s=10.0)  # 1 s alone: slack 9 s
    a, b = router.policy.candidates(patient)  # type: ignore[attr-defined]
    others = [i for i in router.instances(InstanceRole.PREFILL) if i not in (a, b)]
    idle = others[-1]
    for instance in (a, b):  # 8 s by default: past min(0.7 x 10 s, best + 9 / 2) anywhere
        load_instance(router, instance, deep, instance)
    for instance in others[:-1]:
        load_instance(router, instance, 1000, instance)
    return router, patient, (a, b), idle


def test_dualmap_keeps_the_express_lane_for_a_tight_request_when_busy() -> None:
    """Every instance but one would start a request after the tight slack: the one that starts
    first is kept for requests that cannot wait. A patient request (its slack many times the
    tight one) goes to the fastest other instance, where it still starts well within its SLO,
    instead of taking the idle one; the tight request that follows starts there at once."""
    router, patient, (a, b), idle = express_setup()
    first = router.route(RouteRequest("tight1", 100, (5,), ttft_slo_s=0.5))  # slack 0.4 s
    assert first.prefill_instance == idle and first.predicted_ttft_s == pytest.approx(0.1)
    placed = router.route(patient)
    # Before: the fastest instance anywhere, the idle one (1.1 s), which tight2 needs.
    assert placed.prefill_instance not in (a, b, idle) and placed.fallback
    assert placed.predicted_ttft_s == pytest.approx(2.0)
    tight = router.route(RouteRequest("tight2", 100, (6,), ttft_slo_s=0.5))
    assert tight.prefill_instance == idle
    assert tight.predicted_ttft_s == pytest.approx(0.2)  # within 0.5 s: it starts in time


def test_dualmap_express_lane_only_while_the_cluster_is_busy() -> None:
    """With a second instance starting within the tight slack, nothing is kept: the patient
    request takes the fastest instance as before."""
    router, patient, (a, b), idle = express_setup()
    router.route(RouteRequest("tight1", 100, (5,), ttft_slo_s=0.5))  # tight slack 0.4 s
    spare = next(i for i in router.instances(InstanceRole.PREFILL) if i not in (a, b, idle))
    router.on_finish(f"fill-{spare}")  # spare idle: starts at once, so the cluster is not busy
    placed = router.route(patient)
    assert placed.prefill_instance == spare and placed.fallback
    assert placed.predicted_ttft_s == pytest.approx(1.0)


def test_dualmap_a_patient_request_waits_longer_for_its_cache_while_busy() -> None:
    """With the express lane kept, a patient request keeps a candidate up to
    min(0.7 x SLO, best + half the headroom), not min(SLO / 2, best + a quarter of it), with
    best the fastest instance outside the lane."""
    router, patient, (a, b), idle = express_setup(deep=4000)  # candidates: 5 s
    router.route(RouteRequest("tight1", 100, (5,), ttft_slo_s=0.5))  # tight slack 0.4 s
    placed = router.route(patient)  # best outside the lane 2 s: 5 s > min(5, 4), <= min(7, 6)
    assert placed.prefill_instance in (a, b) and not placed.fallback
    assert placed.predicted_ttft_s == pytest.approx(5.0)
    # Not busy (a second idle instance): the usual bound, so the fastest instance wins.
    router.on_finish("patient")
    spare = next(i for i in router.instances(InstanceRole.PREFILL) if i not in (a, b, idle))
    router.on_finish(f"fill-{spare}")
    placed = router.route(RouteRequest("patient2", 1000, (77,), ttft_slo_s=10.0))
    assert placed.prefill_instance == spare and placed.fallback


def test_recent_slack_is_a_low_quantile_refreshed_periodically() -> None:
    slack = RecentSlack(window=10, quantile=0.1, every=5)
    slack.observe(3.0)
    assert slack.tight == 3.0  # the first observation sets it
    for value in (0.5, 9.0, 9.0, 9.0):
        slack.observe(value)
    assert slack.tight == 3.0  # not refreshed yet
    slack.observe(9.0)  # the 6th: refreshed over the window
    assert slack.tight == 0.5


@settings(max_examples=60, deadline=None)
@given(
    backlogs=st.lists(st.integers(0, 3000), min_size=6, max_size=6),
    held=st.lists(st.integers(0, 20), min_size=6, max_size=6),
    prompt=st.integers(4, 80),
    slo=st.sampled_from([0.5, 2.0, 8.0]),
)
def test_dualmap_never_queues_for_affinity_beyond_its_bounds(
    backlogs: list[int], held: list[int], prompt: int, slo: float
) -> None:
    """Whatever the loads and caches: the chosen instance is a hash candidate caching at least
    as long a prefix as the fastest instance, whose predicted TTFT is within
    min(SLO / 2, best + (SLO - best) / 4) with best the global lowest, or else the global best
    itself; when even the best is past the SLO, the fastest of the instances holding the longest
    cached prefix."""
    router = make_router("dualmap", 6)
    blocks = tuple(range(1, prompt // 4 + 1))
    for i, (tokens, n) in enumerate(zip(backlogs, held, strict=True)):
        load_instance(router, f"p{i}", tokens, str(i))
        router.on_kv_stored(f"p{i}", blocks[:n])
    request = RouteRequest("probe", prompt, blocks, ttft_slo_s=slo)
    view = router._view()
    matches = view.match(request)
    predicted = {i: view.predicted_ttft(i, request, matches.get(i, 0)) for i in view.prefill_set}
    best = min(predicted.values())
    fastest, _ = view.best_predicted_ttft(request, matches)
    candidates = router.policy.candidates(request)  # type: ignore[attr-defined]
    placement = router.route(request)
    chosen = placement.prefill_instance or ""
    assert placement.predicted_ttft_s == pytest.approx(predicted[chosen])
    bound = min(slo / 2, best + max(0.0, slo - best) / 4)
    # Only candidates caching at least as much of the prompt as the fastest instance count.
    eligible = [c for c in candidates if matches.get(c, 0) >= matches.get(fastest, 0)]
    best_candidate = min((predicted[c] for c in eligible), default=math.inf)
    if best > slo:  # late anywhere: the least work, i.e. the longest cached prefix
        depth = max(matches.values(), default=0)
        if depth:
            assert matches.get(chosen, 0) == depth
            assert predicted[chosen] == min(predicted[i] for i, n in matches.items() if n == depth)
        else:
            assert predicted[chosen] == pytest.approx(best)
    elif best_candidate <= bound:  # the affinity holds: the better candidate keeps it
        assert chosen in candidates and not placement.fallback
        assert predicted[chosen] == best_candidate
    else:  # no candidate is good enough: the fastest instance anywhere
        assert predicted[chosen] == pytest.approx(best)
        assert placement.fallback == (chosen not in candidates)


def test_dualmap_rebalance_moves_queued_work_only_past_the_slo() -> None:
    router = make_router("dualmap", 2)
    # p0 holds 3 queued requests of 700 tokens: 2.1 s > SLO; p1 idle.
    for i in range(3):
        router.loads.on_add(f"q{i}", "p0", None, 700, 0, 0)
        router._queued[f"q{i}"] = req(f"q{i}", 700)
    migrations = router.rebalance()
    assert [(m.request_id, m.source, m.target) for m in migrations] == [("q2", "p0", "p1")]
    assert migrations[0].predicted_ttft_s == pytest.approx(0.7)
    assert router.loads.get("p0").num_queued_prefill_tokens == 1400
    assert router.loads.get("p1").num_queued_prefill_tokens == 700
    assert router.rebalance() == []  # p0 now predicts 1.4 s: at or under the SLO, nothing moves


def test_dualmap_rebalance_does_not_trigger_at_exactly_the_slo() -> None:
    router = make_router("dualmap", 2)
    for i in range(2):
        router.loads.on_add(f"q{i}", "p0", None, 1000, 0, 0)  # exactly 2.0 s
        router._queued[f"q{i}"] = req(f"q{i}", 1000)
    assert router.rebalance() == []
    router.loads.on_add("q2", "p0", None, 1, 0, 0)  # 2.001 s
    router._queued["q2"] = req("q2", 1)
    assert [m.request_id for m in router.rebalance()] == ["q2"]


def test_dualmap_rebalance_never_moves_started_requests() -> None:
    router = make_router("dualmap", 2)
    placement = router.route(req("big", 4000))
    router.on_prefill_start("big")
    assert router.loads.get(placement.prefill_instance or "").queue == {}
    assert router.rebalance() == []


def test_baselines_do_not_rebalance() -> None:
    for name in ("round_robin", "least_loaded", "prefix_affinity", "kv_overlap_cost"):
        router = make_router(name, 2)
        for i in range(5):
            router.loads.on_add(f"q{i}", "p0", None, 1000, 0, 0)
            router._queued[f"q{i}"] = req(f"q{i}", 1000)
        assert router.rebalance() == []


def test_dualmap_counts_blocks_a_queued_prefill_will_store_baselines_do_not() -> None:
    router = make_router("dualmap", 6)
    turn1 = req("turn1", 400, tuple(range(1, 101)))
    turn2 = req("turn2", 440, tuple(range(1, 111)))  # same conversation, 10 blocks longer
    first = router.route(turn1)
    a = first.prefill_instance
    second = router.route(turn2)  # turn1 is still queued at a: its 400 tokens will be cached
    assert second.prefill_instance == a and second.cached_tokens == 400
    assert router.loads.get(a or "").queued_prefill_work == pytest.approx(400 + 40)
    router.on_finish("turn1")  # aborted before their prefills: the forecast goes with them
    router.on_finish("turn2")
    third = router.route(req("turn3", 440, tuple(range(1, 111))))
    assert third.cached_tokens == 0

    kv = make_router("kv_overlap_cost", 2)
    kv.route(turn1)
    assert not kv.policy.uses_forecast
    assert kv.route(turn2).prefill_instance == "p1"  # events only: p0 looks busy, not cached


def test_fast_fallback_scan_equals_the_plain_minimum() -> None:
    import random

    rng = random.Random(3)
    router = make_router("dualmap", 40)
    router.loads.attention_coeff = 1e-4
    clock = router.clock
    assert isinstance(clock, Clock)
    for i in range(40):
        load_instance(router, f"p{i}", rng.randrange(0, 5000), f"x{i}")
        if i % 3 == 0:  # some are prefilling: their estimates decay with the clock
            router.loads.on_prefill_start(f"fill-x{i}", now=0.1 * (i % 7))
    clock.now = 0.7
    for trial in range(200):
        blocks = tuple(range(trial, trial + 50))
        request = req(f"q{trial}", 200, blocks)
        matches = {f"p{i}": rng.randrange(0, 51) for i in rng.sample(range(40), 8)}
        view = router._view()
        exclude = f"p{rng.randrange(40)}"
        fast = view.best_predicted_ttft(request, matches, exclude=exclude)
        plain = min(
            (
                (view.predicted_ttft(i, request, matches.get(i, 0)), n, i)
                for n, i in enumerate(view.prefill_instances)
                if i != exclude
            )
        )
        assert fast == (plain[2], pytest.approx(plain[0]))


def test_dualmap_keys_past_a_hot_shared_prefix() -> None:
    from splitserve.router.policies import DualMap, HotPrefixes

    hot = HotPrefixes(window=100, share=0.05, min_count=8)
    system = (101, 102, 103)  # three blocks every request starts with
    for i in range(40):
        hot.observe((*system, 1000 + i, 2000 + i))
    assert hot.hot_depth((*system, 5000, 5001)) == 3
    assert hot.hot_depth((101, 999)) == 0  # block 101 is shared but always continues to 102
    assert hot.hot_depth((7, 8)) == 0
    for i in range(200):  # the window forgets
        hot.observe((9000 + i,))
    assert hot.hot_depth((*system, 5000)) == 0 and 101 not in hot.counts

    router = make_router("dualmap", 16)
    policy = router.policy
    assert isinstance(policy, DualMap)
    owners = set()
    for i in range(60):  # sessions behind one system prompt: keys spread once it is hot
        request = req(f"s{i}", 24, (*system, 3000 + i, 4000 + i))
        placement = router.route(request)
        if i >= 20:
            owners.add(placement.candidates)
        router.on_finish(request.request_id)
    assert len(owners) > 8
    # A turn that repeats a session's blocks keys like the session's earlier turn.
    first = req("t1", 24, (*system, 3000, 4000))
    later = req("t2", 40, (*system, 3000, 4000, 4500, 4600))
    assert policy.candidates(first) == policy.candidates(later)
    # A prompt that is all hot prefix keys on its own id.
    assert policy.key(req("x", 12, system)) != policy.key(req("y", 12, system))


def test_one_long_conversation_is_not_a_hot_prefix() -> None:
    from splitserve.router.policies import HotPrefixes

    hot = HotPrefixes(window=100, share=0.05, min_count=8, min_fanout=4)
    history: tuple[int, ...] = (1,)
    for turn in range(30):  # each turn repeats the last and adds two blocks
        hot.observe(history)
        history = (*history, 100 + 2 * turn, 101 + 2 * turn)
    assert hot.hot_depth(history) == 0  # shared by many requests, but continued one way
    hot.observe((1, 555))
    hot.observe((1, 556))
    hot.observe((1, 557))
    assert hot.hot_depth((1, 999)) == 1  # block 1 now fans out four ways
