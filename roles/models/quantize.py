"""Weight formats at load: which tensors are served quantized, and how they get there.

Owns the ``quantization`` option (``auto`` / ``none`` / ``int4`` / ``int8`` / ``w4a8``) as the
loader applies it:

- GGUF blocks become ``QuantizedWeight`` codes directly, never expanded to float: Q4_0,
  Q4_1 and Q4_K as int4 in groups of 32 (Q4_K's 6-bit sub-block scales and mins are folded
  into per-group scales and zeros), Q8_0 as int8 in groups of 32; the 5- and 6-bit types as
  int8 codes: Q5_0 in groups of 32, Q5_1 and Q5_K with a zero per group of 32 (Q5_K's
  sub-block scales and mins folded as Q4_K's), Q6_K in groups of 16 (its int8 sub-block
  scales times the super-block's d), Q3_K likewise (3-bit codes, 6-bit scales per 16), Q2_K
  with a scale and a zero per 16 (4-bit each, times d and dmin), IQ4_NL
  and IQ4_XS as their non-linear table's int8 values (scale per 32). Under ``auto`` every
  tensor of those types is kept so (F32 / F16 / BF16 stay float); another quantized type
  is dequantized with a warning naming the tensor and its type.
- ``int4`` / ``int8`` quantize the projections (attention, MLP and expert weights, the
  logits head, and the embedding when the head is tied to it) by round-to-nearest: int8
  per output channel, int4 in groups of ``int4_group_size`` (32 or 128); GGUF tensors
  already in the asked format keep their codes. A projection the packed kernels cannot
  take fails at load naming the tensor.
- ``w4a8``: a GGUF's weights as under ``auto``, an HF folder's as under ``int4``; every
  quantized weight is marked for 8-bit activations (``QuantizedWeight.act_bits``): the native
  CPU kernel quantizes each row's activations to 8 bits per group of 32 instead of 16
  (llama.cpp's Q4 x Q8 and Q8 x Q8 dot products), byte dot products: ~1.6x the int4 kernel
  from 64 rows on, and ~2x for int8 weights (a GGUF's Q8_0 head) on AVX-512 VNNI, at a higher
  next-token KL.
- ``none`` keeps every weight float (GGUF dequantized: the fp32 reference).

It must not build modules or read files (``loader.py`` reads, ``kernels/quant.py`` holds
the format).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitserve.errors import ConfigError, ModelLoadError
from splitserve.kernels.quant import (
    INT4_GROUP_SIZES,
    QuantizedWeight,
    int4_packable,
    pack_int4_codes,
    quantize_int4,
    quantize_int8,
)

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

QUANTIZATIONS = ("auto", "none", "int4", "int8", "w4a8")
GGUF_NATIVE = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8", "Q5_0": "int8",
               "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8", "Q3_K": "int8", "IQ4_NL": "int8",
               "IQ4_XS": "int8", "Q2_K": "int8"}
"""GGUF tensor types served from their codes, and the format each becomes."""
GGUF_FLOAT = ("F32", "F16", "BF16", "F64")
_NOT_PROJECTIONS = ("norm", ".gate.weight", "router.")  # norms, MoE routers: stay float


@dataclass(frozen=True)
class WeightFormat:
    """How the loader stores a checkpoint's weights."""

    quantization: str = "auto"
    """``auto`` (GGUF: the file's own formats; HF folders: float), ``none``, ``int4``, ``int8``,
    ``w4a8`` (GGUF: ``auto``'s weights, HF folders: ``int4``'s; 8-bit activations for int4)."""
    int4_group_size: int = 32
    """Columns per int4 scale when quantizing float weights (GGUF int4 codes keep 32)."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.int4_group_size not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"int4_group_size must be one of {INT4_GROUP_SIZES}, got {self.int4_group_size}"
            )

    @property
    def gguf_weights(self) -> str:
        """The weight choice for a GGUF file: ``w4a8`` keeps the file's codes as ``auto``."""
        return "auto" if self.quantization == "w4a8" else self.quantization

    @property
    def float_weights(self) -> str:
        """The weight choice for float checkpoints: ``w4a8`` quantizes as ``int4``."""
        return "int4" if self.quantization == "w4a8" else self.quantization

    @property
    def act_bits(self) -> int:
        """Activation bits of the native kernel for this format's quantized weights."""
        return 8 if self.quantization == "w4a8" else 16

    def mark(self, qw: QuantizedWeight) -> QuantizedWeight:
        """``qw`` with this format's activation bits (int4 and int8 weights alike: under
        ``w4a8`` a GGUF's Q8_0 head takes 8-bit rows too, as llama.cpp's Q8 x Q8)."""
        qw.act_bits = self.act_bits
        return qw

    def keeps_gguf(self, type_name: str) -> bool:
        """Whether a GGUF tensor of ``type_name`` is served from its codes."""
        target = GGUF_NATIVE.get(type_name)
        if target is None or self.gguf_weights == "none":
            return False
        return self.gguf_weights in ("auto", target)


