"""PrefixIndex: exact matches from KV events; model-based property test of joins and leaves."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.router.prefix_index import PrefixIndex


def test_match_is_longest_leading_run_per_instance() -> None:
    index = PrefixIndex()
    index.apply_stored("a", [1, 2, 3])
    index.apply_stored("b", [1, 2])
    index.apply_stored("c", [2, 3])  # holds later blocks but not the first: no match
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.match([9, 2]) == {}
    assert index.match([]) == {}
    assert index.matched_blocks("a", [1, 2, 3, 4]) == 3
    assert index.matched_blocks("c", [1, 2, 3]) == 0


def test_removed_block_cuts_the_match_there() -> None:
    index = PrefixIndex()
    index.apply_stored("a", [1, 2, 3, 4])
    index.apply_removed("a", [2])
    assert index.match([1, 2, 3, 4]) == {"a": 1}
    assert index.holders(2) == frozenset()
    assert index.holders(3) == {"a"}


def test_events_are_idempotent_and_removal_forgets_everything() -> None:
    index = PrefixIndex()
    index.apply_stored("a", [1, 2])
    index.apply_stored("a", [1, 2])
    index.apply_removed("a", [7])  # never held: no-op
    index.apply_removed("zz", [1])  # unknown instance: no-op
    index.apply_stored("b", [1])
    assert len(index) == 2 and index.num_blocks_of("a") == 2
    assert index.remove_instance("a") == 2
    assert index.holders(1) == {"b"} and index.holders(2) == frozenset()
    assert len(index) == 1 and "a" not in index.instances


events = st.lists(
    st.tuples(
        st.sampled_from(["stored", "removed", "leave"]),
        st.integers(0, 4),
        st.lists(st.integers(0, 15), max_size=6),
    ),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(events=events)
def test_index_matches_a_plain_model_under_any_events(
    events: list[tuple[str, int, list[int]]],
) -> None:
    index, model = PrefixIndex(), {}
    for kind, i, blocks in events:
        name = f"i{i}"
        if kind == "stored":
            index.apply_stored(name, blocks)
            model.setdefault(name, set()).update(blocks)
        elif kind == "removed":
            index.apply_removed(name, blocks)
            if name in model:
                model[name].difference_update(blocks)
        else:
            index.remove_instance(name)
            model.pop(name, None)
        for name, held in model.items():
            assert index.blocks_of(name) == held
        for block in range(16):
            expected = {n for n, held in model.items() if block in held}
            assert index.holders(block) == expected  # no holder lost or duplicated
        assert len(index) == len(set().union(*model.values()) if model else set())
    query = list(range(6))
    expected_match = {}
    for name, held in model.items():
        n = 0
        while n < len(query) and query[n] in held:
            n += 1
        if n:
            expected_match[name] = n
    assert index.match(query) == expected_match


def test_pending_prefixes_count_as_held_until_removed() -> None:
    from splitserve.router.prefix_index import PendingPrefixes, match_with_pending

    index, pending = PrefixIndex(), PendingPrefixes()
    index.apply_stored("a", [1, 2])
    pending.add("r1", "a", [1, 2, 3, 4])  # a will also hold 3 and 4 once r1 is prefilled
    pending.add("r2", "b", [1, 2, 3])
    pending.add("r3", "b", [1, 2])  # refcounted: r3 leaving keeps r2's blocks
    assert match_with_pending(index, pending, [1, 2, 3, 4, 5]) == {"a": 4, "b": 3}
    pending.remove("r3")
    assert match_with_pending(index, pending, [1, 2, 3]) == {"a": 3, "b": 3}
    pending.move("r2", "c")
    assert match_with_pending(index, pending, [1, 2, 3]) == {"a": 3, "c": 3}
    pending.remove("r1")
    pending.remove("r2")
    pending.remove("r2")  # idempotent
    assert match_with_pending(index, pending, [1, 2, 3]) == index.match([1, 2, 3]) == {"a": 2}
    assert len(pending) == 0 and pending.holders(1) is None
