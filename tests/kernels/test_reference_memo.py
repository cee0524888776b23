"""The CPU reference shares per-step derived tensors between layers, never across changed metadata."""

from __future__ import annotations

import torch

from splitserve.kernels import reference as R


def _naive_decode(q, cache, tables, ctx, scale):  # one sequence at a time, plain softmax
    out = torch.zeros_like(q)
    nkv = cache.shape[3]
    group = q.shape[1] // nkv
    for i, n in enumerate(ctx.tolist()):
        blocks = tables[i, : -(-n // cache.shape[2])].long()
        k = cache[0][blocks].reshape(-1, nkv, q.shape[2])[:n]
        v = cache[1][blocks].reshape(-1, nkv, q.shape[2])[:n]
        for h in range(q.shape[1]):
            p = torch.softmax((k[:, h // group] @ q[i, h]) * scale, 0)
            out[i, h] = p @ v[:, h // group]
    return out


def test_decode_plan_follows_in_place_changes_of_the_metadata() -> None:
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 40, 16, 2, 32, generator=g)
    q = torch.randn(3, 4, 32, generator=g)
    tables = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 13, 14], [9, 10, 11, 12, 0, 0]],
                          dtype=torch.int32)
    ctx = torch.tensor([50, 17, 64], dtype=torch.int32)
    first = R.paged_decode_attention(q, cache, tables, ctx, 0.2)
    torch.testing.assert_close(first, _naive_decode(q, cache, tables, ctx, 0.2))
    # same tensors, changed in place (another step reusing the buffers): a fresh plan
    tables[0, :4] = torch.tensor([20, 21, 22, 23], dtype=torch.int32)
    ctx[1] = 90  # moves sequence 1 to another padded length (128)
    second = R.paged_decode_attention(q, cache, tables, ctx, 0.2)
    torch.testing.assert_close(second, _naive_decode(q, cache, tables, ctx, 0.2))
    # another cache (block size 32): planned for its own block size
    cache32 = cache.view(2, 20, 32, 2, 32)
    tables32 = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    ctx = torch.tensor([50, 17, 64], dtype=torch.int32)
    third = R.paged_decode_attention(q, cache32, tables32, ctx, 0.2)
    torch.testing.assert_close(third, _naive_decode(q, cache32, tables32, ctx, 0.2))


def test_rotary_tables_follow_positions_and_cache() -> None:
    q = torch.randn(5, 4, 16)
    k = torch.randn(5, 2, 16)
    pos = torch.arange(5)
    plain = R.rope_cos_sin_cache(16, 64, 10000.0)
    scaled = R.rope_cos_sin_cache(16, 64, 10000.0, {"rope_type": "linear", "factor": 4.0})
    a = R.rotary_embedding(pos, q, k, plain)
    b = R.rotary_embedding(pos, q, k, scaled)  # equal positions, another table: recomputed
    assert not torch.equal(a[0], b[0])
    pos[:] = torch.tensor([9, 8, 7, 6, 5])  # changed in place: recomputed
    c = R.rotary_embedding(pos, q, k, plain)
    d = R.rotary_embedding(pos.clone(), q, k, R.rope_cos_sin_cache(16, 64, 10000.0))
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    assert not torch.equal(a[0], c[0])