def is_projection(name: str, tied: bool) -> bool:
    """Whether a Hugging Face tensor name is a weight every step multiplies by (quantized
    under ``int4`` / ``int8``)."""
    if not name.endswith(".weight"):
        return False
    if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
        return True
    return name.startswith("model.layers.") and not any(s in name for s in _NOT_PROJECTIONS)


# --------------------------------------------------------------------------- float checkpoints


def quantize_tensor(name: str, w: Tensor, fmt: WeightFormat, dtype: torch.dtype) -> QuantizedWeight:
    """RTN-quantize one projection; a shape the packed kernels cannot take fails naming it."""
    if w.dim() != 2:
        raise ModelLoadError(f"cannot quantize {name}: shape {tuple(w.shape)} is not 2-D")
    if fmt.float_weights == "int8":
        return quantize_int8(w, dtype)
    why = int4_packable(tuple(w.shape), fmt.int4_group_size)
    if why is not None:
        raise ModelLoadError(f"cannot quantize layer {name} to int4: {why}")
    return fmt.mark(quantize_int4(w, fmt.int4_group_size, dtype))


def quantize_checkpoint(
    weights: dict[str, Any], fmt: WeightFormat, dtype: torch.dtype, tied: bool
) -> dict[str, Any]:
    """Quantize the float projections of a GGUF's ``weights`` in place (``int4`` / ``int8``
    only); tensors already quantized keep their codes, marked with the format's activation
    bits."""
    for name in list(weights):
        w = weights[name]
        if (isinstance(w, Tensor) and fmt.gguf_weights in ("int4", "int8")
                and is_projection(name, tied)):
            weights[name] = quantize_tensor(name, w, fmt, dtype)
        elif isinstance(w, QuantizedWeight):
            fmt.mark(w)
    return weights


def tensor_transform(
    fmt: WeightFormat, dtype: torch.dtype, tied: bool
) -> Callable[[str, Tensor], Any]:
    """Per-tensor conversion for a reader (quantizing as it goes keeps the float copy of
    only one tensor alive at a time)."""

    def convert(name: str, w: Tensor) -> Any:
        if fmt.float_weights in ("int4", "int8") and is_projection(name, tied):
            return quantize_tensor(name, w, fmt, dtype)
        return w.to(dtype)

    return convert


# --------------------------------------------------------------------------- GGUF blocks


