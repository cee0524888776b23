"""The native per-layer ops (native/layer_ops.c): RMSNorm with its fused residual and the
(q/k norm +) rotary + K/V store step, against the torch references and float64 math; rows and
tokens independent of their batch and of the thread count; bad positions and slots refused
before anything is written; operands the kernels do not take left to the reference."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import native, reference
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.kv_cache import allocate_kv_caches

pytestmark = pytest.mark.skipif(not native.status().available,
                                reason="needs a C compiler (make setup installs gcc)")

DTYPES = [torch.float32, torch.bfloat16]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance relative to the larger magnitude, in units of the dtype's eps
    (1 ulp is 0.5-1 of these)."""
    eps = torch.finfo(a.dtype).eps
    scale = torch.maximum(a.float().abs(), b.float().abs()).clamp(min=1e-30)
    return (a.float() - b.float()).abs() / (scale * eps)


def _exact_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


# --------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 72), (16, 576), (300, 100), (2048, 64)])
def test_rms_norm_matches_the_reference(dtype: torch.dtype, rows: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(rows + hidden)
    wide = (torch.randn(rows, hidden + 24, generator=g) * 3).to(dtype)
    x = wide[:, 5 : 5 + hidden]  # strided rows: a column slice of a wider tensor
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    for residual in (None, res):
        before = native.calls["rms_norm"]
        got, got_res = native.rms_norm(x, w, 1e-6, residual)
        assert native.calls["rms_norm"] == before + 1  # the C kernel ran
        want, want_res = reference.rms_norm(x, w, 1e-6, residual)
        assert got.dtype == dtype and got.shape == (rows, hidden)
        if residual is None:
            assert got_res is None
        else:  # x + residual, one rounding: the same bits as torch's add
            assert got_res is not None and want_res is not None
            assert torch.equal(got_res, want_res)
        # only the mean's summation order differs: a few ulps at most (in units of eps)
        assert _ulps(got, want).max() <= 4, _ulps(got, want).max()
        exact = _exact_norm(want_res if residual is not None else x, w, 1e-6)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rows_do_not_depend_on_their_batch_or_threads(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 64, generator=g).to(dtype)  # big enough to run on the thread team
    w = torch.rand(64, generator=g).to(dtype)
    batch = native.rms_norm(x, w, 1e-5)[0]
    for i in (0, 999, 2047):
        assert torch.equal(native.rms_norm(x[i : i + 1], w, 1e-5)[0][0], batch[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.rms_norm(x, w, 1e-5)[0], batch)
    finally:
        torch.set_num_threads(threads)


def test_rms_norm_operands_it_does_not_take_go_to_the_reference() -> None:
    x16, w16 = torch.randn(4, 64, dtype=torch.float16), torch.rand(64, dtype=torch.float16)
    x, w = torch.randn(4, 64), torch.rand(64)
    before = native.calls["rms_norm"]
    for args in ((x16, w16), (x.t().contiguous().t(), w)):  # float16; a strided last dim
        got, _ = native.rms_norm(*args, 1e-6)
        assert torch.equal(got, reference.rms_norm(*args, 1e-6)[0])
    assert native.calls["rms_norm"] == before


# --------------------------------------------------------------------------- rotary + store


def _rope_case(dtype: torch.dtype, kv_dtype: torch.dtype, tokens: int, heads: tuple[int, int],
               head_dim: int, rotary_dim: int, seed: int = 0):  # type: ignore[no-untyped-def]
    nh, nkv = heads
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (nh + 2 * nkv) * head_dim, generator=g) * 2).to(dtype)
    q = qkv[:, : nh * head_dim].view(tokens, nh, head_dim)  # strided views, as in a layer
    k = qkv[:, nh * head_dim : (nh + nkv) * head_dim].view(tokens, nkv, head_dim)
    v = qkv[:, (nh + nkv) * head_dim :].view(tokens, nkv, head_dim)
    num_blocks, block_size = tokens // 8 + 8, 16
    cache = allocate_kv_caches(3, num_blocks, block_size, nkv, head_dim, kv_dtype, "cpu")[1]
    cache.copy_(torch.randn(cache.shape, generator=g).to(kv_dtype))
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[1::5] = -1  # padding rows: nothing stored
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    table = reference.rope_cos_sin_cache(head_dim, 4096, 10000.0, rotary_dim=rotary_dim)
    return q, k, v, cache, slots, positions, table


ROPE_CASES = [  # model dtype, cache dtype, tokens, (heads, kv heads), head_dim, rotary dims
    (torch.float32, torch.float32, 1, (9, 3), 64, 64),
    (torch.float32, torch.float32, 16, (4, 2), 32, 32),
    (torch.bfloat16, torch.bfloat16, 16, (9, 3), 64, 64),
    (torch.bfloat16, torch.bfloat16, 2048, (4, 2), 32, 32),  # the thread team
    (torch.float32, torch.float32, 40, (8, 8), 96, 48),  # partial rotary (Phi-3)
    (torch.float32, torch.bfloat16, 24, (4, 2), 64, 64),  # a bf16 cache under an fp32 model
    (torch.bfloat16, torch.float32, 24, (4, 2), 80, 80),
]


