"""fp8 KV caches (float8_e4m3fn / float8_e5m2, no scale) in the native CPU kernels.

- The store (``rotary_store_kv``) writes ``reference.store_kv``'s bytes: saturating, rounded to
  nearest even from float32, ties, subnormals and zeros included.
- Decode and prompt attention widen the fp8 rows exactly, so their results have the bits of
  the native kernels on a cache of the widened values (``reference.widen_kv``), are close to
  the reference, and a prompt row's bits are a decode row's.
- The one-call decode layer gives the separate calls' bits on an fp8 cache.
- The conversions of ``native/common.h`` give the same bytes and values in AVX-512, AVX2 and
  scalar builds (and, under ``-m slow``, whole AVX2 / scalar builds give the same bits).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import pytest
import torch

from splitserve import LLM
from splitserve.kernels import native, reference
from splitserve.kernels.kv_cache import allocate_kv_caches
from tests.kernels.cases import random_block_tables

pytestmark = pytest.mark.skipif(not native.status().available,
                                reason="needs a C compiler (make setup installs gcc)")

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
ROOT = Path(__file__).resolve().parents[2]


def _finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an fp8 type, ascending, as float32 (one zero: +0)."""
    v = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return (v[torch.isfinite(v)] + 0.0).unique()  # (-0 + 0 = +0)


def _to_fp8_oracle(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to nearest even onto the fp8 grid in float64 by the definition (nearest value;
    on a tie the one with an even code), saturating: the bytes ``to_cache_dtype`` stores,
    computed without torch's conversion."""
    grid = _finite_values(dtype).double()
    grid = grid[grid >= 0]
    big = grid[-1]
    xd = x.double().clamp(-big, big)
    mag = xd.abs()
    hi = torch.searchsorted(grid, mag).clamp(max=grid.numel() - 1)  # first grid value >= mag
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    lo_bytes = grid[lo].float().to(dtype).view(torch.uint8)
    hi_bytes = grid[hi].float().to(dtype).view(torch.uint8)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi_bytes % 2 == 0) & (lo_bytes % 2 == 1))
    out = torch.where(pick_hi, hi_bytes, lo_bytes)
    return out | ((xd < 0) | ((xd == 0) & (torch.signbit(x)))).to(torch.uint8) * 0x80


