"""native.int4_matmul / int8_matmul (``kernels/native/quant_matmul.c``): integer dot products
against activations quantized to 16 bits per group of 32 (8 bits with ``ACT8``). Equal to the float64 product of the
quantized activations and the weight's values; a row's bits never depend on its batch, the
thread count or the dtype path; kernels.linear serves int4 and int8 weights through them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from splitserve.kernels import native
from splitserve.kernels.cpu_features import cpu_flags
from splitserve.kernels.linear import Int4Matmul, Linear, NativeQuantMatmul
from splitserve.kernels.quant import QuantizedWeight, quantize_int4, quantize_int8

SHAPES = [(1, 64, 16), (3, 576, 48), (5, 96, 80), (7, 1536, 576), (33, 576, 960), (70, 128, 272),
          (4, 64, 1), (5, 96, 40), (9, 128, 1001)]
"""(rows, K, N); the last three: N not a multiple of 16 (the last block partial)."""


@pytest.fixture(autouse=True)
def _built() -> None:
    assert native.status().available, native.status().reason  # the suite installs gcc


def _quantized_x(x: torch.Tensor, qmax: int = 32767) -> torch.Tensor:
    """What the kernel multiplies by: each group of 32 rounded to qmax steps of its max."""
    xf = x.float().view(x.shape[0], -1, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    q = torch.round(xf * torch.where(amax > 0, qmax / amax, torch.zeros_like(amax)))
    return (q.clamp(-qmax, qmax) * (amax / qmax)).view(x.shape).double()


def _int4(n: int, k: int, seed: int) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, 32)
    offsets = (qw.zeros - 8 * qw.scales).half().float()  # float16 as packed: exact reference
    qw.scales = qw.scales.half().float()
    qw.zeros = offsets + 8 * qw.scales
    packed = native.pack_int4_weight(qw.codes(), qw.scales, offsets, 32)
    w = qw.codes().double().view(n, k // 32, 32) * qw.scales.double()[..., None] + offsets.double()[..., None]
    return qw, packed, w.view(n, k)


def _int8(n: int, k: int, seed: int, group: int = 32,
          zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed int8 weight and its values: a group of 16 is GGUF Q6_K's (two scales per 32,
    ``HALF``), ``zeros`` Q5_1's ``w = q * d + c`` (``ZERO``), both Q2_K's."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)  # -128 included
    scales = (torch.rand(n, k // group, generator=g) * 1e-2).half().float()
    w = codes.double().view(n, k // group, group) * scales.double()[..., None]
    c = (torch.randn(n, k // group, generator=g) * 0.05).half().float() if zeros else None
    if c is not None:
        w = w + c.double()[..., None]
    return native.pack_int8_weight(codes, scales, group, c), w.view(n, k)


FORMATS = {"int4": 4, "int8": 8, "int8_half": 8 | native.HALF, "int8_zero": 8 | native.ZERO,
           "int8_half_zero": 8 | native.HALF | native.ZERO}
"""quant_matmul's weight formats by name: their ``bits`` (before ``ACT8``)."""


