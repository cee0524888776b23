"""kernels.linear.Linear: the oneDNN-packed CPU projection and the native kernel of small
weights equal F.linear to fp32 rounding (the native one with a row's bits independent of its
batch); quantized weights serve many rows through the weight expanded to bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import native
from splitserve.kernels.cpu_features import bf16_support
from splitserve.kernels.linear import (
    Linear,
    _int4pack_block,
    packed_linear_available,
    quantized_matmul,
)
from splitserve.kernels.quant import QuantizedWeight, quantize_int4, quantize_int8


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)


def test_packed_on_cpu_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "WIDE_LINEAR_MAX", native.SMALL_LINEAR_MAX)  # either build
    w, _ = _weights(640, 512)  # above the largest weight the native kernel takes
    assert w.numel() > native.linear_max()
    assert packed_linear_available(w) == torch.backends.mkldnn.is_available()
    proj = Linear(w)
    assert proj.packed == packed_linear_available(w) and not proj.small
    assert not Linear(w[:96, :64].to(torch.bfloat16)).small


def test_bfloat16_weights_are_packed_where_bf16_is_native() -> None:
    """bf16 weights take oneDNN's reordered weight where the CPU has native bf16 (F.linear
    ran ~1.7x slower at one row on a Zen 5), F.linear elsewhere; the values are F.linear's to
    bf16 rounding either way."""
    w, b = _weights(640, 512)
    wb, bb = w.to(torch.bfloat16), b.to(torch.bfloat16)
    native_bf16 = bf16_support().native and torch.backends.mkldnn.is_available()
    proj = Linear(wb, bb)
    assert proj.packed == native_bf16 == packed_linear_available(wb)
    if native_bf16:
        assert proj.weight is not None and proj.weight.is_mkldnn  # the reordered copy
    for rows in (1, 7, 64, 300):
        x = torch.randn(rows, 512).to(torch.bfloat16)
        got = proj(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 640)
        torch.testing.assert_close(got.float(), F.linear(x, wb, bb).float(), rtol=2e-2, atol=2e-2)
    if proj.packed:  # float32 rows into a bf16 packed weight: named, not a oneDNN error
        with pytest.raises(TypeError, match="dtype"):
            proj(torch.randn(3, 512))


def test_small_weights_take_the_native_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.status().available, native.status().reason  # the suite installs gcc
    monkeypatch.setattr(native, "WIDE_LINEAR_MAX", native.SMALL_LINEAR_MAX)  # either build
    w = torch.randn(4096, 64)  # 2^18 values, the largest taken (so limited)
    assert w.numel() == native.linear_max()
    proj = Linear(w)
    assert proj.small and not proj.packed and proj.weight is not None
    assert proj.weight.shape == (64 * 4096,) and proj.weight.is_contiguous()
    # packed: W^T in blocks of 64 columns, each [K, 64] contiguous
    assert torch.equal(proj.weight[: 64 * 64].view(64, 64), w[:64].t())
    assert torch.equal(proj.weight[64 * 64 : 2 * 64 * 64].view(64, 64), w[64:128].t())
    before = native.calls["linear_f32"]
    x = torch.randn(5, 64)
    torch.testing.assert_close(proj(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert native.calls["linear_f32"] == before + 1
    assert not Linear(torch.randn(4097, 64)).small  # one row more: oneDNN
    monkeypatch.setenv("SPLITSERVE_CPU_LINEAR", "onednn")
    assert not Linear(w).small and Linear(w).packed == packed_linear_available(w)


def test_the_limit_follows_the_build() -> None:
    """AVX-512 builds take weights up to WIDE_LINEAR_MAX (a medium model's projections and a
    small vocabulary's head); AVX2 builds, not measured on AVX2-only hardware, up to
    SMALL_LINEAR_MAX (their build is checked in test_native.py)."""
    from splitserve.kernels.cpu_features import cpu_flags

    wide = "avx512f" in cpu_flags() and "-march=haswell" not in native.status().reason
    assert native.linear_max() == (native.WIDE_LINEAR_MAX if wide else native.SMALL_LINEAR_MAX)
    assert Linear(torch.randn(768, 2048)).small == wide  # a medium model's down projection
    assert not Linear(torch.randn(native.SMALL_LINEAR_MAX + 1, 1)).small or wide


@pytest.mark.parametrize("m", [1, 5, 6, 7, 16, 23, 64, 200])
def test_prefetching_tiles_give_the_same_bits_as_one_row_at_a_time(m: int) -> None:
    """Several column blocks (so each pass prefetches the next block) and 1 to 34 passes of
    rows: every row equals that row computed alone, and float64 to fp32 rounding."""
    w, b = _weights(64 * 5 + 16, 96, seed=m)  # 5 full blocks and a 16-wide tail block
    packed = native.pack_linear_weight(w)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m))
    y = native.small_linear(x, packed, w.shape[0], b)
    for i in range(m):
        assert torch.equal(y[i : i + 1], native.small_linear(x[i : i + 1], packed, w.shape[0], b))
    ref = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n, k", [(200, 72), (40, 33), (7, 3), (64, 1), (16, 128)])
def test_a_rows_bits_do_not_depend_on_its_batch(n: int, k: int) -> None:
    """Each output is one multiply-add chain over k whatever the rows around it, the tiling
    (6 rows at a time, then the rest in one pass), the column tail or the threads: decode rows, verify
    rows and prompt rows through one weight agree bit for bit."""
    w, b = _weights(n, k, seed=n + k)
    proj = Linear(w, b)
    assert proj.small
    x = torch.randn(130, k, generator=torch.Generator().manual_seed(1))
    whole = proj(x)  # 130 x n x k >= 2^18 multiply-adds for the larger shapes: the thread team
    torch.testing.assert_close(whole, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for size in (1, 2, 3, 5, 17, 64, 129):
        for start in (0, 1, 130 - size):
            assert torch.equal(proj(x[start:start + size]), whole[start:start + size]), (size, start)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(proj(x), whole)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ["default", "onednn"])
@pytest.mark.parametrize("rows", [0, 1, 3, 17, 64, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_f_linear(rows: int, with_bias: bool, path: str,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "onednn":
        monkeypatch.setenv("SPLITSERVE_CPU_LINEAR", "onednn")
    w, b = _weights(200, 72)
    bias = b if with_bias else None
    proj = Linear(w, bias)
    x = torch.randn(rows, 72)
    out = proj(x)
    assert out.shape == (rows, 200) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_strided_and_batched_inputs() -> None:
    w, _ = _weights(48, 32)
    proj = Linear(w)
    x = torch.randn(10, 64)[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(proj(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 5, 32)
    torch.testing.assert_close(proj(x3), F.linear(x3, w), rtol=1e-5, atol=1e-5)


def test_packing_does_not_alias_the_weight() -> None:
    w, _ = _weights(16, 8)
    proj = Linear(w.clone())
    x = torch.randn(3, 8)
    before = proj(x)
    w.zero_()
    torch.testing.assert_close(proj(x), before)


def test_dense_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CPU_LINEAR", "dense")
    w, _ = _weights(16, 8)
    proj = Linear(w)
    assert not proj.packed and proj.weight is w
    x = torch.randn(4, 8)
    assert torch.equal(proj(x), F.linear(x, w))


def test_bad_input_named() -> None:
    w, b = _weights(16, 8)
    with pytest.raises(ValueError, match="2-D"):
        Linear(w[0])
    with pytest.raises(ValueError, match="bias"):
        Linear(w, b[:3])
    proj = Linear(w)
    with pytest.raises(ValueError, match="8 input features"):
        proj(torch.randn(2, 9))
    if proj.packed or proj.small:
        with pytest.raises(TypeError, match="dtype"):
            proj(torch.randn(2, 8, dtype=torch.float64))


# --------------------------------------------------------------------------- quantized: many rows


@pytest.fixture
def torch_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's packed kernels for int4 / int8 (the native ones serve every row count and never
    expand: tests/kernels/test_native_quant.py)."""
    monkeypatch.setenv("SPLITSERVE_CPU_INT4", "torch")


def _quantized_weights(n: int, k: int) -> dict[str, QuantizedWeight]:
    w, _ = _weights(n, k, seed=3)
    g = torch.Generator().manual_seed(4)
    q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return {
        "int4": quantize_int4(w, 32),
        "int8": quantize_int8(w),
        "q8_0": QuantizedWeight("int8", q8, torch.rand(n, k // 32, generator=g) * 1e-3, None,
                                32, torch.float32, "Q8_0"),
    }


@pytest.mark.parametrize("kind", ["int4", "int8", "q8_0"])
def test_expanded_weight_is_the_dequantized_weight(kind: str, torch_quant: None) -> None:
    """What prompt rows multiply by: the same codes, one bf16 rounding from the float values
    (int4's scales and zeros as the packed kernel holds them, in bf16)."""
    qw = _quantized_weights(192, 128)[kind]
    matmul = quantized_matmul(qw)
    if not matmul.expandable:
        pytest.skip(f"torch's int4 packed layout on {torch.backends.cpu.get_cpu_capability()} "
                    "is not one this build decodes: prompt rows stay on the packed kernel")
    got = matmul.dense_t(0, 192).float()
    assert got.shape == (128, 192)
    want = qw.dequantize().float().t()
    # bf16 rounding of the value (2^-8 relative) plus int4's bf16 scale and zero
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    block = matmul.expand_block
    part = matmul.dense_t(block, 3 * block)  # a range of output rows: those columns
    assert part.shape == (128, 2 * block) and part.dtype == torch.bfloat16
    assert torch.equal(part.float(), got[:, block : 3 * block])


def test_int4_packed_layout_is_decoded_on_this_cpu() -> None:
    """The layout probe finds torch's block on the x86 builds we run (AVX-512 and AVX2);
    elsewhere it must say None rather than guess."""
    block = _int4pack_block()
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2"):
        assert block in (64, 32)
    codes = torch.randint(0, 16, (block or 64, 64), dtype=torch.int32)
    if block:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        halves = packed.view(1, 64, block // 2)
        decoded = torch.cat([halves & 15, halves >> 4], -1).transpose(1, 2).reshape(block, 64)
        assert torch.equal(decoded.int(), codes)


@pytest.mark.parametrize("kind", ["int4", "int8", "q8_0"])
def test_many_rows_take_the_expanded_weight(kind: str, monkeypatch: pytest.MonkeyPatch,
                                           torch_quant: None) -> None:
    """From the row threshold on, a call expands the weight once and runs one bf16 GEMM (the
    packed kernel is not called); below it, the packed kernel alone. Both give the same
    product to bf16 rounding."""
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_EXPAND", "dequant")
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_EXPAND_MIN_ROWS", "8")
    proj = Linear(_quantized_weights(192, 128)[kind])
    if not proj._quantized.expandable:
        pytest.skip("packed int4 layout not decoded here")
    threshold = 8 * proj._quantized.expand_cost
    calls = {"expand": 0, "packed": 0}
    expand, packed = proj._quantized.dense_t, proj._quantized.__call__

    def counted_expand(start: int, stop: int) -> torch.Tensor:
        calls["expand"] += 1
        return expand(start, stop)

    class Packed:
        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner = inner

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.inner, name)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            calls["packed"] += 1
            return packed(x)

    proj._quantized.dense_t = counted_expand  # type: ignore[method-assign]
    proj._quantized = Packed(proj._quantized)  # type: ignore[assignment]
    x = torch.randn(threshold + 5, 128)
    many = proj(x)
    assert calls == {"expand": 1, "packed": 0}
    few = proj(x[: threshold - 1])
    assert calls == {"expand": 1, "packed": 1}
    assert many.dtype == torch.float32 and many.shape == (threshold + 5, 192)
    # bf16 products and outputs on either side: agree to ~1% of the output's scale
    scale = float(few.abs().max())
    torch.testing.assert_close(many[: threshold - 1], few, rtol=0, atol=1e-2 * scale)


def test_packed_opt_out_keeps_every_row_on_the_packed_kernel(
    monkeypatch: pytest.MonkeyPatch, torch_quant: None,
) -> None:
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_EXPAND", "packed")
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_EXPAND_MIN_ROWS", "1")
    proj = Linear(_quantized_weights(192, 128)["int4"])
    proj._quantized.dense_t = lambda *_: pytest.fail("expanded despite the opt-out")  # type: ignore[method-assign]
    assert proj(torch.randn(64, 128)).shape == (64, 192)


@pytest.mark.parametrize("kind", ["int4", "int8", "q8_0"])
def test_a_large_weight_is_expanded_a_slice_at_a_time(
    kind: str, monkeypatch: pytest.MonkeyPatch, torch_quant: None
) -> None:
    """A weight larger than the expansion budget (a logits head) is expanded and multiplied
    in slices of output rows, so the scratch stays bounded: same product as in one piece."""
    from splitserve.kernels import linear

    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_EXPAND", "dequant")
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_EXPAND_MIN_ROWS", "1")
    proj = Linear(_quantized_weights(384, 128)[kind])
    if not proj._quantized.expandable:
        pytest.skip("packed int4 layout not decoded here")
    x = torch.randn(40, 128)
    whole = proj(x)
    seen: list[tuple[int, int]] = []
    expand = proj._quantized.dense_t

    def recorded(start: int, stop: int) -> torch.Tensor:
        seen.append((start, stop))
        return expand(start, stop)

    proj._quantized.dense_t = recorded  # type: ignore[method-assign]
    monkeypatch.setattr(linear, "_EXPAND_ELEMS", 128 * 128)  # 128 rows of K=128 at a time
    sliced = proj(x)
    assert seen == [(0, 128), (128, 256), (256, 384)]
    assert torch.equal(sliced, whole)
