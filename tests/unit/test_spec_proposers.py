"""Draft-free proposers and the suffix trie, with exact expected drafts; the speculator's policy."""

from __future__ import annotations

import pytest

from splitserve.roles.engine.proposer import NgramProposer, SuffixProposer, create_proposer
from splitserve.roles.engine.rejection_sampler import num_accepted
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.speculative import SpeculativeConfig, Speculator
from splitserve.roles.engine.suffix_tree import SuffixTrie
from splitserve.sampling_params import SamplingParams


def _req(tokens: list[int], rid: str = "r", num_prompt: int | None = None, max_tokens: int = 100) -> Request:
    n = len(tokens) if num_prompt is None else num_prompt
    return Request(rid, tokens[:n], SamplingParams(), seed=0, max_tokens=max_tokens,
                   output_token_ids=tokens[n:])


# ---------------------------------------------------------------------------- n-gram


def test_ngram_copies_after_the_latest_earlier_occurrence() -> None:
    p = NgramProposer(min_n=2, max_n=3)
    #            0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    # suffix [1, 2, 3] occurs at 0 and 5; the latest (5) is followed by 4, 5, 1
    assert p.propose(_req(tokens), 3) == [4, 5, 1]
    assert p.propose(_req(tokens), 10) == [4, 5, 1, 2, 3]  # never past the sequence


def test_ngram_falls_back_to_shorter_ngrams_and_respects_min() -> None:
    p = NgramProposer(min_n=2, max_n=4)
    assert p.propose(_req([7, 8, 5, 6, 1, 7, 8]), 2) == [5, 6]  # only the 2-gram [7, 8] recurs
    assert p.propose(_req([7, 5, 6, 1, 7]), 2, ) == []  # a 1-gram is below min_n
    assert NgramProposer(1, 2).propose(_req([7, 5, 6, 1, 7], "x"), 2) == [5, 6]


def test_ngram_follows_a_growing_request_incrementally() -> None:
    p = NgramProposer(min_n=2, max_n=2)
    req = _req([1, 2, 3, 4], num_prompt=4)
    assert p.propose(req, 2) == []
    for t in (1, 2):
        req.append_token(t)
    assert p.propose(req, 2) == [3, 4]
    req.truncate(4)  # tokens taken back: the index starts over
    assert p.propose(req, 2) == []
    p.finish(req)
    assert not p._arrays


# ---------------------------------------------------------------------------- suffix trie


def test_trie_counts_substrings_and_removal_restores_it() -> None:
    trie = SuffixTrie(max_depth=3)
    trie.extend("a", [1, 2, 1, 2])
    assert trie.root.children[1].count == 2
    assert trie.root.children[1].children[2].count == 2
    assert trie.root.children[2].children[1].count == 1
    assert 3 not in trie.root.children[1].children[2].children[1].children  # depth capped
    trie.extend("b", [1, 2])
    assert trie.root.children[1].children[2].count == 3
    trie.remove("a")
    trie.remove("b")
    assert trie.root.children == {} and len(trie) == 0


def test_trie_speculates_the_most_frequent_continuation_with_a_probability_floor() -> None:
    trie = SuffixTrie(max_depth=8)
    trie.extend(0, [5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7, 8])
    draft = trie.speculate([1, 5, 6], max_tokens=4, max_match=4, spec_factor=2.0, min_prob=0.1)
    assert draft.match_len == 2  # [5, 6] occurs, [1, 5, 6] does not
    assert draft.token_ids == (7, 8, 5, 6)  # 7 always follows; then 8 (2 of 3) over 9
    assert draft.probs[:2] == (1.0, pytest.approx(2 / 3))
    # a short match earns a short draft (spec_factor * match_len)
    short = trie.speculate([1, 5, 6], max_tokens=4, max_match=4, spec_factor=1.0, min_prob=0.1)
    assert short.token_ids == (7, 8)
    # the floor cuts where the estimated probability falls below it
    cut = trie.speculate([5, 6], max_tokens=4, max_match=4, spec_factor=2.0, min_prob=0.7)
    assert cut.token_ids == (7,)
    assert trie.speculate([4], 4, 4, 1.0, 0.1).token_ids == ()


def test_suffix_proposer_uses_the_request_and_recent_outputs() -> None:
    p = SuffixProposer(max_depth=12, max_cached_requests=1, spec_factor=1.0,
                       min_token_prob=0.1, max_spec_tokens=4)
    done = _req([100, 101, 1, 2, 3, 4, 5, 6], "done", num_prompt=2)
    p.finish(done)  # its output [1..6] joins the global trie
    assert p.propose(_req([50, 1, 2, 3], "new"), 4) == [4, 5, 6]  # from another request's output
    assert p.propose(_req([9, 8, 7, 9, 8], "own"), 4) == [7, 9]  # from its own prompt
    p.finish(_req([200, 30, 31], "later", num_prompt=1))  # evicts "done" (max 1 cached)
    assert p.propose(_req([50, 1, 2, 3], "again"), 4) == []
    assert len(p.global_trie) == 1


# ---------------------------------------------------------------------------- speculator


def test_speculator_never_drafts_past_max_tokens_and_counts() -> None:
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1,
                            adaptive=False)
    spec = Speculator(cfg)
    req = _req([1, 2, 3, 4, 5, 6, 1, 2], num_prompt=7, max_tokens=3)  # 1 output of 3
    assert spec.draft(req, room=10, batch_size=1) == [3]  # 2 tokens left: 1 draft + 1 more
    assert spec.draft(req, room=0, batch_size=1) == []  # no budget left
    spec.record("r", 4, 2)
    spec.record("r", 4, 4)
    s = spec.stats
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (2, 8, 6)
    assert s.acceptance_rate == 0.75 and s.mean_accepted_length == 4.0
    assert s.accepted_per_position == [2, 2, 1, 1]


def test_speculator_turns_down_on_low_acceptance_and_large_batches() -> None:
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=5, prompt_lookup_min=1)
    spec = Speculator(cfg)
    req = _req([1, 2, 3, 4, 5, 6, 7, 8, 1])
    assert len(spec.draft(req, 10, batch_size=1)) == 5  # a good prior: full length
    assert spec.draft(req, 10, batch_size=64) == []  # too costly in a big batch
    for _ in range(10):
        spec.record("r", 5, 0)
    assert spec.draft(req, 10, batch_size=1) == []  # acceptance sank: speculation off
    off = 0
    while not spec.draft(req, 10, batch_size=1):  # ... and is tried again later
        off += 1
    assert 0 < off < 200
    capped = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=5,
                                          prompt_lookup_min=1, disable_by_batch_size=4))
    assert capped.draft(req, 10, batch_size=4) == [] and capped.draft(req, 10, batch_size=3)


def test_rejection_sampler_keeps_the_agreeing_prefix() -> None:
    assert num_accepted([5, 6, 7], [5, 6, 7, 8]) == 3
    assert num_accepted([5, 6, 7], [5, 9, 7, 8]) == 1
    assert num_accepted([5], [4, 4]) == 0


def test_create_proposer_by_method() -> None:
    assert isinstance(create_proposer(SpeculativeConfig("ngram", 3)), NgramProposer)
    suffix = create_proposer(SpeculativeConfig("suffix", 3, suffix_decoding_max_tree_depth=10))
    assert isinstance(suffix, SuffixProposer) and suffix.max_match == 7