def _store_inputs(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """float32 values that separate roundings: every exact midpoint of two neighbouring fp8
    values (ties, to even) and the float32 values next to them, the subnormal range, zeros of
    both signs, float32 subnormals, values past the largest finite one (saturation, inf
    included), random values over the whole range."""
    grid = _finite_values(dtype)
    pos = grid[grid >= 0]
    mids = ((pos[1:].double() + pos[:-1].double()) / 2).float()  # exact in float32 (and bf16)
    assert torch.equal(mids.double(), (pos[1:].double() + pos[:-1].double()) / 2)
    up, down = torch.full_like(mids, float("inf")), torch.zeros_like(mids)
    big = torch.finfo(dtype).max
    tiny = float(pos[1])  # the smallest subnormal
    parts = [
        pos, mids, torch.nextafter(mids, up), torch.nextafter(mids, down),
        torch.tensor([0.0, tiny / 2, tiny * 1.5, tiny * 2.5, tiny * 0.49, 1e-40, 1e-45,
                      big, big * 1.03, big * 1.2, big * 4, 1e30, 3.4e38, float("inf")]),
        torch.randn(2048, generator=g) * torch.exp2(torch.randint(-24, 20, (2048,), generator=g)),
    ]
    x = torch.cat(parts)
    x = torch.cat([x, -x, torch.tensor([-0.0])])
    return x[torch.randperm(x.numel(), generator=g)]


# --------------------------------------------------------------------------- the store


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_store_writes_the_references_bytes(dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = _store_inputs(kv_dtype, g)
    d, nkv = 64, 2
    tokens = -(-x.numel() // (nkv * d))
    x = torch.cat([x, torch.zeros(tokens * nkv * d - x.numel())])
    vals = x.to(dtype)
    # K gets the rotary embedding of its first 2 dims at position 0 (cos 1, sin 0: the values
    # go through, inf apart); V is stored as it is
    key = vals.nan_to_num(posinf=3e38, neginf=-3e38).view(tokens, nkv, d)
    value = vals.flip(0).view(tokens, nkv, d)
    q = torch.randn(tokens, 4, d, generator=g).to(dtype)
    table = reference.rope_cos_sin_cache(d, 8, 10000.0, rotary_dim=2)
    positions = torch.zeros(tokens, dtype=torch.int64)
    num_blocks, block_size = tokens // 16 + 4, 16
    cache = allocate_kv_caches(3, num_blocks, block_size, nkv, d, kv_dtype, "cpu")[1]
    assert not cache.is_contiguous()  # a layer's view of the block-major pool
    cache.view(torch.uint8).copy_(torch.randint(0, 256, cache.shape, generator=g,
                                                dtype=torch.uint8))
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[3::7] = -1  # padding: nothing stored
    ours, theirs = cache.clone(), cache.clone()
    before = native.calls["rotary_store_kv"]
    got = native.rotary_store_kv(positions, q, key, value, table, ours, slots)
    assert native.calls["rotary_store_kv"] == before + 1  # the C kernel ran
    want = reference.rotary_store_kv(positions, q, key, value, table, theirs, slots)
    assert torch.equal(got, want)
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    # and those bytes are round-to-nearest-even by the definition, saturating: a truncating
    # or round-half-away store, or one that lets overflow become NaN / inf, fails here
    kept = slots >= 0
    k_store = ours[0].reshape(-1, nkv, d)[slots[kept]].view(torch.uint8)
    v_store = ours[1].reshape(-1, nkv, d)[slots[kept]].view(torch.uint8)
    assert torch.equal(v_store, _to_fp8_oracle(value[kept].float(), kv_dtype))
    assert torch.equal(k_store[..., 2:], _to_fp8_oracle(key[kept][..., 2:].float(), kv_dtype))
    # the inputs do hold ties that round down to even and others that round up to even
    grid = _finite_values(kv_dtype).double()
    grid = grid[grid >= 0]
    is_tie = torch.isin(value[kept].double().abs(), (grid[1:] + grid[:-1]) / 2)
    assert is_tie.sum() > 100
    tie_bytes = v_store[is_tie] & 0x7F
    assert bool((tie_bytes % 2 == 0).all())
    widened = v_store[is_tie].view(kv_dtype).float().abs().double()
    tie_vals = value[kept][is_tie].double().abs()
    assert bool((widened > tie_vals).any()) and bool((widened < tie_vals).any())
    stored = v_store.view(kv_dtype).float()
    assert bool(torch.isfinite(stored).all())  # no overflow to NaN / inf
    saturated = value[kept].float().abs() > torch.finfo(kv_dtype).max * 1.1
    assert saturated.sum() > 2 and bool((stored[saturated].abs() == torch.finfo(kv_dtype).max).all())


def test_the_stores_rounding_is_one_rounding_from_float32() -> None:
    """A value just above an fp8 tie that a float16 round trip would move onto the tie (then
    to even, down) must round up: no double rounding through another format."""
    x = torch.tensor([1.0625 + 2.0 ** -20, 1.125 + 2.0 ** -20])  # e4m3 step at 1 is 0.125
    for kv_dtype in FP8:
        cache = torch.zeros(2, 1, 16, 1, 16, dtype=kv_dtype)
        vals = x.repeat(8).view(1, 1, 16)
        table = reference.rope_cos_sin_cache(16, 4, 10000.0, rotary_dim=2)
        native.rotary_store_kv(torch.zeros(1, dtype=torch.int64), vals, vals, vals, table, cache,
                               torch.tensor([0]))
        want = reference.to_cache_dtype(vals[0, 0], kv_dtype).view(torch.uint8)
        assert torch.equal(cache[1, 0, 0, 0].view(torch.uint8), want)
        assert torch.equal(want, _to_fp8_oracle(vals[0, 0], kv_dtype))


# --------------------------------------------------------------------------- attention


def _fp8_cache(kv_dtype: torch.dtype, num_blocks: int, block_size: int, kvh: int, d: int,
               g: torch.Generator, all_codes: bool) -> torch.Tensor:
    """A layer's view of a block-major fp8 pool: every finite code at random (subnormals and
    the largest values included), or realistic values stored as the store would."""
    cache = allocate_kv_caches(3, num_blocks, block_size, kvh, d, kv_dtype, "cpu")[1]
    if all_codes:
        codes = _finite_values(kv_dtype).to(kv_dtype).view(torch.uint8)
        pick = torch.randint(0, codes.numel(), cache.shape, generator=g)
        signs = torch.randint(0, 2, cache.shape, generator=g, dtype=torch.uint8) * 0x80
        cache.view(torch.uint8).copy_(codes[pick] | signs)
    else:
        cache.copy_(reference.to_cache_dtype(torch.randn(cache.shape, generator=g), kv_dtype))
    return cache


DECODE_CASES = [  # query dtype, fp8 dtype, (heads, kv heads), lens, window, soft cap
    (torch.bfloat16, torch.float8_e4m3fn, (9, 3), [1, 15, 16, 17, 200, 333], None, None),
    (torch.float32, torch.float8_e4m3fn, (9, 3), [1, 31, 160, 65], None, None),
    (torch.bfloat16, torch.float8_e5m2, (3, 3), [2, 16, 100, 250], None, None),
    (torch.float32, torch.float8_e5m2, (3, 3), [5, 64, 129], 40, None),
    (torch.bfloat16, torch.float8_e5m2, (9, 3), [0, 77, 140], 32, 30.0),
    (torch.float32, torch.float8_e4m3fn, (6, 2), [3, 48, 90], None, 50.0),
]


@pytest.mark.parametrize("dtype,kv_dtype,heads,lens,window,cap", DECODE_CASES)
def test_decode_on_fp8_has_the_bits_of_the_widened_cache(dtype, kv_dtype, heads, lens,  # type: ignore[no-untyped-def]
                                                         window, cap) -> None:
    nh, kvh = heads
    d, bs = 64, 16
    g = torch.Generator().manual_seed(len(lens) + nh)
    num_blocks = 4 * (-(-max(lens) // bs)) + 8
    tables = random_block_tables(lens, num_blocks, bs, 1).cpu()
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = d ** -0.5
    for all_codes in (True, False):
        cache = _fp8_cache(kv_dtype, num_blocks, bs, kvh, d, g, all_codes)
        # every code at random: tiny queries, so the scores stay in a sane range
        q = (torch.randn(len(lens), nh, d, generator=g) * (1e-3 if all_codes else 1.0)).to(dtype)
        before = native.calls["paged_decode_attention"]
        got = native.paged_decode_attention(q, cache, tables, ctx, scale, window, cap)
        assert native.calls["paged_decode_attention"] == before + 1  # native, not the reference
        assert got.dtype == dtype and bool(torch.isfinite(got.float()).all())
        wide = reference.widen_kv(cache, dtype)
        assert torch.equal(got, native.paged_decode_attention(q, wide, tables, ctx, scale,
                                                              window, cap))
        if dtype == torch.float32:  # a bf16 cache of the same values: the same bits too
            bf = reference.widen_kv(cache, torch.bfloat16)
            assert torch.equal(got, native.paged_decode_attention(q, bf, tables, ctx, scale,
                                                                  window, cap))
        assert bool((got[ctx == 0] == 0).all())
        if not all_codes:
            ref = reference.paged_decode_attention(q, cache, tables, ctx, scale, window, cap)
            tol = 4e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kv_dtype", FP8)
def test_decode_bits_do_not_depend_on_the_batch(kv_dtype: torch.dtype) -> None:
    """Many sequences (an item per sequence, all its KV heads) or one (an item per KV head):
    the same bits."""
    g = torch.Generator().manual_seed(9)
    lens = [int(n) for n in torch.randint(1, 300, (12,), generator=g)]
    num_blocks = 4 * (-(-max(lens) // 16)) + 8
    cache = _fp8_cache(kv_dtype, num_blocks, 16, 3, 64, g, False)
    tables = random_block_tables(lens, num_blocks, 16, 2).cpu()
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(12, 9, 64, generator=g).to(torch.bfloat16)
    batch = native.paged_decode_attention(q, cache, tables, ctx, 0.125)
    for i in (0, 7, 11):
        alone = native.paged_decode_attention(q[i:i + 1], cache, tables[i:i + 1], ctx[i:i + 1],
                                              0.125)
        assert torch.equal(alone[0], batch[i])


@pytest.mark.parametrize("d", [32, 96, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_fp8_code_widens_exactly_at_other_head_sizes(d: int, dtype: torch.dtype) -> None:
    """Rows are widened 64 bytes at a time where the build can (AVX-512 VBMI byte tables) and
    byte by byte for the rest of a row: head sizes below, above and at two chunks give the
    bits of the cache widened by torch, every finite code of both formats present."""
    for kv_dtype in FP8:
        g = torch.Generator().manual_seed(d)
        lens = [5, 16, 47, 130]
        num_blocks = 4 * (-(-max(lens) // 16)) + 8
        cache = _fp8_cache(kv_dtype, num_blocks, 16, 2, d, g, True)
        tables = random_block_tables(lens, num_blocks, 16, 1).cpu()
        ctx = torch.tensor(lens, dtype=torch.int32)
        q = (torch.randn(len(lens), 4, d, generator=g) * 1e-3).to(dtype)
        got = native.paged_decode_attention(q, cache, tables, ctx, d ** -0.5)
        wide = reference.widen_kv(cache, dtype)
        assert torch.equal(got, native.paged_decode_attention(q, wide, tables, ctx, d ** -0.5))


PREFILL_CASES = [  # chunks (cached prefix, chunk length), heads, query dtype, fp8, window, cap
    ([(0, 40), (20, 17), (0, 1)], (9, 3), torch.bfloat16, torch.float8_e4m3fn, None, None),
    ([(0, 33), (50, 20)], (3, 3), torch.float32, torch.float8_e5m2, 24, None),
    ([(10, 30)], (9, 3), torch.float32, torch.float8_e4m3fn, None, 20.0),
    ([(0, 35), (5, 9)], (3, 3), torch.bfloat16, torch.float8_e5m2, None, None),
]


@pytest.mark.parametrize("chunks,heads,dtype,kv_dtype,window,cap", PREFILL_CASES)
def test_prompt_attention_on_fp8_has_the_widened_bits_and_each_row_a_decode_rows(  # type: ignore[no-untyped-def]
        chunks, heads, dtype, kv_dtype, window, cap) -> None:
    nh, kvh = heads
    d, bs = 64, 16
    g = torch.Generator().manual_seed(len(chunks) * 7 + nh)
    ctxs = [p + n for p, n in chunks]
    max_blocks = max(-(-c // bs) for c in ctxs)
    num_blocks = max_blocks * len(chunks) + 3
    cache = _fp8_cache(kv_dtype, num_blocks, bs, kvh, d, g, False)
    tables = torch.randperm(num_blocks, generator=g)[: max_blocks * len(chunks)]
    tables = tables.reshape(len(chunks), max_blocks).to(torch.int32)
    starts = torch.tensor([0] + [n for _, n in chunks]).cumsum(0).to(torch.int32)
    ctx = torch.tensor(ctxs, dtype=torch.int32)
    q = torch.randn(int(starts[-1]), nh, d, generator=g).to(dtype)
    scale = d ** -0.5
    before = native.calls["paged_prefill_attention"]
    got = native.prefill_attention(q, cache, tables, starts, ctx, scale, window, cap)
    assert native.calls["paged_prefill_attention"] == before + 1
    wide = reference.widen_kv(cache, dtype)
    assert torch.equal(got, native.prefill_attention(q, wide, tables, starts, ctx, scale,
                                                     window, cap))
    want = reference.prefill_attention(q, cache, tables, starts, ctx, scale, window, cap)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for s, (prefix, n) in enumerate(chunks):  # every row: a decode step of its token
        rows = slice(int(starts[s]), int(starts[s + 1]))
        one = native.paged_decode_attention(
            q[rows], cache, tables[s:s + 1].expand(n, -1).contiguous(),
            torch.arange(prefix + 1, prefix + n + 1, dtype=torch.int32), scale, window, cap)
        assert torch.equal(one, got[rows]), s


# --------------------------------------------------------------------------- decode_layer


@pytest.mark.parametrize("kv_dtype", FP8)
def test_the_one_call_layer_on_an_fp8_cache_gives_the_separate_calls_bits(
        tiny_model_dir: Path, kv_dtype: torch.dtype) -> None:
    from splitserve.roles.models.blocks import AttentionMetadata

    llm = LLM(str(tiny_model_dir), quantization="int4", num_kv_blocks=16)
    runner = llm.engine.runner  # type: ignore[attr-defined]
    layer, shape = runner.model.layers[0], runner.kv_caches[0].shape
    g = torch.Generator().manual_seed(4)
    cache = allocate_kv_caches(2, shape[1], shape[2], shape[3], shape[4], kv_dtype, "cpu")[0]
    cache.copy_(reference.to_cache_dtype(torch.randn(cache.shape, generator=g), kv_dtype))
    block_size = shape[2]
    m = 3
    hidden = torch.randn(m, layer.attn.qkv.in_features, generator=g)
    lens = [5, 2 * block_size + 3, block_size]
    table = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    slots = torch.tensor([int(table[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(lens)])
    empty = torch.zeros(0, 1, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=slots, num_decode=m, decode_block_tables=table,
        decode_context_lens=torch.tensor(lens, dtype=torch.int32),
        prefill_block_tables=empty, prefill_query_start_loc=torch.zeros(1, dtype=torch.int32),
        prefill_context_lens=torch.zeros(0, dtype=torch.int32))
    positions = torch.tensor([n - 1 for n in lens])
    one_cache, sep_cache = cache.clone(), cache.clone()
    before = native.calls["decode_layer"]
    layer._one_call = None
    one = layer.forward(positions, hidden, None, one_cache, meta)
    assert native.calls["decode_layer"] == before + 1  # the one-call path took the fp8 cache
    layer._one_call = False
    att = native.calls["paged_decode_attention"]
    sep = layer.forward(positions, hidden, None, sep_cache, meta)
    assert native.calls["paged_decode_attention"] == att + 1  # separate calls, native too
    assert all(torch.equal(a, b) for a, b in zip(one, sep, strict=True))
    assert torch.equal(one_cache.view(torch.uint8), sep_cache.view(torch.uint8))
    assert not torch.equal(one_cache.view(torch.uint8), cache.view(torch.uint8))  # stored


# --------------------------------------------------------------------------- other builds

_HARNESS = r"""
#include "common.h"
void decode_all(int dtype, float *scalar, float *vec) {
    uint8_t b[256];
    for (int i = 0; i < 256; i++) { b[i] = (uint8_t)i; scalar[i] = fp8_to_f32(b[i], dtype); }
    for (int i = 0; i < 256; i += 16) {
        v16f f = load16(b + i, dtype);
        memcpy(vec + i, &f, sizeof f);
    }
}
void encode_all(int dtype, const float *x, int64_t n, uint8_t *out) {
    store_values(out, dtype, x, n);
}
"""

BUILDS = ["-march=native", "-march=haswell", "-march=x86-64"]


@pytest.mark.parametrize("march", BUILDS)
def test_every_builds_conversions_are_torchs(tmp_path: Path, march: str) -> None:
    """common.h's fp8 decode (scalar and 16-lane) and encode as AVX-512, AVX2 and scalar
    code: every byte decodes to torch's value, every input encodes to the reference's byte
    (the attention after widening is the bfloat16 code whose builds test_native compares)."""
    src = tmp_path / "fp8.c"
    src.write_text(_HARNESS)
    lib_path = tmp_path / "fp8.so"
    cc = native.compiler()
    assert cc is not None
    run = subprocess.run([cc, "-O3", march, "-fno-trapping-math", "-shared", "-fPIC", "-std=c11",
                          f"-I{native.SOURCE_DIR}", "-o", str(lib_path), str(src), "-lm"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lib = ctypes.CDLL(str(lib_path))
    g = torch.Generator().manual_seed(11)
    for code, kv_dtype in ((2, torch.float8_e4m3fn), (3, torch.float8_e5m2)):
        scalar, vec = torch.empty(256), torch.empty(256)
        lib.decode_all(code, ctypes.c_void_p(scalar.data_ptr()), ctypes.c_void_p(vec.data_ptr()))
        want = torch.arange(256, dtype=torch.uint8).view(kv_dtype).float()
        for got in (scalar, vec):
            same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
            assert bool(same.all()), (march, kv_dtype, torch.nonzero(~same))
        x = _store_inputs(kv_dtype, g)
        x = torch.cat([x, torch.randint(-2 ** 31, 2 ** 31 - 1, (1 << 16,), generator=g,
                                        dtype=torch.int64).to(torch.int32).view(torch.float32)])
        x = x[~x.isnan()].contiguous()
        out = torch.empty(x.numel(), dtype=torch.uint8)
        lib.encode_all(code, ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(x.numel()),
                       ctypes.c_void_p(out.data_ptr()))
        assert torch.equal(out, reference.to_cache_dtype(x, kv_dtype).view(torch.uint8)), march
        nan = torch.tensor([float("nan"), -float("nan")])
        lib.encode_all(code, ctypes.c_void_p(nan.data_ptr()), ctypes.c_int64(2),
                       ctypes.c_void_p(out.data_ptr()))
        assert out[:2].tolist() == [0x7F, 0xFF]  # NaN stays NaN, as torch's conversion


_OTHER_BUILD = r"""
import json, sys, torch
sys.path.insert(0, ".")
from splitserve.kernels import native, reference
from tests.kernels.test_native_fp8_kv import _bits_case
print(json.dumps({"reason": native.status().reason, "bits": _bits_case()}))
"""


def _bits_case() -> list[list[float]]:
    """Decode (bf16 and float32 queries), prompt attention and the store on fp8 caches: the
    results as float lists (and the stored bytes), for comparing builds."""
    out = []
    for kv_dtype in FP8:
        g = torch.Generator().manual_seed(21)
        lens = [1, 17, 200, 90]
        cache = _fp8_cache(kv_dtype, 60, 16, 3, 64, g, False)
        tables = random_block_tables(lens, 60, 16, 3).cpu()
        ctx = torch.tensor(lens, dtype=torch.int32)
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.randn(4, 9, 64, generator=g).to(dtype)
            out.append(native.paged_decode_attention(q, cache, tables, ctx, 0.125).float()
                       .flatten().tolist())
            starts = torch.tensor([0, 1, 18, 40, 70], dtype=torch.int32)
            pq = torch.randn(70, 9, 64, generator=g).to(dtype)
            out.append(native.prefill_attention(pq, cache, tables, starts, ctx, 0.125, None, 20.0)
                       .float().flatten().tolist())
        key = torch.randn(8, 3, 64, generator=g) * 100
        table = reference.rope_cos_sin_cache(64, 64, 10000.0)
        native.rotary_store_kv(torch.arange(8), key.repeat(1, 3, 1), key, key * 3, table, cache,
                               torch.arange(8) * 5)
        out.append(cache.view(torch.uint8).flatten().float().tolist())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("march", ["-march=haswell", "-march=x86-64"])
def test_avx2_and_scalar_builds_give_the_same_bits(tmp_path: Path, march: str) -> None:
    """Whole builds (minutes each): fp8 decode, prompt attention and store, the same bits as
    this machine's build."""
    from tests.kernels.test_native import run_other_build

    out = run_other_build(_OTHER_BUILD, march, tmp_path)
    assert march in out["reason"], out["reason"]
    here = _bits_case()
    assert len(here) == len(out["bits"])
    for a, b in zip(here, out["bits"], strict=True):
        assert torch.equal(torch.tensor(a), torch.tensor(b))
    json.dumps(out)  # (the output parsed)
