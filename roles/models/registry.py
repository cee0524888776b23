"""The model registry: config.json's ``architectures`` / ``model_type`` -> a model class.

Owns the list of architecture files and the choice among them; each file's class names the
architectures and model types it serves. Adding an architecture is one file in this folder
(a ``DecoderModel`` subclass built from ``blocks.py``) plus its module name in ``_MODULES``.
It must not parse a family's own config fields (the class does) or read weights.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from splitserve.errors import ModelLoadError
from splitserve.roles.models.blocks import DecoderModel
from splitserve.roles.models.config import ModelConfig

_MODULES = ("llama", "qwen3", "qwen3_moe", "mixtral", "phi3", "gemma2", "gemma3", "smollm3",
            "granite", "olmo2")
_REGISTRY: dict[str, type[DecoderModel]] = {}
_BY_TYPE: dict[str, tuple[str, type[DecoderModel]]] = {}


def _load() -> None:
    if _REGISTRY:
        return
    for name in _MODULES:
        module = importlib.import_module(f"splitserve.roles.models.{name}")
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, DecoderModel)):
                continue
            cls: type[DecoderModel] = obj
            if cls.architectures:
                for arch in cls.architectures:
                    _REGISTRY[arch] = cls
                for arch, model_type in zip(cls.architectures, cls.model_types, strict=False):
                    _BY_TYPE[model_type] = (arch, cls)


def supported_architectures() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def resolve(hf: dict[str, Any]) -> tuple[str, type[DecoderModel]]:
    """(architecture, class) for a config.json: the first known ``architectures`` entry, else
    its ``model_type``; a config with neither is read as Llama."""
    _load()
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in _REGISTRY:
            return arch, _REGISTRY[arch]
    model_type = hf.get("model_type")
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    if not archs and model_type is None:
        return "LlamaForCausalLM", _REGISTRY["LlamaForCausalLM"]
    raise ModelLoadError(
        f"unsupported architecture {archs or model_type!r} (model_type {model_type!r}); "
        f"supported: {supported_architectures()}"
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    arch, cls = resolve(hf)
    return cls.config_from_hf(hf, arch)


def model_class(cfg: ModelConfig) -> type[DecoderModel]:
    _load()
    cls = _REGISTRY.get(cfg.architecture)
    if cls is None:
        raise ModelLoadError(
            f"unsupported architecture {cfg.architecture!r}; supported: {supported_architectures()}"
        )
    return cls


def create_model(
    cfg: ModelConfig, weights: dict[str, torch.Tensor], ops: ModuleType, device: torch.device
) -> DecoderModel:
    """The model for ``cfg`` over ``weights`` (Hugging Face names), on ``device``."""
    return model_class(cfg)(cfg, weights, ops, device)
