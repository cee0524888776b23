"""Quantized weights: RTN codes, GGUF block decoding against the gguf package, the packed
int4 / int8 matmuls of ``Linear`` against the dequantized reference, tensor-like behaviour."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels.linear import Linear
from splitserve.kernels.quant import (
    QuantizedWeight,
    int4_packable,
    pack_int4_codes,
    quantize_int4,
    quantize_int8,
)
from splitserve.roles.models.quantize import gguf_codes, gguf_weight


def _w(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


# --------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("group", [32, 128])
def test_int4_rtn_codes_and_error(group: int) -> None:
    w = _w(64, 256)
    qw = quantize_int4(w, group)
    codes = qw.codes()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert qw.scales.shape == (64, 256 // group) and qw.nbytes < w.numel()  # < 1 byte/weight
    # each group's min and max are representable: codes 0 and 15 occur in every group
    grouped = codes.view(64, -1, group)
    assert bool((grouped.amin(-1) == 0).all()) and bool((grouped.amax(-1) == 15).all())
    err = (qw.dequantize() - w).abs().view(64, -1, group)
    assert bool((err <= qw.scales[..., None] / 2 + 1e-6).all())  # round to nearest


def test_int8_rtn_per_channel() -> None:
    w = _w(48, 96)
    qw = quantize_int8(w)
    assert qw.qdata.dtype == torch.int8 and qw.group_size == 96 and qw.scales.shape == (48, 1)
    assert bool((qw.qdata.abs().amax(1) == 127).all())
    assert bool(((qw.dequantize() - w).abs() <= qw.scales / 2 + 1e-7).all())


def test_pack_int4_codes_layout() -> None:
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4_codes(q).tolist() == [[0x21, 0x0F]]


def test_int4_packable_reasons() -> None:
    assert int4_packable((64, 256), 32) is None
    assert "divisible" in str(int4_packable((64, 48), 32))
    assert int4_packable((40, 64), 32) is None  # any N: packed with zero rows to 48
    assert "N=0" in str(int4_packable((0, 64), 32))
    assert "group size" in str(int4_packable((64, 64), 16))


# --------------------------------------------------------------------------- Linear


def _q8_0_like(w: torch.Tensor) -> QuantizedWeight:
    n, k = w.shape
    d = w.view(n, -1, 32).abs().amax(-1) / 127
    q = (w.view(n, -1, 32) / d[..., None]).round().clamp(-128, 127).to(torch.int8).view(n, k)
    q[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)  # code extremes
    return QuantizedWeight("int8", q, d, None, 32, torch.float32, "Q8_0")


def _q6_k_like(w: torch.Tensor) -> QuantizedWeight:
    """int8 codes in [-32, 31] with a scale per 16 values (GGUF Q6_K's form)."""
    n, k = w.shape
    d = w.view(n, -1, 16).abs().amax(-1) / 31
    q = (w.view(n, -1, 16) / d[..., None]).round().clamp(-32, 31).to(torch.int8).view(n, k)
    return QuantizedWeight("int8", q, d, None, 16, torch.float32, "Q6_K")


def _q5_1_like(w: torch.Tensor) -> QuantizedWeight:
    """int8 codes in [0, 31] with a scale and a zero per 32 values (GGUF Q5_1's form)."""
    n, k = w.shape
    lo, hi = w.view(n, -1, 32).amin(-1), w.view(n, -1, 32).amax(-1)
    d = (hi - lo) / 31
    q = ((w.view(n, -1, 32) - lo[..., None]) / d[..., None]).round().clamp(0, 31)
    return QuantizedWeight("int8", q.to(torch.int8).view(n, k), d, lo, 32, torch.float32, "Q5_1")


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("make", ["int4-32", "int4-128", "int8", "q8_0", "q6_k", "q5_1"])
@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_linear_matches_dequantized_reference(rows: int, make: str, kernels: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every int4 / int8 form through the native kernel and through torch's (the fallback
    without a C compiler: packed int4 / int8 ops, or for Q6_K's groups of 16, which none
    takes, the weight dequantized once)."""
    monkeypatch.setenv("SPLITSERVE_CPU_INT4", kernels)
    w = _w(192, 256)
    qw = {
        "int4-32": lambda: quantize_int4(w, 32),
        "int4-128": lambda: quantize_int4(w, 128),
        "int8": lambda: quantize_int8(w),
        "q8_0": lambda: _q8_0_like(w),
        "q6_k": lambda: _q6_k_like(w),
        "q5_1": lambda: _q5_1_like(w),
    }[make]()
    bias = torch.randn(192) * 0.1
    proj = Linear(qw, bias)
    assert proj.quantized and proj.weight is None
    assert (proj._native is not None) == (kernels == "native")
    x = torch.randn(rows, 256)
    ref = F.linear(x, qw.dequantize(), bias)  # fp32 reference of the same codes
    out = proj(x)
    assert out.shape == (rows, 192) and out.dtype == torch.float32
    # bf16 activations, scales and output: ~3 significant digits
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    xb = x.to(torch.bfloat16)
    assert proj(xb).dtype == torch.bfloat16


def test_linear_quantized_handles_empty_and_3d() -> None:
    proj = Linear(quantize_int4(_w(64, 64), 32))
    assert proj(torch.randn(0, 64)).shape == (0, 64)
    assert proj(torch.randn(2, 3, 64)).shape == (2, 3, 64)


@pytest.mark.parametrize("native_kernels", ["native", "torch"])
def test_linear_int4_any_number_of_rows(native_kernels: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """40 output rows (a vocabulary of 49,153 alike): packed with zero rows to a multiple of
    16, the extra outputs dropped; torch's packed kernel and the native one alike."""
    monkeypatch.setenv("SPLITSERVE_CPU_INT4", native_kernels)
    qw = quantize_int4(_w(40, 64), 32)
    proj = Linear(qw)
    x = torch.randn(3, 64)
    y = proj(x)
    assert y.shape == (3, 40) and y.is_contiguous()
    torch.testing.assert_close(y, x @ qw.dequantize().T, atol=2e-2, rtol=2e-2)



# --------------------------------------------------------------------------- tensor-like


def test_int8_weights_with_and_without_zeros_fuse() -> None:
    """A fused QKV of a Q5_1 (zeros) and a Q8_0 (none) tensor: one int8 weight, the second's
    zeros 0; different group sizes (Q6_K's 16) stay apart."""
    a, b = _q5_1_like(_w(32, 64, 1)), _q8_0_like(_w(16, 64, 2))
    fused = torch.cat([a, b])
    assert isinstance(fused, QuantizedWeight) and fused.zeros is not None
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = torch.cat([b, _q6_k_like(_w(16, 64, 3))])
    assert not isinstance(mixed, QuantizedWeight)  # dequantized: formats differ


def test_cat_rows_stays_quantized_and_embedding_gathers_rows() -> None:
    a, b = quantize_int4(_w(32, 64, 1)), quantize_int4(_w(48, 64, 2))
    fused = torch.cat([a, b])
    assert isinstance(fused, QuantizedWeight) and fused.shape == (80, 64)
    torch.testing.assert_close(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    ids = torch.tensor([[3, 40], [79, 0]])
    emb = F.embedding(ids, fused)
    assert emb.shape == (2, 2, 64)
    torch.testing.assert_close(emb, F.embedding(ids, fused.dequantize()), rtol=0, atol=0)


def test_other_torch_functions_see_dequantized_values(caplog: pytest.LogCaptureFixture) -> None:
    qw = quantize_int8(_w(16, 32))
    with caplog.at_level(logging.WARNING):
        out = torch.stack([qw, qw])
    assert out.shape == (2, 16, 32) and torch.equal(out[0], qw.dequantize())
    assert torch.cat([qw, quantize_int4(_w(16, 32))]).shape == (32, 32)  # mixed: dense


def test_to_changes_stand_in_dtype_not_codes() -> None:
    qw = quantize_int4(_w(16, 64))
    b = qw.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.qdata is qw.qdata and qw.to("cpu") is qw
    assert b.dequantize().dtype == torch.bfloat16


# --------------------------------------------------------------------------- GGUF blocks


def _random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks of a GGUF type with finite, positive-ish f16 scales."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    n_f16 = {"Q4_1": 2, "Q4_K": 2, "Q5_1": 2, "Q5_K": 2, "Q2_K": 2}.get(type_name, 1)
    f16 = rng.uniform(-0.05, 0.05, size=(rows, k // block, n_f16)).astype(np.float16)
    at = size - 2 * n_f16 if type_name in ("Q6_K", "Q3_K", "Q2_K") else 0  # d (dmin) last
    raw[..., at : at + 2 * n_f16] = f16.view(np.uint8).reshape(rows, k // block, 2 * n_f16)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
                                       "Q6_K", "Q3_K", "IQ4_NL", "IQ4_XS", "Q2_K"])
def test_gguf_codes_equal_gguf_dequantize(type_name: str) -> None:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, k = 32, 512
    raw = _random_blocks(type_name, rows, k)
    ref = dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, k)
    qw = gguf_weight("blk.0.test", type_name, raw, rows, torch.float32)
    assert qw is not None and qw.source == type_name
    assert qw.group_size == (16 if type_name in ("Q6_K", "Q3_K", "Q2_K") else 32)
    assert qw.kind == ("int4" if type_name.startswith("Q4") else "int8")
    assert (qw.zeros is not None) == (type_name in ("Q4_0", "Q4_1", "Q4_K", "Q5_1", "Q5_K",
                                                    "Q2_K"))
    np.testing.assert_allclose(qw.dequantize().numpy(), ref, rtol=1e-5, atol=1e-6)
    kind, codes, _, _ = gguf_codes(type_name, raw, rows)
    assert codes.shape == (rows, k)
    # served from its codes by quant_matmul.c: the product with the file's own values (to the
    # 16-bit rows and the float16 scales: a K-quant's folded d * scale rounds there)
    from splitserve.kernels import native

    assert native.status().available, native.status().reason
    proj = Linear(qw)
    assert proj._native is not None and proj.format == f"{qw.kind}:{type_name}"
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    want = x.double() @ torch.from_numpy(ref).double().T
    err = float((proj(x).double() - want).abs().max() / want.abs().max())
    assert err < 1e-3, err


def test_a_folded_k_quant_scale_past_float16_falls_back_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Q6_K's folded scale d * scale can leave float16 (d near its top, an int8 scale of 127):
    the packed layout cannot hold it, so torch's path serves the weight (dequantized once for
    Q6_K's groups of 16), with a warning naming it; the product is still the file's."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = _random_blocks("Q6_K", 16, 256).reshape(16, 1, 210)
    raw[..., 208:210] = np.array([6e4], dtype=np.float16).view(np.uint8)  # d
    raw[0, 0, 192] = 127  # the first sub-block's scale: 6e4 * 127 > float16's 65504
    raw = raw.reshape(16, -1)
    qw = gguf_weight("blk.3.ffn_down.weight", "Q6_K", raw, 16, torch.float32)
    assert qw is not None
    with caplog.at_level(logging.WARNING):
        proj = Linear(qw)
    assert proj._native is None and "float16" in caplog.text and "group" in caplog.text
    ref = dequantize(raw, GGMLQuantizationType.Q6_K).reshape(16, 256)
    x = torch.randn(2, 256)
    want = x.double() @ torch.from_numpy(ref).double().T
    torch.testing.assert_close(proj(x).double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_gguf_int4_rows_not_a_multiple_of_16_keep_their_codes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = _random_blocks("Q4_0", 8, 64)  # 8 rows: packed with zero rows to one block of 16
    with caplog.at_level(logging.WARNING):
        qw = gguf_weight("blk.0.odd", "Q4_0", raw, 8, torch.float32)
    assert qw is not None and qw.kind == "int4" and "blk.0.odd" not in caplog.text
    ref = dequantize(raw, GGMLQuantizationType["Q4_0"]).reshape(8, 64)
    np.testing.assert_allclose(qw.dequantize().numpy(), ref, rtol=1e-5, atol=1e-6)
    y = Linear(qw)(torch.ones(2, 64))
    torch.testing.assert_close(y, torch.ones(2, 64) @ torch.from_numpy(ref).T, rtol=2e-2,
                               atol=2e-2)
