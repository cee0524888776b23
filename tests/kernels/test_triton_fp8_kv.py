"""fp8 KV caches (float8_e4m3fn / float8_e5m2, no scale) in the Triton kernels.

The store must write exactly ``kv_cache.to_cache_dtype``'s bytes (saturating, round to nearest
even from float32, subnormals included): the data holds every fp8 value, every midpoint between
neighbours (exact ties, both parities, so truncating or rounding half away from zero fails)
and the floats next to them, huge values, infinities, NaNs, zeros of both signs and the
subnormal range. Attention must widen fp8 exactly: on an fp8 cache it equals, bit for bit, the
same kernel on the cache widened to the query's dtype, and matches the reference within the
tolerances of that dtype. Block copies move the bytes.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from splitserve.kernels import reference
from splitserve.kernels.block_copy import gather_blocks, scatter_blocks
from splitserve.kernels.checks import KernelInputError
from splitserve.kernels.decode_attention import (
    decode_attention_partitioned,
    paged_decode_attention,
)
from splitserve.kernels.kv_cache import allocate_kv_caches
from splitserve.kernels.prefill_attention import prefill_attention
from splitserve.kernels.rounding import fp8_decode, fp8_encode
from splitserve.kernels.store_kv import store_kv
from tests.kernels.cases import (
    DEVICE,
    assert_close,
    generator,
    int_tensor,
    randn,
    random_block_tables,
)

Tensor = torch.Tensor

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_PARAMS = [pytest.param(d, id=str(d).removeprefix("torch.float8_")) for d in FP8]
U8 = torch.uint8
NUM_KV_HEADS = 2


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- test data


def _finite_values(fp8: torch.dtype) -> Tensor:
    """Every finite value of ``fp8``, ascending, as float32 (one zero)."""
    values = torch.arange(256, dtype=U8).view(fp8).float()
    return torch.unique(values[values.isfinite()])  # sorted; -0.0 and 0.0 merge


def _hard_values(fp8: torch.dtype) -> Tensor:
    """float32 values that catch wrong rounding: every fp8 value, every exact midpoint of two
    neighbours and the floats either side of it, saturation, subnormals, signed zeros, NaN."""
    values = _finite_values(fp8)
    mids = ((values[1:].double() + values[:-1].double()) / 2).float()
    assert torch.equal(mids.double(), (values[1:].double() + values[:-1].double()) / 2)
    big = torch.finfo(fp8).max
    tiny = torch.finfo(fp8).smallest_normal
    special = torch.tensor(
        [
            0.0,
            -0.0,
            big,
            -big,
            big * 1.03,
            big * 1.0625,
            big * 2,
            -big * 3,
            1e6,
            -1e30,
            3e38,
            float("inf"),
            float("-inf"),
            float("nan"),
            -float("nan"),
            tiny,
            tiny * 0.999,
            tiny * 0.5,
            1e-30,
            -1e-30,
            1e-45,
            -1e-42,
            1.9514,
            -1.9514,
        ]
    )
    g = generator(0)
    spread = torch.randn(600, generator=g) * torch.exp2(torch.randint(-24, 18, (600,), generator=g))
    inf = torch.tensor(float("inf"))
    return torch.cat(
        [
            values,
            mids,
            torch.nextafter(mids, inf),
            torch.nextafter(mids, -inf),
            special,
            spread,
        ]
    )


def _toward_zero(x: Tensor, fp8: torch.dtype) -> Tensor:
    """Bytes of ``x`` (finite float32) truncated toward zero to ``fp8`` (saturating)."""
    values = _finite_values(fp8)
    mag = x.abs().clamp(max=values[-1].item())
    idx = torch.searchsorted(values, mag, right=True) - 1
    out = values[idx].to(fp8).view(U8)
    return out | ((x < 0).to(U8) << 7)


def _rows(values: Tensor, row: int) -> Tensor:
    """``values`` padded with zeros to whole rows of ``row`` elements: [T, row]."""
    pad = (-values.numel()) % row
    return torch.cat([values, torch.zeros(pad)]).view(-1, row)


# --------------------------------------------------------------------------- device functions


@triton.jit
def _encode_decode_kernel(
    x_ptr, byte_ptr, bits_ptr, out_ptr, n, E5M2: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    tl.store(byte_ptr + i, fp8_encode(x, E5M2), mask=mask)
    bits = tl.load(bits_ptr + i, mask=mask, other=0)
    tl.store(out_ptr + i, fp8_decode(bits, E5M2), mask=mask)


@pytest.mark.parametrize("fp8", FP8_PARAMS)
def test_device_encode_and_decode_are_exact(fp8: torch.dtype) -> None:
    """``fp8_encode`` gives ``to_cache_dtype``'s bytes for the hard values; ``fp8_decode``
    gives every one of the 256 bytes' values (NaNs and e5m2's infinities included)."""
    x = _hard_values(fp8).to(DEVICE)
    n = x.numel()
    byte_values = torch.arange(256, device=DEVICE).repeat(-(-n // 256))[:n].to(U8)
    got_bytes = torch.empty(n, dtype=U8, device=DEVICE)
    got_values = torch.empty(n, device=DEVICE)
    _encode_decode_kernel[(triton.cdiv(n, 1024),)](
        x, got_bytes, byte_values, got_values, n, E5M2=fp8 == torch.float8_e5m2, BLOCK=1024
    )
    want = reference.to_cache_dtype(x, fp8).view(U8)
    assert torch.equal(got_bytes, want)
    assert not torch.equal(want.cpu(), _toward_zero(x.nan_to_num(0.0).cpu(), fp8))
    exact = byte_values.view(fp8).float()
    nan = exact.isnan()
    assert torch.equal(got_values.isnan(), nan)
    assert torch.equal(got_values[~nan].view(torch.int32), exact[~nan].view(torch.int32))


# --------------------------------------------------------------------------- store_kv


def _store_inputs(
    fp8: torch.dtype, dtype: torch.dtype, head_dim: int, block_size: int, num_blocks: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys: the hard values, row by row; values: the same reversed and negated; the cache:
    random bytes (NaN bytes included); a few padding tokens that must store nothing."""
    row = NUM_KV_HEADS * head_dim
    key = _rows(_hard_values(fp8), row)
    value = _rows(-_hard_values(fp8).flip(0), row)
    num_tokens = key.shape[0]
    key = torch.cat([key, key[:3] + 1.0]).to(dtype).view(-1, NUM_KV_HEADS, head_dim)
    value = torch.cat([value, value[:3] - 1.0]).to(dtype).view(-1, NUM_KV_HEADS, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=generator(1))[: num_tokens + 3]
    slots[num_tokens:] = -1  # padding rows
    slots = slots[torch.randperm(num_tokens + 3, generator=generator(2))]
    shape = (2, num_blocks, block_size, NUM_KV_HEADS, head_dim)
    cache = torch.randint(0, 256, shape, generator=generator(3), dtype=U8).view(fp8)
    return key.to(DEVICE), value.to(DEVICE), cache.to(DEVICE), slots.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_name)