def gguf_codes(type_name: str, blocks: np.ndarray, rows: int) -> tuple[str, Tensor, Tensor, Tensor | None]:
    """(kind, codes [N, K], scales [N, K / group], zeros or None) of one GGUF tensor's raw
    blocks ``blocks`` (uint8 [N, bytes per row]); the group is 32 (Q6_K, Q3_K, Q2_K: 16).
    int4 codes are uint8 in [0, 15] with ``w = (q - 8) * scale + zero``; int8 codes are
    ``w = q * scale`` (``+ zero`` where zeros are given: Q5_1, Q5_K, Q2_K)."""
    raw = np.ascontiguousarray(blocks).reshape(rows, -1)
    decode = _DECODERS[type_name]
    return decode(raw, rows)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _q4_0(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    b = raw.reshape(rows, -1, 18)  # per block: d (f16), 16 bytes of nibbles
    d = _f16(b[..., :2])[..., 0]
    codes = _split_nibbles(b[..., 2:])
    return "int4", codes.reshape(rows, -1), d, np.zeros_like(d)


def _q4_1(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    b = raw.reshape(rows, -1, 20)  # per block: d, m (f16), 16 bytes of nibbles; w = q d + m
    d, m = _f16(b[..., 0:2])[..., 0], _f16(b[..., 2:4])[..., 0]
    codes = _split_nibbles(b[..., 4:])
    return "int4", codes.reshape(rows, -1), d, m + 8 * d


def _q8_0(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    b = raw.reshape(rows, -1, 34)  # per block: d (f16), 32 int8 codes
    d = _f16(b[..., :2])[..., 0]
    codes = np.ascontiguousarray(b[..., 2:]).view(np.int8)
    return "int8", codes.reshape(rows, -1), d, None


def _five_bit_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 blocks' 32 codes in [0, 31]: bit j of the little-endian ``qh`` word is the
    fifth bit of value j; ``qs`` as Q4's nibbles."""
    bits = np.ascontiguousarray(qh).view("<u4")  # [..., 1]
    high = ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return _split_nibbles(qs) | (high << 4)


def _q5_0(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    b = raw.reshape(rows, -1, 22)  # per block: d (f16), qh (4 bytes), 16 bytes of nibbles
    d = _f16(b[..., :2])[..., 0]
    codes = (_five_bit_codes(b[..., 2:6], b[..., 6:]).astype(np.int16) - 16).astype(np.int8)
    return "int8", codes.reshape(rows, -1), d, None


def _q5_1(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    b = raw.reshape(rows, -1, 24)  # per block: d, m (f16), qh, 16 bytes; w = q d + m
    d, m = _f16(b[..., 0:2])[..., 0], _f16(b[..., 2:4])[..., 0]
    codes = _five_bit_codes(b[..., 4:8], b[..., 8:]).astype(np.int8)
    return "int8", codes.reshape(rows, -1), d, m


def _q5_k(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    # per 256-value super-block: d, dmin (f16), 12 bytes of 6-bit (scale, min) as Q4_K's,
    # 32 bytes of fifth bits (bit g of byte j: group g's value j), 128 bytes of nibbles
    b = raw.reshape(rows, -1, 176)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, S, 1]
    sc, mn = _k_scale_min(b[..., 4:16])  # [N, S, 8]
    qh = b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]  # [N, S, 8, 32]
    q = b[..., 48:].reshape(rows, -1, 4, 32)
    low = np.stack([q & 0x0F, q >> 4], axis=3).reshape(rows, -1, 8, 32)
    codes = (low | ((qh & 1) << 4)).astype(np.int8)
    return "int8", codes.reshape(rows, -1), (d * sc).reshape(rows, -1), (-dmin * mn).reshape(rows, -1)


def _two_bit(b: np.ndarray, rows: int) -> np.ndarray:
    """64 bytes of 2-bit fields per 256-value super-block ([N, S, 64]) -> [N, S, 256] values in
    [0, 3], llama.cpp's order: half h, byte j, bits 2s hold value 128h + 32s + j (Q2_K's codes,
    Q3_K's low bits, Q6_K's high bits)."""
    q = b.reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    return q.reshape(rows, -1, 256) & 3


def _q6_k(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    # per 256-value super-block: 128 bytes of low nibbles (half h: values h*128 + j low,
    # + 64 + j high), 64 bytes of 2-bit highs (half h, byte j, bits 2s: value h*128 + 32s + j),
    # 16 int8 scales (one per 16 values), d (f16); w = d * scale * (q - 32)
    b = raw.reshape(rows, -1, 210)
    ql = b[..., :128].reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8)[:, None]
    q = (ql & 0x0F).reshape(rows, -1, 256) | (_two_bit(b[..., 128:192], rows) << 4)
    codes = (q.astype(np.int16) - 32).astype(np.int8)
    scales = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])  # [N, S, 1]
    return "int8", codes.reshape(rows, -1), (d * scales).reshape(rows, -1), None


def _q3_k(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    # per 256-value super-block: 32 bytes of high bits (bit i of byte j: value 32i + j; set
    # means no -4), 64 bytes of 2-bit lows (half h, byte j, bits 2s: value 128h + 32s + j),
    # 12 bytes of 6-bit scales (sub-block k of 16: low nibble of byte k (k < 8) or high
    # nibble of byte k - 8, high 2 bits at bits 2(k // 4) of byte 8 + k % 4), d (f16)
    b = raw.reshape(rows, -1, 110)
    hm, qs, sb = b[..., :32], b[..., 32:96], b[..., 96:108]
    low = (sb[..., :8, None] >> np.array([0, 4], dtype=np.uint8)).transpose(0, 1, 3, 2)
    high = (sb[..., 8:12, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)).transpose(0, 1, 3, 2)
    sc = ((low.reshape(rows, -1, 16) & 0x0F) | ((high.reshape(rows, -1, 16) & 0x03) << 4))
    scales = _f16(b[..., 108:110]) * (sc.astype(np.float32) - 32)  # [N, S, 16]
    qh = hm.reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]  # [N, S, 8, 32]
    codes = _two_bit(qs, rows).astype(np.int8) - 4 * (1 - (qh.reshape(rows, -1, 256) & 1)).astype(np.int8)
    return "int8", codes.reshape(rows, -1), scales.reshape(rows, -1), None


def _q2_k(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    # per 256-value super-block: 16 bytes of (scale | min << 4) per 16 values, 64 bytes of
    # 2-bit codes (half h, byte j, bits 2s: value 128h + 32s + j), d, dmin (f16);
    # w = d * scale * q - dmin * min
    b = raw.reshape(rows, -1, 84)
    sm = b[..., :16]
    d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])  # [N, S, 1]
    codes = _two_bit(b[..., 16:80], rows).astype(np.int8)
    scales = d * (sm & 0x0F).astype(np.float32)
    zeros = -dmin * (sm >> 4).astype(np.float32)
    return "int8", codes.reshape(rows, -1), scales.reshape(rows, -1), zeros.reshape(rows, -1)


IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=np.int8)
"""IQ4_NL / IQ4_XS: the int8 value each 4-bit code stands for (llama.cpp's ``kvalues_iq4nl``)."""