@pytest.mark.parametrize("dtype,kv_dtype,tokens,heads,head_dim,rotary_dim", ROPE_CASES)
def test_rotary_store_is_bit_identical_to_the_reference(  # type: ignore[no-untyped-def]
    dtype, kv_dtype, tokens, heads, head_dim, rotary_dim
) -> None:
    q, k, v, cache, slots, positions, table = _rope_case(
        dtype, kv_dtype, tokens, heads, head_dim, rotary_dim)
    ours, theirs = cache.clone(), cache.clone()
    before = native.calls["rotary_store_kv"]
    got = native.rotary_store_kv(positions, q, k, v, table, ours, slots)
    assert native.calls["rotary_store_kv"] == before + 1
    want = reference.rotary_store_kv(positions, q, k, v, table, theirs, slots)
    # same products, same sums, same roundings (no fused multiply-add): the same bits
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, cache)  # something was stored


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_store_with_qk_norms(dtype: torch.dtype) -> None:
    q, k, v, cache, slots, positions, table = _rope_case(dtype, dtype, 64, (8, 4), 64, 64, 5)
    g = torch.Generator().manual_seed(6)
    norms = ((torch.rand(64, generator=g) + 0.5).to(dtype),
             (torch.rand(64, generator=g) + 0.5).to(dtype), 1e-6)
    ours, theirs = cache.clone(), cache.clone()
    got = native.rotary_store_kv(positions, q, k, v, table, ours, slots, norms)
    want = reference.rotary_store_kv(positions, q, k, v, table, theirs, slots, norms)
    # the norm's mean may differ in its last bit (then a rotated sum of two products, which
    # can cancel, moves by as much in absolute terms); in bf16 the roundings mostly agree
    eps = torch.finfo(dtype).eps
    for a, b in ((got, want), (ours, theirs)):
        torch.testing.assert_close(a.float(), b.float(), atol=16 * eps, rtol=4 * eps)
    if dtype == torch.bfloat16:
        assert (got != want).float().mean() < 0.02
    # the values (not rotated) are copied exactly
    stored = slots >= 0
    bs = cache.shape[2]
    blocks, offsets = slots[stored] // bs, slots[stored] % bs
    assert torch.equal(ours[1][blocks, offsets], v[stored])


def test_rotary_store_tokens_do_not_depend_on_their_batch_or_threads() -> None:
    q, k, v, cache, slots, positions, table = _rope_case(
        torch.bfloat16, torch.bfloat16, 2048, (4, 2), 32, 32, 2)
    norms = (torch.rand(32).to(torch.bfloat16), torch.rand(32).to(torch.bfloat16), 1e-6)
    batch_cache = cache.clone()
    batch = native.rotary_store_kv(positions, q, k, v, table, batch_cache, slots, norms)
    one = cache.clone()
    for i in (0, 1001, 2047):
        alone = native.rotary_store_kv(positions[i : i + 1], q[i : i + 1], k[i : i + 1],
                                       v[i : i + 1], table, one, slots[i : i + 1], norms)
        assert torch.equal(alone[0], batch[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial_cache = cache.clone()
        serial = native.rotary_store_kv(positions, q, k, v, table, serial_cache, slots, norms)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, batch) and torch.equal(serial_cache, batch_cache)


def test_a_bad_position_or_slot_is_refused_before_anything_is_written() -> None:
    q, k, v, cache, slots, positions, table = _rope_case(
        torch.float32, torch.float32, 12, (4, 2), 32, 32, 4)
    before = cache.clone()
    bad = positions.clone()
    bad[7] = table.shape[0]
    with pytest.raises(KernelInputError, match=r"positions\[7\] = 4096 is outside"):
        native.rotary_store_kv(bad, q, k, v, table, cache, slots)
    bad = slots.clone()
    bad[9] = cache.shape[1] * cache.shape[2]
    with pytest.raises(KernelInputError, match=r"slot_mapping\[9\] = \d+ points past the cache"):
        native.rotary_store_kv(positions, q, k, v, table, cache, bad)
    assert torch.equal(cache, before)  # refused tokens come after good ones: none was stored


def test_rotary_store_operands_it_does_not_take_go_to_the_reference() -> None:
    q, k, v, cache, slots, positions, table = _rope_case(
        torch.float16, torch.float16, 8, (4, 2), 32, 32, 3)
    ours, theirs = cache.clone(), cache.clone()
    before = native.calls["rotary_store_kv"]
    got = native.rotary_store_kv(positions, q, k, v, table, ours, slots)
    assert native.calls["rotary_store_kv"] == before
    want = reference.rotary_store_kv(positions, q, k, v, table, theirs, slots)
    assert torch.equal(got, want) and torch.equal(ours, theirs)


# --------------------------------------------------------------------------- logits


def test_softcap_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 4101, generator=g) * 40  # past the clamp too (|x / cap| > 8)
    for cap in (30.0, 15.0, 0.5):
        before = native.calls["softcap"]
        got = native.softcap(x[:, 3:], cap)  # a strided view
        assert native.calls["softcap"] == before + 1
        want = reference.softcap(x[:, 3:], cap)
        # the rational tanh: relative error < 4e-7 against torch's (~1 ulp)
        torch.testing.assert_close(got, want, rtol=0, atol=cap * 5e-7)
    assert torch.equal(native.softcap(x.double(), 30.0), reference.softcap(x.double(), 30.0))