def _weight(fmt: str, n: int, k: int, seed: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(bits, packed weight, its float64 values) of one of ``FORMATS``."""
    if fmt == "int4":
        return 4, *_int4(n, k, seed)[1:]
    return FORMATS[fmt], *_int8(n, k, seed, 16 if "half" in fmt else 32, "zero" in fmt)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_equals_the_product_of_the_quantized_activations(m: int, k: int, n: int, fmt: str) -> None:
    bits, packed, w = _weight(fmt, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    name = f"int{bits & 12}_matmul"
    before = native.calls[name]
    y = native.quant_matmul(bits, x, packed, n)[0]
    assert native.calls[name] == before + 1 and y.dtype == torch.float32
    want = _quantized_x(x) @ w.t()
    scale = float(want.abs().max())
    assert float((y.double() - want).abs().max()) < 1e-5 * scale  # float32 sums of exact parts
    # and within the activations' 16-bit rounding of the unquantized product
    assert float((y.double() - x.double() @ w.t()).abs().max()) < 1e-3 * scale


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_8_bit_activations_are_the_product_of_the_8_bit_rounded_rows(
    m: int, k: int, n: int, fmt: str
) -> None:
    """``ACT8``: each group of 32 rounded to 127 steps of its max (llama.cpp's Q8 rows), so
    the result is that product to float32 sums, and visibly not the 16-bit kernel's (int8
    codes of -128 included: the VNNI path's unsigned q + 128 and its 128 S correction)."""
    bits, packed, w = _weight(fmt, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    name = f"int{bits & 12}_matmul_a8"
    before = native.calls[name]
    y = native.quant_matmul(bits | native.ACT8, x, packed, n)[0]
    assert native.calls[name] == before + 1
    want = _quantized_x(x, 127) @ w.t()
    scale = float(want.abs().max())
    assert float((y.double() - want).abs().max()) < 1e-5 * scale
    # 8-bit rounding is ~256x coarser than 16-bit: far from the 16-bit product
    err16 = float((_quantized_x(x) @ w.t() - y.double()).abs().max())
    assert err16 > 1e-4 * scale, err16


@pytest.mark.parametrize("act8", [0, native.ACT8])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rows_bits_do_not_depend_on_its_batch_or_the_threads(fmt: str, act8: int) -> None:
    n, k = 272, 576
    bits, packed, _ = _weight(fmt, n, k, 1)

    def fn(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        return native.quant_matmul(bits | act8, x, packed, n)[0]

    x = torch.randn(130, k)
    whole = fn(x, packed, n)
    for size in (1, 2, 3, 4, 5, 31, 33, 64):
        for start in (0, 1, 130 - size):
            assert torch.equal(fn(x[start:start + size], packed, n), whole[start:start + size])
    strided = torch.randn(130, 2 * k)[:, ::2]
    strided.copy_(x)
    assert torch.equal(fn(strided, packed, n), whole)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(fn(x, packed, n), whole)
    finally:
        torch.set_num_threads(threads)


def test_bfloat16_in_and_out_and_non_finite_rows() -> None:
    _, packed, w = _int4(48, 64, 2)
    x = torch.randn(4, 64)
    xb = x.to(torch.bfloat16)
    yb = native.int4_matmul(xb, packed, 48)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, native.int4_matmul(xb.float(), packed, 48).to(torch.bfloat16))
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    y = native.int4_matmul(x, packed, 48)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).all()
    # bfloat16 rows out (stored 16 at a time): NaN stays NaN, the rest rounds as torch's cast
    yb = native.int4_matmul(x.to(torch.bfloat16), packed, 48)
    assert torch.isnan(yb[1]).all() and not torch.isfinite(yb[2]).all()
    assert torch.equal(yb[[0, 3]], native.int4_matmul(xb[[0, 3]].float(), packed, 48)
                       .to(torch.bfloat16))
    clean = native.int4_matmul(x[[0, 3]], packed, 48)
    assert torch.equal(y[[0, 3]], clean) and torch.isfinite(clean).all()


def test_bad_operands_are_named() -> None:
    codes = torch.zeros(20, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="N=0"):
        native.pack_int4_weight(codes[:0], torch.ones(0, 2), torch.zeros(0, 2), 32)
    with pytest.raises(ValueError, match="group size 16"):
        native.pack_int4_weight(codes[:16], torch.ones(16, 4), torch.zeros(16, 4), 16)
    with pytest.raises(ValueError, match="float16"):
        native.pack_int4_weight(codes[:16], torch.full((16, 2), 1e6), torch.zeros(16, 2), 32)
    _, packed, _ = _int4(16, 64, 3)
    with pytest.raises(native.KernelInputError, match="16 x 128"):
        native.int4_matmul(torch.randn(1, 128), packed, 16)
    with pytest.raises(native.KernelInputError, match=r"bits 4 or 8 .*either \| ACT8, got 12"):
        native.quant_matmul(12, torch.randn(1, 64), packed, 16)
    for bits in (4 | native.HALF, 4 | native.ZERO, 8 | 128):  # no such formats
        with pytest.raises(native.KernelInputError, match=f"got {bits}"):
            native.quant_matmul(bits, torch.randn(1, 64), packed, 16)
    with pytest.raises(native.KernelInputError, match="16 x 64"):  # int8's size, HALF's layout
        native.quant_matmul(8 | native.HALF, torch.randn(1, 64), _int8(16, 64, 3)[0], 16)
    with pytest.raises(native.KernelInputError, match="16 x 64"):  # HALF's size, both's layout
        native.quant_matmul(8 | native.HALF | native.ZERO, torch.randn(1, 64),
                            _int8(16, 64, 3, 16)[0], 16)
    with pytest.raises(ValueError, match="zero is outside float16"):
        native.pack_int8_weight(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, 4), 16,
                                torch.full((16, 4), 1e6))
    with pytest.raises(ValueError, match="group size 8"):
        native.pack_int8_weight(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, 8), 8)
    with pytest.raises(ValueError, match="act_bits must be 16 or 8, got 4"):
        QuantizedWeight("int8", torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, 1), None,
                        64, act_bits=4)


