"""GGUF architectures and tensor names -> ModelConfig and Hugging Face tensor names.

Owns what llama.cpp's converter (``convert_hf_to_gguf.py``) wrote for each family the
``gguf`` package maps, and how to read it back: the ``{arch}.*`` metadata keys into a
ModelConfig, ``blk.N.*`` tensor names into the checkpoint names the model files take, and the
converter's value changes undone (Gemma norms stored as ``1 + weight``; experts stacked into
one ``[E, rows, cols]`` tensor per projection; Phi-3's LongRoPE factors stored as tensors).
Llama's Q/K row permutation is undone by ``loader.py`` (it also applies to quantized codes).

Families: ``llama`` (Llama, SmolLM; ``expert_count`` > 0: Mixtral), ``mistral``, ``qwen2``,
``qwen3``, ``qwen3moe``, ``phi3``, ``gemma2``, ``gemma3`` (text), ``smollm3``, ``granite``,
``granitemoe``, ``olmo2``. What GGUF metadata does not carry follows llama.cpp's own defaults: Gemma's
attention scale is ``head_dim ** -0.5`` (``hidden / heads`` for the 27B shapes) unless
``attention.scale`` is written, its window pattern every 2nd (Gemma 2) / 6th (Gemma 3) layer
global unless ``attention.sliding_window_pattern`` is, Gemma 3's local rotary base 10000 unless
``rope.freq_base_swa`` is; Qwen3-MoE renormalizes the top-k weights unless
``expert_weights_norm`` says otherwise. It must not read files or dequantize (``loader.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from splitserve.errors import ModelLoadError
from splitserve.roles.models.config import ModelConfig

Field = Callable[[str, Any], Any]
"""``field(key, default)``: a GGUF metadata value (the ``{arch}.`` prefix included in key)."""
ReadTensor = Callable[[str], np.ndarray]
"""A GGUF tensor by name, as float32 in Hugging Face (row-major) shape."""

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
}
"""GGUF ``general.architecture`` -> the model file's architecture (``llama`` with experts
becomes Mixtral)."""
TOKENIZER_ALIASES = {"smollm3": "llama", "granite": "llama", "olmo2": "llama",
                     "granitemoe": "llama"}
"""GGUF architectures transformers' GGUF reader refuses (so cannot build their tokenizer)
-> one it reads whose tokenizer metadata is the same."""
PERMUTED_QK = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
               "SmolLM3ForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM")
"""Architectures whose Q/K rows llama.cpp's converter permuted (``llama`` GGUF files)."""
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
_FAMILY_BLOCK: dict[str, dict[str, str]] = {
    "Gemma2ForCausalLM": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "Olmo2ForCausalLM": {  # no pre-norms: llama.cpp's names of the two post-norms
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "Phi3ForCausalLM": {"ffn_up": "mlp.gate_up_proj"},  # gate and up rows fused
    "MixtralForCausalLM": {"ffn_gate_inp": "block_sparse_moe.gate"},
    "GraniteMoeForCausalLM": {"ffn_gate_inp": "block_sparse_moe.gate"},
}
_FAMILY_BLOCK["Gemma3ForCausalLM"] = _FAMILY_BLOCK["Gemma2ForCausalLM"]
_EXPERTS = {  # GGUF stacked projection -> (prefix, per-expert name) by architecture
    "MixtralForCausalLM": ("block_sparse_moe.experts", {"ffn_gate_exps": "w1",
                                                         "ffn_up_exps": "w3",
                                                         "ffn_down_exps": "w2"}),
    "GraniteMoeForCausalLM": ("block_sparse_moe.experts", {"ffn_gate_exps": "gate_proj",
                                                           "ffn_up_exps": "up_proj",
                                                           "ffn_down_exps": "down_proj"}),
    "Qwen3MoeForCausalLM": ("mlp.experts", {"ffn_gate_exps": "gate_proj",
                                            "ffn_up_exps": "up_proj",
                                            "ffn_down_exps": "down_proj"}),
}
_CONFIG_ONLY = ("rope_factors_long", "rope_factors_short", "rope_freqs")
"""Tensors that carry configuration, not weights (read by ``gguf_config``)."""


# --------------------------------------------------------------------------- tensor names


def hf_name(gguf_name: str, architecture: str = "LlamaForCausalLM") -> str | None:
    """The checkpoint name of a GGUF tensor that maps one-to-one (None: stacked experts,
    configuration tensors and tensors no model file takes)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        base = parts[2]
        mapped = _FAMILY_BLOCK.get(architecture, {}).get(base) or _BLOCK.get(base)
        return None if mapped is None else f"model.layers.{parts[1]}.{mapped}.{parts[3]}"
    mapped = _TOP.get(parts[0])
    return None if mapped is None or len(parts) != 2 else f"{mapped}.{parts[1]}"


def hf_tensors(
    gguf_name: str, array: np.ndarray, architecture: str
) -> list[tuple[str, np.ndarray]]:
    """(checkpoint name, array) pairs of one GGUF tensor in Hugging Face shape: a stacked
    expert tensor [E, rows, cols] becomes E tensors; Gemma norms lose the converter's +1.
    Empty for tensors no model file takes."""
    parts = gguf_name.split(".")
    experts = _EXPERTS.get(architecture)
    if experts is not None and parts[0] == "blk" and parts[2] in experts[1]:
        prefix, expert_name = experts[0], experts[1][parts[2]]
        base = f"model.layers.{parts[1]}.{prefix}"
        return [(f"{base}.{e}.{expert_name}.{parts[3]}", array[e])
                for e in range(array.shape[0])]
    name = hf_name(gguf_name, architecture)
    if name is None:
        return []
    if architecture in GEMMA and name.endswith("norm.weight"):
        array = array - np.float32(1.0)  # stored as the multiplier; the model adds 1 back
    return [(name, array)]


# --------------------------------------------------------------------------- config


def gguf_config(
    field: Field, tensor_names: set[str], read: ReadTensor, path: str
) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata and which tensors it holds."""
    arch = field("general.architecture", None)
    architecture = ARCHITECTURES.get(arch)
    if architecture is None:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: "
            f"{sorted(ARCHITECTURES)}", path=path,
        )

    def get(key: str, default: Any = None) -> Any:
        value = field(f"{arch}.{key}", None)
        return default if value is None else value

    experts = int(get("expert_count", 0))
    if arch == "llama" and experts:
        architecture = "MixtralForCausalLM"
    fields = _base(get, field, tensor_names, architecture)
    family = _FAMILY_FIELDS.get(architecture)
    if family is not None:
        fields.update(family(get, fields, tensor_names, read))
    if experts:
        fields.update(_moe(get, fields, tensor_names, architecture))
    try:
        return ModelConfig(**fields)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}", path=path) from e


