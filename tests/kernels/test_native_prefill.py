"""native.prefill_attention: a prompt chunk's attention with each query row run as a decode
row of its own. It equals the reference, gives every row the decode kernel's bits for that
token, keeps a sequence's result independent of its batch, sends long spans to the
reference, and refuses bad tables by name before computing anything."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import native, reference
from splitserve.kernels.checks import KernelInputError


def _case(chunks: list[tuple[int, int]], heads=(4, 2), head_dim=32, block_size=16,
          dtype=torch.float32, seed=0):
    """chunks: (cached prefix, chunk length) per sequence; blocks shuffled over the pool."""
    g = torch.Generator().manual_seed(seed)
    nh, kvh = heads
    ctxs = [p + n for p, n in chunks]
    max_blocks = max(-(-c // block_size) for c in ctxs)
    num_blocks = max_blocks * len(chunks) + 3
    cache = torch.randn(2, num_blocks, block_size, kvh, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[: max_blocks * len(chunks)]
    tables = perm.reshape(len(chunks), max_blocks).to(torch.int32)
    lens = [n for _, n in chunks]
    starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]), nh, head_dim, generator=g).to(dtype)
    return q, cache, tables, starts, torch.tensor(ctxs, dtype=torch.int32)


CASES = [  # chunks, heads, head_dim, dtype, window, soft cap
    ([(0, 70), (0, 1), (20, 33), (100, 40)], (4, 2), 32, torch.float32, None, None),
    ([(0, 64), (5, 50)], (4, 2), 16, torch.float32, 24, None),
    ([(0, 90), (30, 17)], (6, 2), 64, torch.bfloat16, None, 20.0),
    ([(0, 40), (200, 56)], (8, 8), 32, torch.float32, 100, None),
]


@pytest.fixture(autouse=True)
def _built() -> None:
    assert native.status().available, native.status().reason  # the suite installs gcc


@pytest.mark.parametrize("chunks,heads,head_dim,dtype,window,cap", CASES)
def test_equals_the_reference_and_each_row_is_a_decode_row(chunks, heads, head_dim, dtype,
                                                           window, cap) -> None:
    q, cache, tables, starts, ctx = _case(chunks, heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    before = native.calls["paged_prefill_attention"]
    got = native.prefill_attention(q, cache, tables, starts, ctx, scale, window, cap)
    assert native.calls["paged_prefill_attention"] == before + 1
    want = reference.prefill_attention(q, cache, tables, starts, ctx, scale, window, cap)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for s, (prefix, n) in enumerate(chunks):  # the mechanism: a decode step of that token
        for i in range(n):  # every row, whichever place it has in its tile of 16
            row = int(starts[s]) + i
            one = native.paged_decode_attention(q[row:row + 1], cache, tables[s:s + 1],
                                                torch.tensor([prefix + i + 1], dtype=torch.int32),
                                                scale, window, cap)
            assert torch.equal(one[0], got[row]), (s, i)


def test_a_sequences_rows_do_not_depend_on_its_batch() -> None:
    chunks = [(0, 70), (10, 30), (0, 5)]
    q, cache, tables, starts, ctx = _case(chunks)
    whole = native.prefill_attention(q, cache, tables, starts, ctx, 0.2, 24)
    lo, hi = int(starts[1]), int(starts[2])
    alone = native.prefill_attention(q[lo:hi], cache, tables[1:2],
                                     torch.tensor([0, hi - lo], dtype=torch.int32), ctx[1:2], 0.2, 24)
    assert torch.equal(alone, whole[lo:hi])


def test_long_spans_take_the_reference() -> None:
    long = native.PREFILL_NATIVE_MAX_SPAN + 40
    chunks = [(0, 30), (long - 64, 64)]
    q, cache, tables, starts, ctx = _case(chunks)
    got = native.prefill_attention(q, cache, tables, starts, ctx, 0.2)
    want = reference.prefill_attention(q, cache, tables, starts, ctx, 0.2)
    assert torch.equal(got[30:], want[30:])  # the same reference code ran for it
    torch.testing.assert_close(got[:30], want[:30], rtol=2e-5, atol=2e-5)
    # under a short window the long sequence's span is short: native for both
    before = native.calls["paged_prefill_attention"]
    windowed = native.prefill_attention(q, cache, tables, starts, ctx, 0.2, 32)
    assert native.calls["paged_prefill_attention"] == before + 1
    torch.testing.assert_close(windowed, reference.prefill_attention(q, cache, tables, starts,
                                                                     ctx, 0.2, 32),
                               rtol=2e-5, atol=2e-5)


def test_bad_input_is_named_before_anything_is_computed() -> None:
    q, cache, tables, starts, ctx = _case([(0, 20), (10, 20)])
    bad = tables.clone()
    bad[1, 1] = cache.shape[1]
    with pytest.raises(KernelInputError, match=r"block_tables\[1, 1\] = \d+ points past the cache"):
        native.prefill_attention(q, cache, bad, starts, ctx, 0.2)
    with pytest.raises(KernelInputError, match=r"context_lens\[0\] = 1000 is outside"):
        native.prefill_attention(q, cache, tables, starts, torch.tensor([1000, 30], dtype=torch.int32), 0.2)
    with pytest.raises(KernelInputError, match=r"chunk of 20 query rows is longer than context_lens\[0\] = 5"):
        native.prefill_attention(q, cache, tables, starts, torch.tensor([5, 30], dtype=torch.int32), 0.2)
    with pytest.raises(KernelInputError, match="query_start_loc must rise"):
        native.prefill_attention(q, cache, tables, torch.tensor([0, 30, 20], dtype=torch.int32), ctx, 0.2)