def _iq4_nl(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    b = raw.reshape(rows, -1, 18)  # per block: d (f16), 16 bytes of nibbles as Q4_0's
    d = _f16(b[..., :2])[..., 0]
    return "int8", IQ4_VALUES[_split_nibbles(b[..., 2:])].reshape(rows, -1), d, None


def _iq4_xs(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    # per 256-value super-block: d (f16), 16 bits of high scale bits (2 per group of 32),
    # 4 bytes of low scale nibbles (group 2j low, 2j + 1 high), 8 x 16 bytes of nibbles
    b = raw.reshape(rows, -1, 136)
    d = _f16(b[..., 0:2])  # [N, S, 1]
    hi = np.ascontiguousarray(b[..., 2:4]).view("<u2") >> (2 * np.arange(8, dtype=np.uint16))
    lo = (b[..., 4:8, None] >> np.array([0, 4], dtype=np.uint8)).reshape(rows, -1, 8) & 0x0F
    ls = (lo | ((hi & 3).astype(np.uint8) << 4)).astype(np.float32) - 32  # [N, S, 8]
    codes = IQ4_VALUES[_split_nibbles(b[..., 8:].reshape(rows, -1, 8, 16))]
    return "int8", codes.reshape(rows, -1), (d * ls).reshape(rows, -1), None


def _q4_k(raw: np.ndarray, rows: int):  # type: ignore[no-untyped-def]
    # per 256-value super-block: d, dmin (f16), 12 bytes of 6-bit (scale, min) for its
    # eight 32-value groups, 128 bytes of nibbles (chunk i: group 2i low, 2i + 1 high)
    b = raw.reshape(rows, -1, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, S, 1]
    sc, mn = _k_scale_min(b[..., 4:16])  # [N, S, 8]
    q = b[..., 16:].reshape(rows, -1, 4, 32)
    codes = np.stack([q & 0x0F, q >> 4], axis=3)  # [N, S, 4, 2, 32]
    scale = d * sc  # w = scale * q - dmin * m  ->  zero = 8 scale - dmin m
    zero = 8 * scale - dmin * mn
    return "int4", codes.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs of each K-quant super-block, as float32."""
    s = s.reshape(*s.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are values 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q8_0": _q8_0, "Q5_0": _q5_0,
             "Q5_1": _q5_1, "Q5_K": _q5_k, "Q6_K": _q6_k, "Q3_K": _q3_k, "IQ4_NL": _iq4_nl,
             "IQ4_XS": _iq4_xs, "Q2_K": _q2_k}


def gguf_weight(
    name: str, type_name: str, blocks: np.ndarray, rows: int, dtype: torch.dtype,
) -> QuantizedWeight | None:
    """A GGUF tensor of a natively served type as a ``QuantizedWeight`` (None when its
    shape does not suit the packed kernels: the caller dequantizes it)."""
    kind, codes, scales, zeros = gguf_codes(type_name, blocks, rows)
    group = codes.shape[1] // scales.shape[1]  # 32, or Q6_K's 16
    if kind == "int4":
        why = int4_packable(codes.shape, 32)
        if why is not None:
            logger.warning("GGUF tensor %s (%s): %s; dequantizing it", name, type_name, why)
            return None
        qdata = pack_int4_codes(torch.from_numpy(codes))
    else:
        qdata = torch.from_numpy(np.ascontiguousarray(codes))
    return QuantizedWeight(
        kind, qdata, torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)),
        None if zeros is None else torch.from_numpy(np.ascontiguousarray(zeros, dtype=np.float32)),
        group, dtype, type_name,
    )


def warn_dequantized(name: str, type_name: str) -> None:
    """The warning for a GGUF tensor whose type has no native kernel."""
    logger.warning(
        "GGUF tensor %s has type %s, which is not served natively: dequantizing it to float "
        "(natively served: %s)", name, type_name, ", ".join(GGUF_NATIVE),
    )
