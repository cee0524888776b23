"""Tiny GGUF files written the way llama.cpp's converter writes them, for loader tests.

``write_gguf`` turns a tiny Hugging Face folder (``tests/families.py``) into a GGUF file with
the ``gguf`` package's own writer and tensor-name map (``get_tensor_name_map``): experts
stacked per projection, Llama-arch Q/K rows permuted, Gemma norms stored as ``1 + weight``,
Phi-3's LongRoPE factors as tensors, the family's ``{arch}.*`` metadata keys, and the
SmolLM2 tokenizer copied from the embedded GGUF. ``rounded_weights`` gives the float weights
the file really holds (F16 / Q8_0 rounding applied in Hugging Face layout), so a transformers
model loaded with them is the reference a GGUF loader must equal token for token.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCH = {"qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE", "phi3": "PHI3", "gemma2": "GEMMA2",
        "gemma3": "GEMMA3", "mixtral": "LLAMA", "smollm3": "SMOLLM3",
        "granite": "GRANITE", "olmo2": "OLMO2", "granite_moe": "GRANITE_MOE"}
GGUF_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen3": {"use_sliding_window": False},  # llama.cpp's qwen3 has no windows
    "qwen3_moe": {"mlp_only_layers": [], "norm_topk_prob": True},  # every layer routed
    # llama.cpp's smollm3: rotary skipped on every fourth layer, no windows
    "smollm3": {"no_rope_layers": [1, 1, 1, 0], "use_sliding_window": False,
                "layer_types": ["full_attention"] * 4},
}
"""Config changes that keep a tiny model inside what a GGUF file can say."""
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_EXPERT_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def tensor_type(array: np.ndarray, qtype: str) -> str:
    """The type a tensor is stored in: ``qtype`` where it can hold it, else F32 (norms,
    vectors, Q8_0 rows not a multiple of 32). ``mixed``: Q8_0 where possible, else F16
    for matrices (one file exercises all three types)."""
    if qtype == "mixed":
        return "Q8_0" if _quantizable(array, "Q8_0") else tensor_type(array, "F16")
    if qtype == "Q6_K":  # as llama.cpp's K-quants: rows of whole 256-value blocks, else Q5_1
        return "Q6_K" if _quantizable(array, "Q6_K") else tensor_type(array, "Q5_1")
    return qtype if qtype != "F32" and _quantizable(array, qtype) else "F32"


def rounded(array: np.ndarray, qtype: str) -> np.ndarray:
    """What a tensor of ``qtype`` holds after the round trip (F32 unchanged)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = tensor_type(array, qtype)
    if qtype == "F32":
        return array.astype(np.float32)
    if qtype == "F16":
        return array.astype(np.float16).astype(np.float32)
    kind = GGMLQuantizationType[qtype]
    return dequantize(_quantize(array.astype(np.float32), qtype), kind).reshape(array.shape)


def _quantizable(array: np.ndarray, qtype: str) -> bool:
    """Matrices only (norms stay F32, as llama.cpp keeps them); rows in whole blocks (32
    values; K-quants 256)."""
    block = 256 if qtype.endswith("_K") else 32
    return array.ndim >= 2 and (qtype == "F16" or array.shape[-1] % block == 0)


