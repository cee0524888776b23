"""ModelConfig: the architecture numbers of a decoder-only model, from config.json or GGUF.

Owns the one frozen description every model file builds from: shapes, norms, rotary tables,
which layers attend inside a sliding window, soft-caps, mixture-of-experts routing. The
fields common to every family are read here (``base_fields``); each architecture file adds
its own (``roles/models/registry.py`` picks the file). A LLaVA-style config.json
(``model_type: "llava"``) nests the language model under ``text_config`` and the CLIP vision
tower under ``vision_config``; ModelConfig describes the language model and carries the
vision side as ``LlavaConfig``. It must not read weights or build modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from splitserve.errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
"""Rotary scaling variants the tables in ``kernels/reference.py`` implement."""
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh")
"""Gate activations of the gated MLPs (``blocks.GatedMLP``)."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer over a paged KV cache."""

    architecture: str
    """The ``architectures`` entry that chose the model file, e.g. ``"Qwen3ForCausalLM"``."""
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
    """Non-default rotary scaling (``rope_type`` one of ROPE_TYPES), or None."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    embedding_only: bool = False
    """A base model's checkpoint (``architectures`` such as ``Qwen3Model``, as
    sentence-transformers embedding models ship: no language-model head, tensors without the
    ``model.`` prefix): served for embeddings; the input embeddings stand in as the head of
    the one token an embedding request samples and drops, and generation is refused."""
    sliding_window: int | None = None
    """Window of the windowed layers (tokens a query sees, itself included), None if none."""
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    llava: LlavaConfig | None = None
    """Vision tower + projector of a LLaVA-style model; None for text-only models."""
    hidden_act: str = "silu"
    """Gate activation of the MLPs (one of ACTIVATIONS)."""
    layer_windows: tuple[int | None, ...] | None = None
    """Per layer: its window, or None for global attention. None: every layer uses
    ``sliding_window``."""
    rope_local_theta: float | None = None
    """Rotary base of the windowed layers when it differs from ``rope_theta`` (Gemma 3)."""
    partial_rotary_factor: float = 1.0
    """Fraction of each head's dims that rotary rotates (the rest pass through)."""
    query_pre_attn_scalar: float | None = None
    """Attention scale is ``query_pre_attn_scalar ** -0.5`` when set, else ``head_dim ** -0.5``."""
    attn_logit_softcap: float | None = None
    """``cap * tanh(score / cap)`` on attention scores (Gemma 2)."""
    final_logit_softcap: float | None = None
    """``cap * tanh(logit / cap)`` on the output logits (Gemma 2)."""
    num_experts: int = 0
    """Experts per MoE layer; 0 for dense models."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 0
    """Intermediate size of one expert."""
    norm_topk_prob: bool = True
    """Renormalize the top-k router probabilities to sum to one."""
    moe_layers: tuple[bool, ...] | None = None
    """Per layer: True where the MLP is a mixture of experts. None: every layer when
    ``num_experts`` > 0."""
    attention_multiplier: float | None = None
    """The attention scale itself where the config gives one (Granite)."""
    embedding_multiplier: float | None = None
    """Embeddings are multiplied by this (Granite); None: by ``sqrt(hidden_size)`` where the
    family scales them (Gemma), else not at all."""
    residual_multiplier: float = 1.0
    """Each block's output is multiplied by this before the residual add (Granite)."""
    logits_scaling: float = 1.0
    """Output logits are divided by this (Granite)."""
    rope_layers: tuple[bool, ...] | None = None
    """Per layer: False where the layer's attention applies no rotary embedding (SmolLM3's
    NoPE layers). None: every layer applies it."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {list(ACTIVATIONS)}"
            )
        for name in ("layer_windows", "moe_layers", "rope_layers"):
            per_layer = getattr(self, name)
            if per_layer is not None and len(per_layer) != self.num_layers:
                raise ModelLoadError(
                    f"{name} has {len(per_layer)} entries for {self.num_layers} layers"
                )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelLoadError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_experts ({self.num_experts})]"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ModelLoadError(
                f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token across layers, per byte of dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def is_multimodal(self) -> bool:
        return self.llava is not None

    @property
    def attention_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, None when it attends globally."""
        if self.layer_windows is None:
            return self.sliding_window
        return self.layer_windows[layer]

    @property
    def uniform_window(self) -> int | None:
        """The window every layer attends inside (the largest when they differ): blocks
        before it can be freed. None when some layer attends globally (mixed models)."""
        windows = [self.window(i) for i in range(self.num_layers)]
        if not windows or any(w is None for w in windows):
            return None
        return max(w for w in windows if w is not None)

    def is_moe_layer(self, layer: int) -> bool:
        if self.moe_layers is not None:
            return self.moe_layers[layer]
        return self.num_experts > 0

    @property
    def kv_layer_windows(self) -> str:
        """Each layer's window, comma-separated (0 = global), as the KV layout carries it."""
        return ",".join(str(self.window(i) or 0) for i in range(self.num_layers))

    @property
    def kv_signature(self) -> str:
        """What a peer's KV must agree on beyond the cache shapes and windows: architecture,
        attention scale and soft-cap, rotary tables, norms on K. Two workers whose caches
        have equal shapes but differ here would compute different KV for the same tokens."""
        rope = f"{self.rope_theta}/{self.rope_local_theta}/{self.rotary_dim}/{self.rope_scaling}"
        return (
            f"{self.architecture};heads={self.num_heads};scale={self.attention_scale!r};"
            f"softcap={self.attn_logit_softcap};rope={rope}"
        )

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """The config of a config.json; the registry picks the architecture file that reads
        the family's own fields. Unknown architectures fail listing the supported ones."""
        if cfg.get("model_type") == "llava" or "vision_config" in cfg:
            return _from_llava_dict(cfg)
        from splitserve.roles.models.registry import config_from_hf

        return config_from_hf(cfg)


