"""Consistent-hash rings: independence of the two hashes, stability, remapping, properties."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.router.hash_ring import RING_SEEDS, DualHashRing, HashRing

KEYS = [k * 0x9E3779B97F4A7C15 % 2**64 for k in range(10_000)]
PROBES = (0, 1, 12345, 2**63 + 7, 2**64 - 1)


def members(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def reference_owner(seed: int, virtual_nodes: int, names: list[str], key: int) -> str:
    """The ring's definition, computed from scratch: each member's virtual node ``v`` sits at
    xxh64("<id>#<v>", seed); a key (8 bytes, little-endian) at xxh64(key, seed) belongs to
    the first point strictly clockwise of it, wrapping past 2**64."""
    points = sorted(
        (xxhash.xxh64_intdigest(f"{n}#{v}".encode(), seed=seed), n)
        for n in names for v in range(virtual_nodes)
    )
    position = xxhash.xxh64_intdigest(key.to_bytes(8, "little"), seed=seed)
    after = [(p, n) for p, n in points if p > position]
    return (after or points)[0][1]


def reference_candidates(names: list[str], key: int) -> tuple[str, str]:
    """DualMap's pair: the ring-0 owner, and the ring-1 owner or, when that is the same
    instance, the next distinct one clockwise on ring 1."""
    first = reference_owner(RING_SEEDS[0], 160, names, key)
    second = reference_owner(RING_SEEDS[1], 160, names, key)
    if second == first:
        second = reference_owner(RING_SEEDS[1], 160, [n for n in names if n != first], key)
    return first, second


@pytest.mark.parametrize("key", PROBES)
def test_candidates_follow_the_ring_definition(key: int) -> None:
    names = members(8)
    assert DualHashRing(160, names).candidates(key) == reference_candidates(names, key)


def test_candidates_are_stable_across_processes() -> None:
    code = (
        "from splitserve.router.hash_ring import DualHashRing\n"
        "r = DualHashRing(160, [f'p{i}' for i in range(8)])\n"
        f"print([r.candidates(k) for k in {PROBES!r}])\n"
    )
    rings = DualHashRing(160, members(8))
    here = str([rings.candidates(k) for k in PROBES])
    for hash_seed in ("1", "12345"):  # Python's own hash() must play no part
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == here


def test_two_rings_hash_independently() -> None:
    rings = DualHashRing(160, members(32))
    first = [rings.rings[0].lookup(k) for k in KEYS]
    second = [rings.rings[1].lookup(k) for k in KEYS]
    assert RING_SEEDS[0] != RING_SEEDS[1]
    assert rings.rings[0].key_position(7) != rings.rings[1].key_position(7)
    # Independent: the two owners agree about 1/N of the time (312 of 10,000 for N=32) ...
    same = sum(a == b for a, b in zip(first, second, strict=True))
    assert 200 <= same <= 450
    # ... and knowing the ring-0 owner says nothing about the ring-1 owner.
    given_p0 = Counter(b for a, b in zip(first, second, strict=True) if a == "p0")
    assert len(given_p0) >= 28
    assert max(given_p0.values()) <= 4 * sum(given_p0.values()) / 32


def test_candidates_are_two_distinct_instances() -> None:
    rings = DualHashRing(160, members(32))
    pairs = [rings.candidates(k) for k in KEYS]
    assert all(len(p) == 2 and p[0] != p[1] for p in pairs)
    assert DualHashRing(160, ["only"]).candidates(5) == ("only",)


def remapped_fraction(before: HashRing, after: HashRing) -> float:
    return sum(before.lookup(k) != after.lookup(k) for k in KEYS) / len(KEYS)


@pytest.mark.parametrize("seed", RING_SEEDS)
def test_scale_out_by_one_remaps_at_most_1_25_over_n(seed: int) -> None:
    n = 32
    before = HashRing(seed, 160, members(n))
    after = HashRing(seed, 160, members(n + 1))
    moved = [k for k in KEYS if before.lookup(k) != after.lookup(k)]
    assert len(moved) / len(KEYS) <= 1.25 / n
    assert all(after.lookup(k) == f"p{n}" for k in moved)  # only keys the newcomer takes
    assert len(moved) > 0.5 / n * len(KEYS)


@pytest.mark.parametrize("seed", RING_SEEDS)
def test_scale_in_by_one_remaps_only_the_leavers_keys(seed: int) -> None:
    n = 32
    before = HashRing(seed, 160, members(n))
    after = HashRing(seed, 160, members(n))
    after.remove("p5")
    moved = [k for k in KEYS if before.lookup(k) != after.lookup(k)]
    assert all(before.lookup(k) == "p5" for k in moved)
    assert len(moved) / len(KEYS) <= 1.25 / n


def test_dual_ring_candidate_pairs_change_for_at_most_2_5_over_n() -> None:
    n = 32
    before, after = DualHashRing(160, members(n)), DualHashRing(160, members(n + 1))
    changed = sum(before.candidates(k) != after.candidates(k) for k in KEYS)
    lost_both = sum(not set(before.candidates(k)) & set(after.candidates(k)) for k in KEYS)
    assert changed / len(KEYS) <= 2.5 / n
    assert lost_both == 0  # a key always keeps at least one of its old candidates


def test_ring_errors() -> None:
    ring = HashRing(1, 4)
    with pytest.raises(LookupError, match="no instances"):
        ring.lookup(1)
    ring.add("a")
    with pytest.raises(ValueError, match="already on the ring"):
        ring.add("a")
    with pytest.raises(ValueError, match="not on the ring"):
        ring.remove("b")
    with pytest.raises(ValueError, match="different seeds"):
        DualHashRing(4, seeds=(3, 3))
    with pytest.raises(ValueError, match="virtual_nodes"):
        HashRing(1, 0)


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 11)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=ops, keys=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=30))
def test_ring_joins_and_leaves_lose_and_duplicate_no_key(
    ops: list[tuple[bool, int]], keys: list[int]
) -> None:
    ring, live = HashRing(RING_SEEDS[0], 8), set()
    for join, i in ops:
        name = f"i{i}"
        if join and name not in live:
            ring.add(name)
            live.add(name)
        elif not join and name in live:
            ring.remove(name)
            live.discard(name)
        assert ring.members == live
        assert len(ring._points) == 8 * len(live) == len(ring._owners)
        assert ring._points == sorted(ring._points)
    if not live:
        return
    fresh = HashRing(RING_SEEDS[0], 8, sorted(live))  # history-independent
    for key in keys:
        owner = ring.lookup(key)
        assert owner in live
        assert owner == fresh.lookup(key)
        walk = list(ring.walk(key))
        assert walk[0] == owner and sorted(walk) == sorted(live)  # each member once