def test_linear_serves_int4_and_int8_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row count through one kernel (no expansion); SPLITSERVE_CPU_INT4=torch keeps
    torch's packed kernels; a group of 128 is served with its scales repeated per 32."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 256, generator=g) * 0.05
    x = torch.randn(300, 256, generator=g)
    for qw in (quantize_int4(w, 128), quantize_int8(w)):
        proj = Linear(qw)
        assert type(proj._quantized) is NativeQuantMatmul and proj._expand_from == 0
        before = sum(native.calls[f"int{b}_matmul"] for b in (4, 8))
        many = proj(x)
        assert sum(native.calls[f"int{b}_matmul"] for b in (4, 8)) == before + 1
        assert torch.equal(proj(x[7:8]), many[7:8])  # 300 rows or one: the same bits
        want = x.double() @ qw.dequantize(torch.float64).t()
        # RTN's float32 scales and zeros are held in float16 (2^-11 relative, each group's
        # rounding shared by its 128 values): ~1.4e-3 of the output's scale here
        assert float((many.double() - want).abs().max()) < 3e-3 * float(want.abs().max())
    monkeypatch.setenv("SPLITSERVE_CPU_INT4", "torch")
    assert type(Linear(quantize_int4(w, 32))._quantized) is Int4Matmul
    monkeypatch.setenv("SPLITSERVE_CPU_INT4", "fast")
    with pytest.raises(ValueError, match="SPLITSERVE_CPU_INT4"):
        Linear(quantize_int4(w, 32))


_SCALAR_BUILD = r"""
import json, sys
sys.path.insert(0, ".")
from splitserve.kernels import native
from tests.kernels.test_native import CASES, _case, quant_results
attention = []
for dtype, head_dim, heads, block_size, lens, window, cap in CASES:
    q, cache, tables, ctx = _case(dtype, head_dim, heads, block_size, lens)
    got = native.paged_decode_attention(q, cache, tables, ctx, head_dim ** -0.5, window, cap)
    attention.append(got.float().tolist())
print(json.dumps({"lanes": native.int4_lanes(), "reason": native.status().reason,
                  "attention": attention, "attention_calls": native.calls["paged_decode_attention"],
                  "quant": quant_results()}))
"""


