"""Sampler: draws follow the distribution (after temperature, top-k, top-p, min-p), tokens of
probability zero never come out, and a draw depends only on (seed, position)."""

from __future__ import annotations

import math

import torch

from splitserve.roles.engine.sampler import SampleRequest, sample
from splitserve.sampling_params import SamplingParams

PROBS = [0.5, 0.25, 0.15, 0.1, 0.0]


def _draws(params: SamplingParams, probs: list[float], n: int = 4000, seed: int = 11) -> list[int]:
    logits = torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs]).repeat(n, 1)
    rows = [SampleRequest(params, seed, position) for position in range(n)]
    return [r.token_id for r in sample(logits, rows)]


def test_frequencies_match_the_distribution() -> None:
    n = 4000
    draws = _draws(SamplingParams(temperature=1.0), PROBS, n)
    for token, p in enumerate(PROBS):
        freq = draws.count(token) / n
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(freq - p) <= 4 * sigma + 1e-9, (token, freq, p)
    assert draws.count(4) == 0  # probability zero: never


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2), PROBS, 500)) == {0, 1}
    # top_p=0.7: 0.5 + 0.25 reaches it, so tokens 0 and 1 only
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.7), PROBS, 500)) == {0, 1}
    # min_p=0.25: tokens below 0.25 * 0.5 go
    assert set(_draws(SamplingParams(temperature=1.0, min_p=0.25), PROBS, 500)) == {0, 1, 2}


def test_a_draw_depends_only_on_seed_and_position() -> None:
    params = SamplingParams(temperature=0.9)
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    rows = [SampleRequest(params, 5, 17), SampleRequest(params, 5, 18), SampleRequest(params, 6, 17)]
    first = [r.token_id for r in sample(logits, rows)]
    # the same rows alone, in another order and batch, draw the same tokens
    again = [sample(logits[i : i + 1], [rows[i]])[0].token_id for i in (2, 0, 1)]
    assert first == [again[1], again[2], again[0]]


def test_low_temperature_concentrates_on_the_mode() -> None:
    draws = _draws(SamplingParams(temperature=0.05), PROBS, 300)
    assert draws.count(0) == 300


def _top_p_by_full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition: sort everything, keep tokens whose strictly-better mass is < top_p."""
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(before >= top_p, 0.0))


def test_top_p_keeps_exactly_what_a_full_sort_keeps() -> None:
    """The sampler orders only the head of the distribution (growing it while the mass is
    short of top_p); peaked and flat distributions over a real vocabulary's size, where a
    flat one needs the head grown past its first try, keep exactly the full sort's set."""
    from splitserve.roles.engine import sampler

    g = torch.Generator().manual_seed(3)
    grown = 0
    for vocab in (7, 300, 49152):
        for scale in (0.2, 1.0, 4.0, 20.0):
            for top_p in (0.3, 0.9, 0.95, 0.9999):
                probs = torch.softmax(torch.randn(vocab, generator=g) * scale, dim=-1)
                want = _top_p_by_full_sort(probs, top_p)
                assert torch.equal(sampler._top_p(probs, top_p), want), (vocab, scale, top_p)
                grown += int((want > 0).sum()) > sampler._TOP_P_FIRST_K
    assert grown >= 3  # the growth path ran, not only the first try