@pytest.mark.parametrize("fp8", FP8_PARAMS)
def test_store_writes_reference_bytes(fp8: torch.dtype, dtype: torch.dtype) -> None:
    key, value, cache, slots = _store_inputs(fp8, dtype, 32, 8, 12)
    expected = cache.clone()
    reference.store_kv(key, value, expected, slots)
    store_kv(key, value, cache, slots)
    assert torch.equal(cache.view(U8), expected.view(U8))
    # the rows really hold the rounded keys (not left as they were)
    kept = slots >= 0
    flat = cache.view(U8).view(2, -1, NUM_KV_HEADS, 32)
    stored = reference.to_cache_dtype(key[kept], fp8).view(U8)
    assert torch.equal(flat[0][slots[kept]], stored)


@pytest.mark.parametrize("fp8", FP8_PARAMS)
def test_store_into_block_major_view(fp8: torch.dtype) -> None:
    """A layer view of the block-major pool gets exactly the contiguous cache's bytes, and the
    pool's other layers keep theirs."""
    key, value, cache, slots = _store_inputs(fp8, torch.bfloat16, 32, 8, 12)
    views = allocate_kv_caches(3, 12, 8, NUM_KV_HEADS, 32, fp8, DEVICE)
    for i, view in enumerate(views):
        view.view(U8).copy_(cache.view(U8) + i)
    view = views[1]
    assert not view.is_contiguous()
    others = [views[0].view(U8).clone(), views[2].view(U8).clone()]
    expected = (cache.view(U8) + 1).view(fp8)  # what layer 1 holds, contiguous
    reference.store_kv(key, value, expected, slots)
    store_kv(key, value, view, slots)
    assert torch.equal(view.view(U8), expected.view(U8))
    assert torch.equal(views[0].view(U8), others[0])
    assert torch.equal(views[2].view(U8), others[1])