@pytest.mark.parametrize("cflags,lanes", [
    ("-march=x86-64", 1),
    pytest.param("-mno-avx512vnni", 16, marks=pytest.mark.skipif(
        "avx512bw" not in cpu_flags(), reason="an AVX-512 build needs an AVX-512 machine")),
])
def test_a_build_without_vectors_gives_the_same_bits(tmp_path: Path, cflags: str,
                                                     lanes: int) -> None:
    """-march=x86-64 (no AVX2) builds the scalar path, -mno-avx512vnni AVX-512 without byte
    dot products (vpmaddubsw + vpmaddwd): the same integer sums and FMAs, so the same bits
    as this machine's build (the AVX2 build: test_native.py)."""
    from tests.kernels.test_native import CASES, _case, quant_results, run_other_build

    out = run_other_build(_SCALAR_BUILD, cflags, tmp_path)
    assert out["lanes"] == lanes and cflags in out["reason"], out
    if lanes == 16 and shutil.which("objdump"):  # the byte dot product really is not used
        dump = subprocess.run(["objdump", "-d", out["reason"].split()[1]], capture_output=True,
                              text=True, timeout=60, check=True).stdout
        assert "zmm" in dump and "vpdpbusd" not in dump
    # decode attention too: 16 lanes as 4 SSE vectors (x86-64) or one AVX-512 register, the
    # same sums in the same pairs as this machine's build
    assert out["attention_calls"] == len(CASES), out["attention_calls"]
    for case, got in zip(CASES, out["attention"], strict=True):
        q, cache, tables, ctx = _case(*case[:5])
        here = native.paged_decode_attention(q, cache, tables, ctx, case[1] ** -0.5, *case[5:])
        assert torch.equal(here.float(), torch.tensor(got)), (cflags, case[:4])
    here = quant_results()  # every format, 16- and 8-bit rows: the same bits
    assert len(here) == 18 and here == out["quant"], [k for k in here if here[k] != out["quant"][k]]


@pytest.mark.parametrize("bits", [4, 8, 4 | native.ACT8, 8 | native.ACT8, 8 | native.HALF,
                                  8 | native.ZERO, 8 | native.HALF | native.ACT8,
                                  8 | native.ZERO | native.ACT8, 8 | native.HALF | native.ZERO,
                                  8 | native.HALF | native.ZERO | native.ACT8])