def _base(get: Callable[..., Any], field: Field, names: set[str], architecture: str) -> dict:
    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(field("tokenizer.ggml.tokens", None) or [])
    eos, bos = field("tokenizer.ggml.eos_token_id", None), field("tokenizer.ggml.bos_token_id", None)
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    window = get("attention.sliding_window")
    return dict(
        architecture=architecture,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", 0)),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        sliding_window=int(window) if window else None,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _moe(get: Callable[..., Any], fields: dict, names: set[str], architecture: str) -> dict:
    """Experts, top-k and which layers route (a layer with a router tensor)."""
    if int(get("expert_shared_count", 0)):
        raise ModelLoadError(
            f"unsupported mixture-of-experts setting expert_shared_count="
            f"{get('expert_shared_count')} (softmax top-k routing without shared experts only)"
        )
    gating = get("expert_gating_func")
    if gating not in (None, 1):  # llama.cpp: 1 = softmax, 2 = sigmoid
        raise ModelLoadError(f"unsupported mixture-of-experts setting expert_gating_func={gating}")
    moe_size = int(get("expert_feed_forward_length", 0)) or fields["intermediate_size"]
    layers = tuple(f"blk.{i}.ffn_gate_inp.weight" in names for i in range(fields["num_layers"]))
    return dict(
        num_experts=int(get("expert_count")),
        num_experts_per_tok=int(get("expert_used_count")),
        moe_intermediate_size=moe_size,
        intermediate_size=fields["intermediate_size"] or moe_size,
        norm_topk_prob=architecture == "MixtralForCausalLM" or bool(get("expert_weights_norm", True)),
        moe_layers=layers,
    )


def _phi3(get: Callable[..., Any], fields: dict, names: set[str], read: ReadTensor) -> dict:
    """Partial rotary (``rope.dimension_count``) and LongRoPE from the factor tensors."""
    rotary = int(get("rope.dimension_count", fields["head_dim"]))
    out: dict[str, Any] = {"partial_rotary_factor": rotary / fields["head_dim"]}
    if "rope_factors_long.weight" in names:
        original = int(get("rope.scaling.original_context_length",
                           fields["max_position_embeddings"]))
        scaling: dict[str, Any] = {
            "rope_type": "longrope",
            "short_factor": read("rope_factors_short.weight").tolist(),
            "long_factor": read("rope_factors_long.weight").tolist(),
            "original_max_position_embeddings": original,
            "max_position_embeddings": fields["max_position_embeddings"],
        }
        if get("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(get("rope.scaling.attn_factor"))
        out["rope_scaling"] = scaling
    return out


def _gemma(pattern: int, softcaps: bool) -> Callable[..., dict]:
    def fields_of(get: Callable[..., Any], fields: dict, names: set[str], read: ReadTensor) -> dict:
        n, window = fields["num_layers"], fields["sliding_window"]
        swa = get("attention.sliding_window_pattern", pattern)
        if isinstance(swa, list):  # one flag per layer: True = windowed
            windowed = [bool(x) for x in swa]
        else:
            windowed = [int(swa) == 0 or i % int(swa) < int(swa) - 1 for i in range(n)]
        if len(windowed) != n:
            raise ModelLoadError(f"attention.sliding_window_pattern has {len(windowed)} "
                                 f"entries for {n} layers")
        scale = get("attention.scale")
        if scale is not None:
            scalar = float(scale) ** -2
        elif (fields["hidden_size"], n) in ((4608, 46), (5376, 62)):  # the 27B shapes
            scalar = fields["hidden_size"] / fields["num_heads"]
        else:
            scalar = float(fields["head_dim"])
        out = dict(
            hidden_act="gelu_pytorch_tanh", rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            layer_windows=tuple(window if w and window else None for w in windowed),
            query_pre_attn_scalar=scalar,
            final_logit_softcap=get("final_logit_softcapping"),
        )
        if softcaps:
            out["attn_logit_softcap"] = get("attn_logit_softcapping")
        else:
            out["rope_local_theta"] = float(get("rope.freq_base_swa", 10000.0))
            out["rope_theta"] = float(get("rope.freq_base", 1_000_000.0))
        return out

    return fields_of


def _smollm3(get: Callable[..., Any], fields: dict, names: set[str], read: ReadTensor) -> dict:
    """llama.cpp's smollm3: no metadata key says which layers skip rotary; its graph skips it
    on every fourth layer (``n_no_rope_layer_step = 4``, transformers' default interval), and
    it has no windowed attention."""
    return {"rope_layers": tuple((i + 1) % 4 != 0 for i in range(fields["num_layers"])),
            "sliding_window": None}


def _granite(get: Callable[..., Any], fields: dict, names: set[str], read: ReadTensor) -> dict:
    """llama.cpp's granite keys (``embedding_scale``, ``residual_scale``, ``attention.scale``,
    ``logit_scale``); an absent one is 1, as in transformers' config."""
    return dict(
        embedding_multiplier=float(get("embedding_scale", 1.0)),
        residual_multiplier=float(get("residual_scale", 1.0)),
        attention_multiplier=float(get("attention.scale", 1.0)),
        logits_scaling=float(get("logit_scale", 1.0)),
    )


_FAMILY_FIELDS: dict[str, Callable[..., dict]] = {
    "GraniteForCausalLM": _granite,
    "GraniteMoeForCausalLM": _granite,
    "SmolLM3ForCausalLM": _smollm3,
    "Phi3ForCausalLM": _phi3,
    "Gemma2ForCausalLM": _gemma(2, softcaps=True),
    "Gemma3ForCausalLM": _gemma(6, softcaps=False),
}


def is_config_tensor(gguf_name: str) -> bool:
    return gguf_name.split(".")[0] in _CONFIG_ONLY
