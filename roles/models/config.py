"""ModelConfig: the architecture numbers of a Llama-family model, from config.json or GGUF.

A LLaVA-style config.json (``model_type: "llava"``) nests the language model under
``text_config`` and the CLIP vision tower under ``vision_config``; ModelConfig describes the
language model and carries the vision side as ``LlavaConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from splitserve.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only Llama-family transformer."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    llava: LlavaConfig | None = None
    """Vision tower + projector of a LLaVA-style model; None for text-only models."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token across layers, per byte of dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def is_multimodal(self) -> bool:
        return self.llava is not None

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        if cfg.get("model_type") == "llava" or "vision_config" in cfg:
            return _from_llava_dict(cfg)
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=window,
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    return None if rope_type in (None, "default") else dict(scaling)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP vision tower (``clip_vision_model``)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ModelLoadError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LlavaConfig:
    """What turns an image into language-model embeddings, and where they go in the prompt."""

    vision: VisionConfig
    image_token_id: int
    """The placeholder token; one per image in a prompt, expanded to ``num_image_tokens``."""
    feature_layers: tuple[int, ...] = (-2,)
    """Hidden states of the vision tower fed to the projector (several are concatenated)."""
    select_strategy: str = "default"
    """"default" drops the CLS token, "full" keeps it."""
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self) -> None:
        if self.select_strategy not in ("default", "full"):
            raise ModelLoadError(
                "vision_feature_select_strategy must be 'default' or 'full', got "
                f"{self.select_strategy!r}"
            )

    @property
    def num_image_tokens(self) -> int:
        """Feature tokens per image: one per patch, plus CLS under "full"."""
        return self.vision.num_patches + (self.select_strategy == "full")


def _from_llava_dict(cfg: dict[str, Any]) -> ModelConfig:
    text = dict(cfg.get("text_config") or {})
    text.setdefault("architectures", ["LlamaForCausalLM"])
    if text.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise ModelLoadError(f"unsupported LLaVA text_config.model_type {text['model_type']!r}")
    config = ModelConfig.from_hf_dict(text)
    image_token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if image_token is None or not 0 <= int(image_token) < config.vocab_size:
        raise ModelLoadError(f"image_token_index {image_token!r} is not in the text vocabulary")
    v = cfg.get("vision_config") or {}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ModelLoadError(f"unsupported vision tower {v['model_type']!r} (CLIP only)")
    vision = VisionConfig(
        hidden_size=v.get("hidden_size", 768),
        intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        num_channels=v.get("num_channels", 3),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        hidden_act=v.get("hidden_act", "quick_gelu"),
    )
    layers = cfg.get("vision_feature_layer", -2)
    llava = LlavaConfig(
        vision=vision,
        image_token_id=int(image_token),
        feature_layers=(int(layers),) if isinstance(layers, int) else tuple(layers),
        select_strategy=cfg.get("vision_feature_select_strategy", "default"),
        projector_act=cfg.get("projector_hidden_act", "gelu"),
        projector_bias=cfg.get("multimodal_projector_bias", True),
    )
    return replace(config, llava=llava)