def test_a_partial_last_block_gives_the_bits_of_a_whole_one(bits: int) -> None:
    """N = 45: the weight is packed with 3 zero rows to 48; each output is the one a 48-row
    weight holding the same 45 rows (and 3 others) gives it, bit for bit, and nothing more is
    written (the result has 45 columns, float32 and bfloat16)."""
    g = torch.Generator().manual_seed(5)
    n, k = 45, 96
    if bits & ~native.ACT8 == 4:
        codes = torch.randint(0, 16, (48, k), generator=g, dtype=torch.uint8)
        scales, offsets = torch.rand(48, 3, generator=g) * 0.01, torch.randn(48, 3, generator=g) * 0.05
        odd = native.pack_int4_weight(codes[:n], scales[:n], offsets[:n], 32)
        whole = native.pack_int4_weight(codes, scales, offsets, 32)
    else:
        codes = torch.randint(-128, 128, (48, k), generator=g, dtype=torch.int8)
        group = 16 if bits & native.HALF else 32
        scales = torch.rand(48, k // group, generator=g) * 0.01
        zeros = torch.randn(48, k // group, generator=g) * 0.05 if bits & native.ZERO else None
        odd = native.pack_int8_weight(codes[:n], scales[:n], group,
                                      None if zeros is None else zeros[:n])
        whole = native.pack_int8_weight(codes, scales, group, zeros)
    assert odd.numel() == whole.numel()  # padded to the same 3 blocks
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, k, generator=g).to(dtype)  # MT tiles and a 1-row rest
        y = native.quant_matmul(bits, x, odd, n)[0]
        assert y.shape == (37, n) and y.dtype == dtype
        assert torch.equal(y, native.quant_matmul(bits, x, whole, 48)[0][:, :n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_a_fused_norm_gives_the_bits_of_rms_norm_then_the_matmul(
    dtype: torch.dtype, with_residual: bool
) -> None:
    """quant_matmul's rms_norm prologue runs rms_norm's own row code: the projection gets the
    same input, and the residual sum comes back as rms_norm returns it."""
    _, packed, _ = _int4(80, 96, 4)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 96, generator=g).to(dtype)
    residual = torch.randn(6, 96, generator=g).to(dtype) if with_residual else None
    weight = (torch.rand(96, generator=g) + 0.5).to(dtype)
    normed, want_res = native.rms_norm(x, weight, 1e-5, residual)
    want = native.int4_matmul(normed, packed, 80)
    got, got_res = native.quant_matmul(4, x, packed, 80, "rms_norm", weight, 1e-5, residual)
    assert torch.equal(got, want)
    assert (got_res is None) == (want_res is None)
    if want_res is not None:
        assert got_res is not None and torch.equal(got_res, want_res)


def test_a_fused_activation_gives_the_values_of_the_two_ops() -> None:
    """float32: native.silu_and_mul's bits; bf16: torch's two rounded ops to their rounding."""
    packed, _ = _int8(48, 64, 5)
    gate_up = torch.randn(5, 128, generator=torch.Generator().manual_seed(3)) * 3
    assert torch.equal(native.quant_matmul(8, gate_up, packed, 48, "silu")[0],
                       native.int8_matmul(native.silu_and_mul(gate_up), packed, 48))
    assert torch.equal(native.quant_matmul(8, gate_up, packed, 48, "gelu_tanh")[0],
                       native.int8_matmul(native.gelu_tanh_and_mul(gate_up), packed, 48))
    gb = gate_up.bfloat16()
    fused = native.quant_matmul(8, gb, packed, 48, "silu")[0].float()
    two_ops = native.int8_matmul(torch.nn.functional.silu(gb[:, :64]) * gb[:, 64:], packed, 48)
    torch.testing.assert_close(fused, two_ops.float(), rtol=2e-2, atol=2e-2 * float(fused.abs().max()))


def test_linear_fuses_the_norm_and_the_activation_where_it_can() -> None:
    from splitserve.kernels import cpu_ops

    class Norm:  # what blocks.RMSNorm offers
        def __init__(self, weight: torch.Tensor, ops: object) -> None:
            self.weight, self.eps, self.ops = weight, 1e-6, ops

        def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
            return self.ops.rms_norm(x, self.weight, self.eps, residual)  # type: ignore[attr-defined]

    g = torch.Generator().manual_seed(11)
    proj = Linear(quantize_int4(torch.randn(64, 96, generator=g) * 0.05, 32))
    x, residual = torch.randn(3, 96, generator=g), torch.randn(3, 96, generator=g)
    norm = Norm(torch.rand(96, generator=g) + 0.5, cpu_ops)
    before = native.calls["rms_norm"]
    y, new_residual = proj.normed(x, residual, norm)
    assert native.calls["rms_norm"] == before  # no separate norm call
    h, want_residual = cpu_ops.rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(y, proj(h)) and torch.equal(new_residual, want_residual)
    y0, none = proj.normed(x, None, norm)
    assert none is None and torch.equal(y0, proj(cpu_ops.rms_norm(x, norm.weight, norm.eps)[0]))
    # a norm from other ops (the pure-torch reference) is run as it is, then the projection
    from splitserve.kernels import reference

    ref_norm = Norm(norm.weight, reference)
    y_ref, _ = proj.normed(x, residual, ref_norm)
    assert torch.equal(y_ref, proj(reference.rms_norm(x, norm.weight, norm.eps, residual)[0]))
    down = Linear(quantize_int8(torch.randn(32, 48, generator=g)))
    gate_up = torch.randn(4, 96, generator=g)
    assert torch.equal(down.gated(gate_up, "silu", native.silu_and_mul),
                       down(native.silu_and_mul(gate_up)))