def _quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    """Raw blocks (byte shape) of ``array`` in ``qtype``: the ``gguf`` package's quantizer, or
    for Q6_K (which it can only dequantize) ``quantize_q6_k``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype == "Q6_K":
        return quantize_q6_k(array)
    return quantize(array, GGMLQuantizationType[qtype])  # type: ignore[no-any-return]


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """GGUF Q6_K blocks of a float array whose rows are whole 256-value super-blocks (byte
    shape [..., K / 256 * 210]): per 16 values a scale ``max|x| / 31``; the super-block's
    ``d`` (float16) is its largest scale / 127 and each scale is stored as an int8 multiple
    of it; codes ``round(x / (d * scale)) + 32`` in [0, 63], low nibbles then 2-bit highs in
    llama.cpp's order (what ``gguf.quants.Q6_K.dequantize_blocks`` reads)."""
    lead, k = array.shape[:-1], array.shape[-1]
    x = np.asarray(array, np.float32).reshape(-1, 16, 16)  # [blocks, sub-blocks, values]
    sub = np.abs(x).max(-1) / 31  # [B, 16]
    d = (sub.max(-1) / 127).astype(np.float16)  # [B]
    df = d.astype(np.float32)
    sc = np.where(df[:, None] > 0, np.round(sub / np.where(df > 0, df, 1)[:, None]), 0)
    sc = np.clip(sc, -128, 127).astype(np.int8)
    step = df[:, None] * sc.astype(np.float32)  # [B, 16]
    q = np.where(step[..., None] > 0, np.round(x / np.where(step > 0, step, 1)[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 2, 64)  # [B, half, s, j]
    ql = (q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)  # [B, 2, 64]
    hi = (q >> 4).reshape(-1, 2, 4, 32)  # [B, half, quarter, j]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                             d.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(*lead, k // 256 * 210)


def _store(writer: Any, name: str, array: np.ndarray, qtype: str) -> None:
    from gguf import GGMLQuantizationType

    array = np.ascontiguousarray(array, dtype=np.float32)
    qtype = tensor_type(array, qtype)
    if qtype == "F32":
        writer.add_tensor(name, array)
    elif qtype == "F16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, _quantize(array, qtype), raw_dtype=GGMLQuantizationType[qtype])


def read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    weights: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return config, weights


def per_expert(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Granite MoE's stacked experts and router under the per-expert names a GGUF file's
    tensors load as (``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, ``gate``);
    other tensors as they are."""
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        base = name.rsplit("block_sparse_moe.", 1)[0] + "block_sparse_moe."
        if name.endswith("block_sparse_moe.input_linear.weight"):
            half = w.shape[1] // 2
            for e in range(w.shape[0]):
                out[f"{base}experts.{e}.gate_proj.weight"] = w[e, :half]
                out[f"{base}experts.{e}.up_proj.weight"] = w[e, half:]
        elif name.endswith("block_sparse_moe.output_linear.weight"):
            for e in range(w.shape[0]):
                out[f"{base}experts.{e}.down_proj.weight"] = w[e]
        elif name.endswith("block_sparse_moe.router.layer.weight"):
            out[f"{base}gate.weight"] = w
        else:
            out[name] = w
    return out


def rounded_weights(folder: Path, qtype: str) -> dict[str, torch.Tensor]:
    """The folder's weights as a ``qtype`` GGUF file holds them (Hugging Face names)."""
    _, weights = read_hf_folder(folder)
    return {k: torch.from_numpy(rounded(v, qtype)) for k, v in weights.items()}


def rounded_folder(folder: Path, qtype: str, out: Path) -> Path:
    """A copy of ``folder`` whose weights are rounded as a ``qtype`` GGUF file holds them
    (what transformers loads as the reference for that file)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())
    weights = {k: v.contiguous() for k, v in rounded_weights(folder, qtype).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary row permutation of Q/K (its ``llama``, ``smollm3`` and ``granite``
    converters)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: Path, out: Path, family: str, qtype: str = "F32") -> Path:
    """A GGUF file of the tiny ``family`` model saved in ``folder``, tensors in ``qtype``
    (F32, F16, Q8_0 or mixed: see ``tensor_type``)."""
    import gguf

    config, weights = read_hf_folder(folder)
    arch = gguf.MODEL_ARCH[ARCH[family]]
    n_layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, config, family, weights)
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, w in weights.items():
        m = _EXPERT.fullmatch(name)
        if m:
            experts.setdefault((int(m[1]), _EXPERT_GGUF[m[3]]), {})[int(m[2])] = w
            continue
        if family in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        if family == "granite_moe" and name.endswith("input_linear.weight"):  # [E, 2I, H]
            layer, half = int(name.split(".")[2]), w.shape[1] // 2
            _store(writer, f"blk.{layer}.ffn_gate_exps.weight", w[:, :half], qtype)
            _store(writer, f"blk.{layer}.ffn_up_exps.weight", w[:, half:], qtype)
            continue
        if family in ("mixtral", "smollm3", "granite", "granite_moe") and name.endswith(
                ("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            w = _permute(w, heads)
        base, suffix = name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        assert gguf_name is not None, f"gguf has no name for {name}"
        _store(writer, f"{gguf_name}.{suffix}", w, qtype)
    for (layer, base), by_expert in sorted(experts.items()):
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])  # [E, rows, cols]
        _store(writer, f"blk.{layer}.{base}.weight", stacked, qtype)
    if family == "phi3":
        scaling = config.get("rope_scaling") or config["rope_parameters"]
        writer.add_tensor("rope_factors_long.weight", np.asarray(scaling["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(scaling["short_factor"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _metadata(writer: Any, cfg: dict[str, Any], family: str, weights: dict[str, np.ndarray]) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_name(f"tiny-{family}")
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or (
        (rope.get("full_attention") or {}).get("rope_theta")) or 10000.0
    writer.add_rope_freq_base(float(theta))
    window = cfg.get("sliding_window")
    if window and (family not in ("qwen3", "smollm3") or cfg.get("use_sliding_window")):
        writer.add_sliding_window(window)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        if family == "qwen3_moe":
            writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
            writer.add_expert_weights_norm(bool(cfg.get("norm_topk_prob")))
    if family in ("granite", "granite_moe"):
        writer.add_embedding_scale(float(cfg["embedding_multiplier"]))
        writer.add_residual_scale(float(cfg["residual_multiplier"]))
        writer.add_attention_scale(float(cfg["attention_multiplier"]))
        writer.add_logit_scale(float(cfg["logits_scaling"]))
    if family in ("gemma2", "gemma3"):
        writer.add_attention_scale(float(cfg["query_pre_attn_scalar"]) ** -0.5)
        types = cfg.get("layer_types")
        if types:
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        if cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if family == "gemma2" and cfg.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    if family == "gemma3":
        full, local = rope["full_attention"], rope["sliding_attention"]
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
        if full.get("rope_type") == "linear":
            from gguf import RopeScalingType

            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
    if family == "phi3":
        scaling = cfg.get("rope_scaling") or cfg["rope_parameters"]
        original = scaling["original_max_position_embeddings"]
        writer.add_rope_dimension_count(int(head_dim * scaling.get("partial_rotary_factor", 1.0)))
        writer.add_rope_scaling_orig_ctx_len(original)
        factor = cfg["max_position_embeddings"] / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(original)))
    _tokenizer(writer, cfg)


_SMOLLM_TOKENIZER: dict[str, Any] = {}
"""The embedded GGUF's ``tokenizer.ggml.*`` values, read once per process."""


def _tokenizer(writer: Any, cfg: dict[str, Any]) -> None:
    """The SmolLM2 tokenizer of the embedded GGUF (the tiny models' tokenizer)."""
    from splitserve.roles.models.loader import _open_gguf, default_model_path

    if not _SMOLLM_TOKENIZER:
        reader = _open_gguf(default_model_path())
        _SMOLLM_TOKENIZER.update({k: f.contents() for k, f in reader.fields.items()
                                  if k.startswith("tokenizer.ggml.")})

    def value(key: str) -> Any:
        return _SMOLLM_TOKENIZER[key]

    writer.add_tokenizer_model(value("tokenizer.ggml.model"))
    if "tokenizer.ggml.pre" in _SMOLLM_TOKENIZER:
        writer.add_tokenizer_pre(value("tokenizer.ggml.pre"))
    writer.add_token_list(value("tokenizer.ggml.tokens"))
    writer.add_token_types(value("tokenizer.ggml.token_type"))
    writer.add_token_merges(value("tokenizer.ggml.merges"))
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