def base_fields(cfg: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The ModelConfig fields every family spells the same way in config.json."""
    num_heads = _required(cfg, "num_attention_heads")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return dict(
        architecture=architecture,
        vocab_size=_required(cfg, "vocab_size"),
        hidden_size=_required(cfg, "hidden_size"),
        intermediate_size=_required(cfg, "intermediate_size"),
        num_layers=_required(cfg, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or _required(cfg, "hidden_size") // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=rope_theta(cfg),
        rope_scaling=rope_scaling(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False) or _base_model(cfg),
        embedding_only=_base_model(cfg),
        attention_bias=cfg.get("attention_bias", False),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
    )


def _base_model(cfg: dict[str, Any]) -> bool:
    """config.json names only base-model classes (``Qwen3Model``, ``LlamaModel``): no head."""
    archs = cfg.get("architectures") or []
    return bool(archs) and all(isinstance(a, str) and a.endswith("Model") for a in archs)


def _required(cfg: dict[str, Any], name: str) -> Any:
    if cfg.get(name) is None:
        raise ModelLoadError(f"config.json: required field {name!r} is missing")
    return cfg[name]


def rope_theta(cfg: dict[str, Any], params: dict[str, Any] | None = None) -> float:
    params = params if params is not None else (cfg.get("rope_parameters") or {})
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def rope_scaling(
    cfg: dict[str, Any], scaling: dict[str, Any] | None = None, where: str = "rope_scaling"
) -> dict[str, Any] | None:
    """The non-default rotary scaling of a config, None for plain RoPE; an unknown type
    fails naming the field and value."""
    if scaling is None:
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in ("su", "yarn") and "short_factor" in scaling:  # Phi-3's old names
        rope_type = "longrope"
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported {where}.rope_type {rope_type!r}; supported: {list(ROPE_TYPES)}"
        )
    return {**scaling, "rope_type": rope_type}


def layer_windows_from(cfg: dict[str, Any], window: int | None) -> tuple[int | None, ...] | None:
    """Per-layer windows from ``layer_types`` ("sliding_attention" / "full_attention"), or
    None when the config has no ``layer_types`` (the family decides)."""
    types = cfg.get("layer_types")
    if types is None:
        return None
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ModelLoadError(f"unsupported layer_types entry {unknown[0]!r}")
    if window is None and "sliding_attention" in types:
        raise ModelLoadError("layer_types has sliding_attention layers but sliding_window is null")
    return tuple(window if t == "sliding_attention" else None for t in types)


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


def qwen_layer_windows(
    cfg: dict[str, Any], num_layers: int
) -> tuple[int | None, tuple[int | None, ...] | None]:
    """(sliding_window, per-layer windows) of the Qwen families: windowed only under
    ``use_sliding_window``, on layers from ``max_window_layers`` on (unless ``layer_types``
    says otherwise)."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    windows = layer_windows_from(cfg, window)
    if windows is None and window is not None:
        first = cfg.get("max_window_layers", 28)
        windows = tuple(window if i >= first else None for i in range(num_layers))
    return window, windows
