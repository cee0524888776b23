"""The CPU reference shares per-step derived tensors between layers, never across changed metadata."""

from __future__ import annotations

import torch

from splitserve.kernels import reference as R


def _naive_decode(q, cache, tables, ctx, scale, window=None):  # one sequence at a time
    out = torch.zeros_like(q)
    nkv = cache.shape[3]
    group = q.shape[1] // nkv
    for i, n in enumerate(ctx.tolist()):
        blocks = tables[i, : -(-n // cache.shape[2])].long()
        lo = 0 if window is None else max(0, n - window)  # keys in (n - 1 - window, n - 1]
        k = cache[0][blocks].reshape(-1, nkv, q.shape[2])[lo:n]
        v = cache[1][blocks].reshape(-1, nkv, q.shape[2])[lo:n]
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


def test_rotary_of_adjacent_q_and_k_views_is_one_pass_with_the_same_values() -> None:
    """Views of one fused qkv output are rotated as one strided tensor of heads: the same
    values as rotating copies of q and k apart (partial rotary too), and the inputs are
    left untouched."""
    g = torch.Generator().manual_seed(1)
    for head_dim, rotary_dim in ((32, 32), (32, 16)):
        qkv = torch.randn(7, (4 + 2 + 2) * head_dim, generator=g)
        before = qkv.clone()
        q = qkv[:, : 4 * head_dim].view(7, 4, head_dim)
        k = qkv[:, 4 * head_dim : 6 * head_dim].view(7, 2, head_dim)
        assert R._adjacent_heads(q, k)
        assert not R._adjacent_heads(q.clone(), k) and not R._adjacent_heads(k, q)
        table = R.rope_cos_sin_cache(head_dim, 64, 10000.0, None, rotary_dim)
        pos = torch.tensor([0, 3, 9, 10, 11, 40, 63])
        got_q, got_k = R.rotary_embedding(pos, q, k, table)
        want_q, want_k = R.rotary_embedding(pos.clone(), q.clone(), k.clone(), table)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        assert got_q.shape == q.shape and got_k.shape == k.shape
        assert torch.equal(qkv, before)


def test_store_kv_plan_follows_in_place_changes_of_the_slots() -> None:
    """The per-step slot plan (padding rows dropped, block and offset of each slot) is keyed
    by the slots' content: a changed slot mapping stores where it now says."""
    pool = torch.zeros(6, 3, 2, 4, 2, 8)  # block-major [blocks, layers, 2, bs, kv, hd]
    cache = pool[:, 1].transpose(0, 1)  # layer 1: [2, blocks, bs, kv, hd], strided blocks
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([5, -1, 17])
    R.store_kv(key, value, cache, slots)
    assert torch.equal(cache[0, 1, 1], key[0]) and torch.equal(cache[1, 4, 1], value[2])
    slots[:] = torch.tensor([2, 8, -1])  # in place, as a reused buffer would be
    R.store_kv(key * 2, value * 2, cache, slots)
    assert torch.equal(cache[0, 0, 2], key[0] * 2) and torch.equal(cache[1, 2, 0], value[1] * 2)
    assert torch.equal(cache[0, 1, 1], key[0])  # the first step's rows stay where they were
    assert int((pool[:, [0, 2]] != 0).sum()) == 0  # other layers untouched


def test_windowed_decode_gathers_only_the_window() -> None:
    """A windowed layer's long sequences gather the window's blocks only (one group, one
    length whatever the context): equal to plain softmax over the window, for windows that
    start at any offset in a block, contexts around the switch-over, and another batch."""
    g = torch.Generator().manual_seed(1)
    bs, window = 16, 24  # span: 3 blocks
    cache = torch.randn(2, 100, bs, 2, 32, generator=g)
    q = torch.randn(7, 4, 32, generator=g)
    ctx = torch.tensor([1, 30, 32, 33, 47, 130, 200], dtype=torch.int32)
    tables = torch.randperm(99, generator=g)[: 7 * 13].view(7, 13).int() + 1
    plan = R._decode_plan(tables, ctx, bs, window)
    long = next(p for p in plan if p.length == 3 * bs)  # one group for every long context
    assert sorted(long.rows.tolist()) == [3, 4, 5, 6]
    out = R.paged_decode_attention(q, cache, tables, ctx, 0.2, window)
    torch.testing.assert_close(out, _naive_decode(q, cache, tables, ctx, 0.2, window))
    # a block before the window holds garbage (freed and reused): never read
    junk = cache.clone()
    junk[:, tables[6, 0].long()] = float("nan")
    assert not R.paged_decode_attention(q, junk, tables, ctx, 0.2, window).isnan().any()
    # batch invariance: each sequence alone gives its row of the batch, bit for bit
    for i in range(7):
        alone = R.paged_decode_attention(q[i:i + 1], cache, tables[i:i + 1], ctx[i:i + 1],
                                         0.2, window)
        assert torch.equal(alone[0], out[i])


def test_alternating_layers_keep_their_plans() -> None:
    """Windowed and global layers (and two rotary tables) alternate within a step: each
    keeps its own per-step plan instead of rebuilding it every layer."""
    calls = []
    real = R._decode_plan

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    cache = torch.randn(2, 20, 16, 2, 32)
    q = torch.randn(2, 4, 32)
    tables = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], dtype=torch.int32)
    ctx = torch.tensor([90, 70], dtype=torch.int32)
    R._decode_plan = counting
    try:
        for _layer in range(4):
            R.paged_decode_attention(q, cache, tables, ctx, 0.2, 24)
            R.paged_decode_attention(q, cache, tables, ctx, 0.2, None)
    finally:
        R._decode_plan = real
    assert sorted(calls, key=str) == [24, None]