def test_store_rejects_bad_dtypes() -> None:
    key, value, cache, slots = _store_inputs(torch.float8_e4m3fn, torch.float32, 32, 8, 12)
    with pytest.raises(KernelInputError, match="dtypes must match"):
        store_kv(key, value.half(), cache, slots)
    with pytest.raises(KernelInputError, match="key must have dtype"):
        store_kv(key.to(torch.float8_e4m3fn), value.to(torch.float8_e4m3fn), cache, slots)
    with pytest.raises(KernelInputError, match="kv_cache must have dtype"):
        store_kv(key, value, cache.view(torch.int8), slots)
    with pytest.raises(KernelInputError, match="kv_cache must have dtype"):
        store_kv(key, value, cache.view(U8), slots)


# --------------------------------------------------------------------------- attention


def _fp8_cache(fp8: torch.dtype, num_blocks: int, block_size: int, head_dim: int, seed: int):
    """A cache of rounded normal values, spread so that saturation and subnormals occur."""
    shape = (2, num_blocks, block_size, NUM_KV_HEADS, head_dim)
    x = randn(shape, torch.float32, seed)
    x = x * torch.exp2(torch.randint(-12, 3, shape, generator=generator(seed)).float()).to(DEVICE)
    return reference.to_cache_dtype(x, fp8)