def test_argmax_rows_is_torchs_argmax() -> None:
    g = torch.Generator().manual_seed(9)
    for cols in (1, 7, 16, 33, 4096, 49152):
        x = torch.randn(9, cols + 5, generator=g)[:, 2 : 2 + cols]  # strided rows
        if cols > 3:
            x[1, :] = 1.0  # all tied: the first
            x[2, cols // 2] = x[2, cols - 1] = 99.0  # a tie at two places: the first
            x[3, cols // 3] = float("nan")  # a NaN wins
            x[4, :] = float("-inf")
            x[5, cols - 1] = float("nan")
            x[5, 1] = float("nan")  # two NaNs: the first
            x[6, :] = float("-inf")
            x[6, cols - 2] = -1e30
        before = native.calls["argmax_rows"]
        got = native.argmax_rows(x)
        assert native.calls["argmax_rows"] == before + 1
        assert got == x.argmax(dim=-1).tolist(), cols
    big = torch.randn(300, 4096, generator=g)  # on the thread team
    assert native.argmax_rows(big) == big.argmax(dim=-1).tolist()
    assert native.argmax_rows(big.double()) == big.argmax(dim=-1).tolist()  # torch's own


# --------------------------------------------------------------------------- gated activations

_ACTS = [("silu_and_mul", lambda g: g * torch.sigmoid(g)),
         ("gelu_tanh_and_mul", lambda g: torch.nn.functional.gelu(g, approximate="tanh"))]


@pytest.mark.parametrize("name,exact", _ACTS, ids=[a[0] for a in _ACTS])
@pytest.mark.parametrize("rows,inter", [(1, 1536), (16, 64), (7, 100), (300, 2048)])
def test_gated_activation_matches_float64(name: str, exact, rows: int, inter: int) -> None:  # type: ignore[no-untyped-def]
    """act(gate) * up in one pass: within a few 1e-6 (relative to the product's scale) of the
    float64 value, as close as torch's own float32 ops are to it within a factor of 10; every
    range of the gate (exp's clamp at -87, tanh's at 8) included."""
    g = torch.Generator().manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, generator=g) * 4
    x[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 90.0, -90.0, 1e4, -1e4])
    before = native.calls["act_and_mul"]
    got = getattr(native, name)(x)
    assert native.calls["act_and_mul"] == before + 1
    assert got.shape == (rows, inter) and got.dtype == torch.float32
    want = exact(x[:, :inter].double()) * x[:, inter:].double()
    torch_err = (getattr(reference, name)(x).double() - want).abs() / (want.abs() + 1)
    err = (got.double() - want).abs() / (want.abs() + 1)
    assert err.max().item() < max(10 * torch_err.max().item(), 1e-5), (err.max(), torch_err.max())


@pytest.mark.parametrize("name", [a[0] for a in _ACTS])
def test_gated_activation_rows_do_not_depend_on_their_batch(name: str) -> None:
    """Each element alone: a row's bits are the same alone, in a batch (strided rows: a
    slice of a wider tensor) and on the thread team (large calls)."""
    x = torch.randn(600, 2 * 1024 + 8, generator=torch.Generator().manual_seed(1))[:, :2048]
    assert x.stride(0) != x.shape[1]
    fn = getattr(native, name)
    whole = fn(x)  # 600 x 1024: on the team
    for i in (0, 17, 599):
        assert torch.equal(whole[i : i + 1], fn(x[i : i + 1]))
        assert torch.equal(whole[i : i + 1], fn(x[i : i + 1].contiguous()))


def test_gated_activation_nan_stays_nan_and_others_go_to_the_reference() -> None:
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    assert torch.isnan(native.silu_and_mul(x)[1, 2]) and torch.isnan(
        native.gelu_tanh_and_mul(x)[1, 2])
    before = native.calls["act_and_mul"]
    for y in (x.to(torch.bfloat16), x.t().contiguous().t(), x[:, :7]):  # dtype, stride, odd
        if y.shape[-1] % 2:
            continue  # an odd width is no [gate | up]
        torch.testing.assert_close(native.silu_and_mul(y), reference.silu_and_mul(y),
                                   equal_nan=True)
    assert native.calls["act_and_mul"] == before
