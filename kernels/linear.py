"""Projections with their weight format chosen at load: float (oneDNN-packed on CPU), int8, int4.

``Linear(weight, bias)`` takes a float tensor or a ``kernels.quant.QuantizedWeight`` and
lays it out once for its device; the model code calls ``proj(x)`` the same way for every
format. What each format runs (measured in ``bench/engine_throughput.py``):

- float32 on CPU: oneDNN's inner product over a weight reordered once into its blocked
  layout (MKL's sgemm runs a generic, slower path on this class of AMD AVX-512 machine);
  equal to ``F.linear`` to float32 rounding. Weights of at most ``native.linear_max()``
  values (2^24 in an AVX-512 build: a medium model's projections, a small vocabulary's head;
  2^18 in an AVX2 one) run the native kernel
  (``native.small_linear``, weight packed in blocks of 64 columns) instead: oneDNN's fixed
  ~20 us a call was most of such a model's decode step, and its arithmetic does not depend on the row
  count. ``SPLITSERVE_CPU_LINEAR=onednn`` keeps oneDNN for every float32 weight, ``dense``
  keeps ``F.linear``.
- bfloat16 on CPU where bf16 is native (avx512_bf16 / amx_bf16 and the probe): the same
  oneDNN inner product over a weight reordered once (``F.linear`` over the plain layout was
  1.7x slower at one row, 1.2x at 64 on a 2-core Zen 5, equal from 512 rows, and gave the
  same bits at each row count measured).
- bfloat16 elsewhere, float16, other devices: ``F.linear``.
- int4 and int8 on CPU where the native kernels build (default; ``SPLITSERVE_CPU_INT4=torch``
  keeps torch's kernels below): ``native.int4_matmul`` / ``int8_matmul``, integer dot
  products against each row's activations quantized to 16 bits per group of 32 (8 bits for
  int4 weights marked ``act_bits=8``: ``quantization="w4a8"``), the same
  kernel for every row count (no expansion, so a row's bits never depend on its batch).
  Against torch's int4 kernel here: 1.5-2.7x at one row, 2x from 64 rows on; next-token KL
  of the embedded Q4_1 model against its fp32-dequantized reference 0.0012 (torch's bf16
  path: 0.0015; int8 activations, as llama.cpp uses: 0.0047).
- int4 (GGUF Q4_0 / Q4_1 / Q4_K, RTN int4) otherwise: torch's packed int4 weight-only matmul
  (``_convert_weight_to_int4pack_for_cpu`` once, ``_weight_int4pack_mm_for_cpu`` per call),
  bfloat16 activations, scale and zero per group; on CUDA the Triton int4 GEMM
  (``kernels/int4_gemm.py``) over the same codes.
- int8 per channel (RTN int8): torch's ``_weight_int8pack_mm``, bfloat16 activations.
- int8 in groups (GGUF Q8_0): each code ``q = 16 * hi + lo`` is split into two 4-bit halves
  served as one int4 matmul over twice the rows (``hi`` rows with scale ``16 * d``, ``lo``
  rows with zero ``8 * d``) whose two halves are added: the file's values, no re-rounding
  of codes.
- Many rows through a quantized weight (a prompt chunk, a large batch): torch's packed
  kernels loop over rows, so their cost grows with every row (a 2,048-token chunk through
  int4 ran 2-3x slower than the same GEMM in bfloat16). From ``_expand_min_rows()`` rows on
  (128; times ``expand_cost``) a call expands the weight for itself (float32
  ``q * scale + zero``, one rounding to bfloat16, into a reused per-thread scratch buffer)
  and runs oneDNN's bfloat16 GEMM. int4 is decoded from torch's packed layout itself, so no
  second copy of the codes is kept. The two paths agree to bf16 rounding, not bit for bit:
  with quantized weights a token can differ at a near-tie with its step's row count. Only
  where the processor has native bf16; ``SPLITSERVE_CPU_QUANT_EXPAND`` = ``packed`` keeps
  every row on the packed kernels, ``dequant`` expands anywhere.

The quantized matmuls take bfloat16 activations whatever the model's dtype (their float32
kernels are scalar code); inputs are cast in and the result cast back. Off CPU a quantized
int8 weight is dequantized once at load (with a warning) until a device kernel serves it.

    proj = Linear(weight, bias)   # weight [N, K] (tensor or QuantizedWeight), bias [N] or None
    y = proj(x)                   # x [T, K] -> [T, N]
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from splitserve import env
from splitserve.kernels import native
from splitserve.kernels.cpu_features import bf16_support
from splitserve.kernels.quant import (
    INT4_GROUP_SIZES,
    INT4_ROW_MULTIPLE,
    QuantizedWeight,
    int4_packable,
    pack_int4_codes,
    pad_rows,
)

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

_PACK_BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; fastest at every T measured
_PACK_ROWS = 4096  # int4 packing runs over this many rows at a time (bounds the int32 copy)
_QUANT_ACT = torch.bfloat16  # activation dtype of the packed quantized kernels
_EXPAND_ELEMS = 4 << 20  # weights expanded at a time (16 MB of float32 scratch, 8 MB of bf16)
_NATIVE_ACT = (torch.float32, torch.bfloat16)  # activation dtypes quant_matmul.c takes


class NormLike(Protocol):
    """What ``Linear.normed`` needs of a norm (``roles/models/blocks.RMSNorm``)."""

    weight: Tensor
    eps: float
    ops: Any

    def __call__(self, x: Tensor, residual: Tensor | None = None
                 ) -> tuple[Tensor, Tensor | None]: ...


def _expand_min_rows() -> int:
    return int(env.SPLITSERVE_CPU_QUANT_EXPAND_MIN_ROWS.get())


def quant_expansion_enabled() -> bool:
    """Whether quantized weights serve many rows by expansion + bf16 GEMM here."""
    choice = env.SPLITSERVE_CPU_QUANT_EXPAND.get().lower()
    if choice in ("packed", "dequant"):
        return choice == "dequant"
    return bf16_support().native


def packed_linear_available(weight: Tensor) -> bool:
    """True when a float ``weight`` will be served by the oneDNN-packed path."""
    if env.SPLITSERVE_CPU_LINEAR.get().lower() == "dense":
        return False
    return (
        weight.device.type == "cpu"
        and (weight.dtype == torch.float32
             or (weight.dtype == torch.bfloat16 and bf16_support().native))
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """``y = x @ weight.T + bias`` with the weight laid out for the device once."""

    def __init__(self, weight: Tensor | QuantizedWeight, bias: Tensor | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"Linear weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(
                f"Linear bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        self.out_features: int = int(weight.shape[0])
        self.in_features: int = int(weight.shape[1])
        self.dtype, self.device = weight.dtype, weight.device
        self.bias = bias
        self.packed = False
        self.small = False  # float32 weight small enough for the native kernel (packed)
        self.weight: Tensor | None = None
        self._quantized: Matmul
        self._expand_from = 0  # rows from which a quantized call expands its weight (0: never)
        self._native: NativeQuantMatmul | None = None  # int4 / int8 through quant_matmul.c
        if isinstance(weight, QuantizedWeight) and weight.device.type != "cpu":
            if weight.kind == "int4" and weight.device.type == "cuda":
                self.format = f"int4:{weight.source}:triton"
                self._quantized = TritonInt4Matmul(weight)
                return
            logger.warning("no %s kernel on %s yet: dequantizing", weight.kind, weight.device)
            weight = weight.dequantize()
        if isinstance(weight, QuantizedWeight):
            self.format = weight.kind if weight.source == "rtn" else f"{weight.kind}:{weight.source}"
            self._quantized = quantized_matmul(weight)
            if isinstance(self._quantized, NativeQuantMatmul):
                self._native = self._quantized
                if weight.act_bits != 16:  # served so: torch's kernels take bf16 activations
                    self.format += f":a{weight.act_bits}"
            self._expand_from = (
                _expand_min_rows() * self._quantized.expand_cost
                if quant_expansion_enabled() and self._quantized.expandable else 0
            )
            return
        self.format = str(weight.dtype).removeprefix("torch.")
        self.small = (env.SPLITSERVE_CPU_LINEAR.get().lower() not in ("dense", "onednn")
                      and native.small_linear_available(weight))
        if self.small:  # packed once for the kernel (a copy: never aliases the input)
            self.weight = native.pack_linear_weight(weight)
            self.bias = None if bias is None else bias.contiguous()
            return
        self.packed = packed_linear_available(weight)
        if self.packed:
            with torch.no_grad():
                self.weight = torch.ops.mkldnn._reorder_linear_weight(
                    weight.contiguous(), _PACK_BATCH_HINT
                )
        else:
            self.weight = weight

    @property
    def quantized(self) -> bool:
        return self.weight is None

    def __call__(self, x: Tensor) -> Tensor:
        if (q := self._native) is not None and x.dim() == 2 and x.shape[1] == self.in_features \
                and x.dtype in _NATIVE_ACT:  # the decode path: one frame to the kernel
            y = native.quant_matmul(q.bits, x, q.packed, q.rows)[0]
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects {self.in_features} input features, got {x.shape[-1]}")
        if not self.packed and not self.small and self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if (self.packed or self.small) and x.dtype != self.dtype:
            raise TypeError(f"Linear input dtype {x.dtype} does not match weight dtype {self.dtype}")
        if x.shape[0] == 0 or x.dim() != 2:
            lead = x.shape[:-1]
            out = self(x.reshape(-1, self.in_features)) if x.numel() else x.new_empty(0, self.out_features)
            return out.reshape(*lead, self.out_features)
        if self.quantized:
            y = self._quantized_rows(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.small:
            return native.small_linear(x, self.weight, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.weight, self.bias, "none", [], ""
        )

    def normed(self, x: Tensor, residual: Tensor | None, norm: NormLike
               ) -> tuple[Tensor, Tensor | None]:
        """``self(h)`` with ``h, new_residual = norm(x, residual)``: the same values, in one
        native call where the weight takes quant_matmul.c and the norm is the native
        ``rms_norm`` (the projection's input computed in the call, never written out)."""
        q = self._native
        if (q is None or norm.ops.rms_norm is not native.rms_norm or x.dim() != 2
                or x.dtype not in _NATIVE_ACT or x.shape[1] != self.in_features
                or x.stride(1) != 1 or norm.weight.dtype != x.dtype
                or not norm.weight.is_contiguous() or norm.weight.shape != (self.in_features,)
                or (residual is not None and (residual.shape != x.shape
                                              or residual.dtype != x.dtype
                                              or residual.stride(1) != 1))):
            h, new_residual = norm(x, residual)
            return self(h), new_residual
        y, new_residual = native.quant_matmul(q.bits, x, q.packed, q.rows, "rms_norm",
                                              norm.weight, norm.eps, residual)
        return (y if self.bias is None else y + self.bias.to(y.dtype)), new_residual

    def gated(self, x: Tensor, act: str, fallback: Callable[[Tensor], Tensor]) -> Tensor:
        """``self(fallback(x))`` for x = [gate | up] and ``act`` its activation (``silu`` /
        ``gelu_tanh``): in one native call where the weight takes quant_matmul.c (the
        activation's values rounded as torch's two ops round them)."""
        q = self._native
        if (q is None or act not in native.PROLOGUES or x.dim() != 2
                or x.dtype not in _NATIVE_ACT or x.shape[1] != 2 * self.in_features):
            return self(fallback(x))
        y = native.quant_matmul(q.bits, x, q.packed, q.rows, act)[0]
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _quantized_rows(self, x: Tensor) -> Tensor:
        """Few rows through the packed kernel; many through the weight dequantized for
        this call and a bf16 GEMM."""
        if not self._expand_from or x.shape[0] < self._expand_from:
            return self._quantized(x)
        xa, q, n = _to_act(x), self._quantized, self.out_features
        # output rows per expansion (a few integer ops, on calls of >= 128 rows only): the
        # scratch stays under _EXPAND_ELEMS weights
        block = q.expand_block
        step = max(block, _EXPAND_ELEMS // self.in_features // block * block)
        if step >= n:
            return torch.matmul(xa, q.dense_t(0, n)).to(x.dtype)
        y = x.new_empty(x.shape[0], n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            y[:, start:stop] = torch.matmul(xa, q.dense_t(start, stop))
        return y


# --------------------------------------------------------------------------- quantized matmuls


class Matmul(Protocol):
    def __call__(self, x: Tensor) -> Tensor:
        """x [T, K] -> [T, N] in x's dtype."""
        ...

    @property
    def expandable(self) -> bool:
        """Whether ``dense_t`` can expand this weight here."""
        ...

    @property
    def expand_cost(self) -> int:
        """The expansion's cost per weight relative to int4's (scales the row threshold)."""
        ...

    @property
    def expand_block(self) -> int:
        """``dense_t`` takes output-row ranges on multiples of this."""
        ...

    def dense_t(self, start: int, stop: int) -> Tensor:
        """Output rows ``start:stop`` of the weight as bf16 [K, stop - start], in a scratch
        buffer that the next expansion on this thread overwrites (use it at once)."""
        ...


def native_int4_enabled() -> bool:
    """Whether int4 and int8 weights on CPU take the native kernels here
    (``SPLITSERVE_CPU_INT4``)."""
    choice = env.SPLITSERVE_CPU_INT4.get().lower()
    if choice not in ("", "native", "torch"):
        raise ValueError(f"SPLITSERVE_CPU_INT4 must be 'native' or 'torch', got {choice!r}")
    return choice != "torch" and native.status().available


def quantized_matmul(qw: QuantizedWeight) -> Matmul:
    """The CPU matmul serving ``qw``; a shape no kernel can take raises ValueError saying
    why."""
    if native_int4_enabled() and native.int4_unpackable(
            (int(qw.shape[0]), int(qw.shape[1])), qw.group_size, qw.kind) is None:
        try:
            return NativeQuantMatmul(qw)
        except ValueError as e:  # a scale outside float16: torch's kernels serve it
            logger.warning("%s: %s; torch's packed kernel serves it", qw, e)
    if qw.act_bits != 16 and not _warned_act:
        _warned_act.append(qw.act_bits)
        logger.warning("%s: %d-bit activations need the native CPU kernels (%s); torch's "
                       "kernel serves it with bfloat16 activations", qw, qw.act_bits,
                       native.status().reason)
    if qw.kind == "int4":
        return Int4Matmul(qw)
    if qw.group_size == qw.shape[1] and qw.zeros is None:
        return Int8ChannelMatmul(qw)
    if qw.group_size in INT4_GROUP_SIZES:
        return Int8GroupMatmul(qw)
    return DequantizedMatmul(qw)


_warned_act: list[int] = []  # the fallback for 8-bit activations was logged (once a process)


def _to_act(x: Tensor) -> Tensor:
    return x.contiguous() if x.dtype == _QUANT_ACT else x.to(_QUANT_ACT).contiguous()


class NativeQuantMatmul:
    """int4 or int8 codes through ``native.int4_matmul`` / ``int8_matmul``: integer dot
    products against each row's activations quantized to 16 bits per group of 32, the codes
    as stored, scales (and int4's zeros) in float16. One kernel for every row count, so a
    row's bits never depend on its batch, and no expansion: from 64 rows on it ran ~2x torch's
    packed int4 kernel here (~350 GOP/s, about oneDNN's bf16 GEMM on an expanded weight)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.rows = int(qw.shape[0])
        self.bits = 4 if qw.kind == "int4" else 8
        if qw.act_bits == 8:  # 8-bit activations (quantization="w4a8")
            self.bits |= native.ACT8
        if qw.kind == "int4":
            assert qw.zeros is not None
            self.packed = native.pack_int4_weight(
                qw.codes(), qw.scales, qw.zeros - 8 * qw.scales, qw.group_size)
            self._matmul = functools.partial(native.int4_matmul, bits=self.bits)
        else:
            self.bits |= native.int8_bits(qw.group_size, qw.zeros is not None)
            self.packed = native.pack_int8_weight(qw.qdata, qw.scales, qw.group_size, qw.zeros)
            self._matmul = functools.partial(native.int8_matmul, bits=self.bits)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            return self._matmul(x.float(), self.packed, self.rows).to(x.dtype)
        return self._matmul(x, self.packed, self.rows)

    expandable = False
    expand_cost = 1
    expand_block = 1

    def dense_t(self, start: int, stop: int) -> Tensor:
        raise RuntimeError("native quantized weights serve every row count, never an expansion")


class Int4Matmul:
    """torch's packed int4 weight-only matmul (tinygemm layout, bfloat16 scales and zeros)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        why = int4_packable(qw.shape, qw.group_size)
        if why is not None:
            raise ValueError(f"int4 weight {tuple(qw.shape)} cannot be packed: {why}")
        self.rows = int(qw.shape[0])
        """Output features; the packing holds them padded to a multiple of 16 rows."""
        qw = pad_rows(qw, INT4_ROW_MULTIPLE)
        assert qw.zeros is not None
        self.group_size = qw.group_size
        codes = qw.codes()
        self.packed = torch.cat([  # uint8, packing of each row block is independent
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes[i : i + _PACK_ROWS].to(torch.int32), 1
            )
            for i in range(0, codes.shape[0], _PACK_ROWS)
        ])
        # [K / g, N, 2]: (scale, zero) of each group and output row
        self.scale_zeros = torch.stack([qw.scales, qw.zeros], -1).transpose(0, 1).to(_QUANT_ACT)
        self.scale_zeros = self.scale_zeros.contiguous()
        self._expand: tuple[int, Tensor, Tensor] | None = None
        block = _int4pack_block()
        if block and self.rows % block == 0:  # (a padded weight is not expanded)
            n, k = qw.shape
            # per (row block, group, row in block): the kernel's own bf16 scale and zero,
            # as float32 ``w = q * scale + (zero - 8 * scale)``
            sz = self.scale_zeros.float().view(k // self.group_size, n // block, block, 2)
            sz = sz.permute(1, 0, 2, 3).unsqueeze(2)  # [N/B, K/g, 1, B, 2]
            self._expand = (block, sz[..., 0].contiguous(),
                            (sz[..., 1] - 8 * sz[..., 0]).contiguous())

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            _to_act(x), self.packed, self.group_size, self.scale_zeros
        )
        if y.shape[-1] != self.rows:  # the padding rows' outputs
            y = y[..., : self.rows].contiguous()
        return y if y.dtype == x.dtype else y.to(x.dtype)

    expand_cost = 1

    @property
    def expandable(self) -> bool:
        return self._expand is not None

    @property
    def expand_block(self) -> int:
        return self._expand[0] if self._expand is not None else 1

    def dense_t(self, start: int, stop: int) -> Tensor:
        """Decoded from the packed layout itself (no second copy of the codes is kept)."""
        if self._expand is None:
            raise RuntimeError("this int4 weight's packed layout cannot be expanded here")
        block, scale, zero = self._expand
        if start % block or stop % block:
            raise ValueError(f"rows {start}:{stop} are not on {block}-row blocks")
        groups, b0, b1 = scale.shape[1], start // block, stop // block
        nb = b1 - b0
        codes = self.packed.view(-1, groups, self.group_size, block // 2)[b0:b1]
        scale, zero = scale[b0:b1], zero[b0:b1]
        k, half = groups * self.group_size, block // 2
        w = _scratch("int4_f32", (nb, groups, self.group_size, block), torch.float32)
        torch.mul(codes & 15, scale[..., :half], out=w[..., :half])
        torch.mul(codes >> 4, scale[..., half:], out=w[..., half:])
        w.add_(zero)
        out = _scratch("int4_t", (k, nb, block), _QUANT_ACT)
        out.copy_(w.view(nb, k, block).transpose(0, 1))
        return out.view(k, nb * block)


class Int8ChannelMatmul:
    """torch's int8 weight-only matmul: int8 [N, K] codes, one scale per output row."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.codes = qw.qdata.contiguous()  # int8 [N, K]
        self.scales = qw.scales.reshape(-1).to(_QUANT_ACT)  # [N]

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int8pack_mm(_to_act(x), self.codes, self.scales)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    expandable = True
    expand_cost = 1
    expand_block = 1

    def dense_t(self, start: int, stop: int) -> Tensor:
        rows = self.codes[start:stop].float() * self.scales[start:stop].float()[:, None]
        out = _scratch("int8_t", (stop - start, rows.shape[1]), _QUANT_ACT)
        return out.copy_(rows).t()


class Int8GroupMatmul:
    """Grouped int8 (GGUF Q8_0, Q5_0 / Q5_1 / Q5_K) as one int4 matmul over [hi; lo] halves of
    each code (a zero per group goes with the low half)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        n = qw.shape[0]
        q = qw.qdata.to(torch.int16)  # [N, K], in [-128, 127]
        hi, lo = (q >> 4) + 8, q & 0x0F  # q = 16 * (hi - 8) + lo; both in [0, 15]
        zero = qw.scales * 8 if qw.zeros is None else qw.scales * 8 + qw.zeros
        halves = QuantizedWeight(
            "int4",
            pack_int4_codes(torch.cat([hi, lo])),
            torch.cat([qw.scales * 16, qw.scales]),
            torch.cat([torch.zeros_like(qw.scales), zero]),
            qw.group_size, qw.dtype, qw.source,
        )
        self.rows = n
        self.inner = Int4Matmul(halves)

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(  # [T, 2N]: hi rows, then lo rows
            _to_act(x), self.inner.packed, self.inner.group_size, self.inner.scale_zeros
        ).float()
        return (y[:, : self.rows] + y[:, self.rows :]).to(x.dtype)

    expand_cost = 4  # two halves of twice the rows, summed: a Q8_0 logits head rarely pays

    @property
    def expandable(self) -> bool:
        return self.inner.expandable and self.rows % self.inner.expand_block == 0

    @property
    def expand_block(self) -> int:
        return self.inner.expand_block

    def dense_t(self, start: int, stop: int) -> Tensor:
        hi = self.inner.dense_t(start, stop).float()  # [K, stop - start]; a copy: scratch reused
        lo = self.inner.dense_t(self.rows + start, self.rows + stop)
        return (hi + lo.float()).to(_QUANT_ACT)


class DequantizedMatmul:
    """A quantized weight torch's packed kernels cannot take (int8 with a scale per 16
    values, GGUF Q6_K, where the native build is off): dequantized once, a bf16 GEMM."""

    def __init__(self, qw: QuantizedWeight) -> None:
        logger.warning("%s: no torch kernel for int8 groups of %d; dequantized for torch's "
                       "GEMM (the native CPU kernels serve it from its codes: %s)", qw,
                       qw.group_size, native.status().reason)
        self.weight_t = qw.dequantize(torch.float32).to(_QUANT_ACT).t().contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.matmul(_to_act(x), self.weight_t)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    expandable = False
    expand_cost = 1
    expand_block = 1

    def dense_t(self, start: int, stop: int) -> Tensor:
        return self.weight_t[:, start:stop]


_scratch_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A per-thread buffer reused across calls (grown when too small): a weight expanded
    for one matmul is dead once it returns, and fresh multi-MB allocations page-fault."""
    numel = 1
    for d in shape:
        numel *= d
    held = getattr(_scratch_local, name, None)
    if held is None or held.numel() < numel or held.dtype != dtype:
        held = torch.empty(numel, dtype=dtype)
        setattr(_scratch_local, name, held)
    return held[:numel].view(shape)


@functools.cache
def _int4pack_block() -> int | None:
    """Rows per block of torch's CPU int4 packed layout, found by packing known codes
    (each byte of a block's column holds row ``n`` low and ``n + B/2`` high); None when the
    layout is none of those (then every call stays on the packed kernel)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in (64, 32):
        try:
            blocks = packed.view(128 // block, 64, block // 2)
        except RuntimeError:
            continue
        decoded = torch.cat([blocks & 15, blocks >> 4], -1).transpose(1, 2).reshape(128, 64)
        if torch.equal(decoded.to(torch.int32), codes):
            return block
    return None


class TritonInt4Matmul:
    """int4 codes on a GPU through ``kernels/int4_gemm.py`` (codes stay packed, 2 per byte)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        assert qw.zeros is not None
        self.qdata, self.scales, self.zeros = qw.qdata, qw.scales.float(), qw.zeros.float()
        self.group_size = qw.group_size

    def __call__(self, x: Tensor) -> Tensor:
        from splitserve.kernels.int4_gemm import int4_weight_only_mm

        return int4_weight_only_mm(x, self.qdata, self.scales, self.zeros, self.group_size)

    expandable = False
    expand_cost = 1
    expand_block = 1

    def dense_t(self, start: int, stop: int) -> Tensor:
        raise RuntimeError("int4 weights on CUDA run the Triton GEMM, never an expansion")