def _decode_inputs(fp8: torch.dtype, dtype: torch.dtype, ratio: int, contexts: list[int]):
    block_size, head_dim = 16, 64
    num_blocks = sum(-(-c // block_size) for c in contexts) + 4
    tables = random_block_tables(contexts, num_blocks, block_size, seed=ratio)
    cache = _fp8_cache(fp8, num_blocks, block_size, head_dim, seed=5)
    query = randn((len(contexts), ratio * NUM_KV_HEADS, head_dim), dtype, seed=6)
    return query, cache, tables, int_tensor(contexts)


DECODE_CASES = [
    # (fp8, query dtype, gqa ratio, window, soft cap, partition)
    (torch.float8_e4m3fn, torch.float32, 3, None, None, 64),
    (torch.float8_e5m2, torch.float32, 1, 40, None, 512),
    (torch.float8_e4m3fn, torch.bfloat16, 4, 33, 10.0, 64),
    (torch.float8_e5m2, torch.bfloat16, 3, None, None, 512),
    (torch.float8_e4m3fn, torch.float16, 1, None, 20.0, 512),
    (torch.float8_e5m2, torch.float16, 4, 5, None, 64),
]


def _case_id(case: tuple) -> str:
    fp8, dtype, ratio, window, cap, partition = case
    return f"{_name(fp8)}-{_name(dtype)}-gqa{ratio}-w{window}-cap{cap}-p{partition}"


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_on_fp8_cache(case: tuple) -> None:
    fp8, dtype, ratio, window, soft_cap, partition = case
    query, cache, tables, lens = _decode_inputs(fp8, dtype, ratio, [0, 1, 37, 77, 130])
    args = (query, cache, tables, lens, 0.125, window, soft_cap)
    out = decode_attention_partitioned(*args, partition)
    assert_close(out, reference.paged_decode_attention(*args), attention=True)
    # widening is exact: the same kernel on the widened cache computes the very same values
    wide = cache.to(dtype)
    assert torch.equal(out, decode_attention_partitioned(query, wide, *args[2:], partition))
    assert torch.all(out[0] == 0), "a sequence with no context must get zeros"


@pytest.mark.parametrize("fp8", FP8_PARAMS)
def test_decode_block_major_view(fp8: torch.dtype) -> None:
    query, cache, tables, lens = _decode_inputs(fp8, torch.bfloat16, 2, [1, 37, 70])
    views = allocate_kv_caches(3, cache.shape[1], 16, NUM_KV_HEADS, 64, fp8, DEVICE)
    for i, view in enumerate(views):
        view.view(U8).copy_(cache.view(U8) ^ (0 if i == 2 else 0x41))
    out = paged_decode_attention(query, views[2], tables, lens, 0.125)
    assert torch.equal(out, paged_decode_attention(query, cache, tables, lens, 0.125))
    expected = reference.paged_decode_attention(query, cache, tables, lens, 0.125)
    assert_close(out, expected, attention=True)


def test_attention_rejects_bad_dtypes() -> None:
    query, cache, tables, lens = _decode_inputs(torch.float8_e5m2, torch.float32, 1, [5])
    with pytest.raises(KernelInputError, match="query must have dtype"):
        paged_decode_attention(query.to(torch.float8_e5m2), cache, tables, lens, 1.0)
    with pytest.raises(KernelInputError, match="kv_cache must have dtype"):
        paged_decode_attention(query, cache.view(torch.int8), tables, lens, 1.0)
    starts = int_tensor([0, 1])
    with pytest.raises(KernelInputError, match="kv_cache must have dtype"):
        prefill_attention(query, cache.view(U8), tables, starts, lens, 1.0)


# (chunk length, context after it): a whole prompt, a chunk on a cached prefix, one token
CHUNKS = [(37, 37), (29, 93), (1, 40)]
PREFILL_CASES = [
    # (fp8, query dtype, gqa ratio, window, soft cap)
    (torch.float8_e4m3fn, torch.float32, 3, None, None),
    (torch.float8_e5m2, torch.bfloat16, 2, 7, None),
    (torch.float8_e4m3fn, torch.bfloat16, 1, None, 15.0),
    (torch.float8_e5m2, torch.float16, 3, 50, 5.0),
]


def _prefill_case_id(case: tuple) -> str:
    fp8, dtype, ratio, window, cap = case
    return f"{_name(fp8)}-{_name(dtype)}-gqa{ratio}-w{window}-cap{cap}"


@pytest.mark.parametrize("case", PREFILL_CASES, ids=_prefill_case_id)
def test_prefill_on_fp8_cache(case: tuple) -> None:
    fp8, dtype, ratio, window, soft_cap = case
    block_size, head_dim = 16, 64
    contexts = [ctx for _, ctx in CHUNKS]
    num_blocks = sum(-(-c // block_size) for c in contexts) + 4
    tables = random_block_tables(contexts, num_blocks, block_size, seed=ratio)
    cache = _fp8_cache(fp8, num_blocks, block_size, head_dim, seed=8)
    starts = [0]
    for q_len, _ in CHUNKS:
        starts.append(starts[-1] + q_len)
    query = randn((starts[-1], ratio * NUM_KV_HEADS, head_dim), dtype, seed=9)
    rest = (tables, int_tensor(starts), int_tensor(contexts), 0.2, window, soft_cap)
    out = prefill_attention(query, cache, *rest)
    assert_close(out, reference.prefill_attention(query, cache, *rest), attention=True)
    assert torch.equal(out, prefill_attention(query, cache.to(dtype), *rest))


# --------------------------------------------------------------------------- block copies


@pytest.mark.parametrize("block_major", [False, True], ids=["layer-major", "block-major"])
@pytest.mark.parametrize("fp8", FP8_PARAMS)
def test_block_copy_moves_fp8_bytes(fp8: torch.dtype, block_major: bool) -> None:
    num_layers, num_blocks, shape = 3, 6, (8, NUM_KV_HEADS, 16)
    kind = "block_major" if block_major else "layer_major"

    def caches(seed: int) -> list[Tensor]:
        out = allocate_kv_caches(num_layers, num_blocks, *shape, fp8, DEVICE, kind=kind)
        for layer, cache in enumerate(out):
            noise = torch.randint(0, 256, cache.shape, generator=generator(seed + layer))
            cache.view(U8).copy_(noise.to(U8))  # every byte, NaN patterns included
        return out

    source = caches(0)
    ids = torch.tensor([4, 0, 5], device=DEVICE)
    staging = gather_blocks(source, ids)
    assert staging.dtype == fp8
    bytes_ = [c.view(U8) for c in source]
    assert torch.equal(staging.view(U8), reference.gather_blocks(bytes_, ids))

    targets = caches(10)
    expected = [t.view(U8).clone() for t in targets]
    dest = torch.tensor([1, 3, 2], device=DEVICE)
    scatter_blocks(staging, targets, dest)
    reference.scatter_blocks(staging.view(U8), expected, dest)
    for got, want in zip(targets, expected, strict=True):
        assert torch.equal(got.view(U8), want)


def test_block_copy_rejects_mixed_dtypes() -> None:
    caches = allocate_kv_caches(2, 4, 8, NUM_KV_HEADS, 16, torch.float8_e5m2, DEVICE)
    ids = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(KernelInputError, match="dtypes must match"):
        scatter_blocks(torch.zeros((2, 2, 2, 8, NUM_KV_HEADS, 16)), caches, ids)
    other = allocate_kv_caches(1, 4, 8, NUM_KV_HEADS, 16, torch.float8_e4m3fn, DEVICE)
    with pytest.raises(KernelInputError, match="dtypes must match"):
        gather_blocks([caches[0], other[0]], ids)
