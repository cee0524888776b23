"""Engine configuration: frozen dataclasses validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splitserve.errors import ConfigError
from splitserve.roles.engine.speculative import SpeculativeConfig
from splitserve.sampling_params import POOLING_TYPES

if TYPE_CHECKING:
    import torch

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_QUANTIZATIONS = ("auto", "none", "int4", "int8", "w4a8")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
"""``kv_cache_dtype`` values, as vLLM's: auto (the model's dtype), fp8 = fp8_e4m3."""
_INT4_GROUP_SIZES = (32, 64, 128, 256)
SCHEDULING_POLICIES = ("fcfs", "priority")
"""vLLM's ``scheduling_policy`` values."""


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one step may carry."""

    max_num_seqs: int = 128
    """Most sequences (each of a request's ``n`` samples is one) in one step; groups of
    samples share them fairly while others wait."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks + decodes)."""
    enable_chunked_prefill: bool = True
    """Split prompts longer than the remaining budget across steps."""
    policy: str = "fcfs"
    """fcfs: first come, first served; priority: by ``SamplingParams.priority`` (lower
    first), then arrival."""

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ConfigError(
                f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine instance needs to start."""

    model: str | None = None
    """Hugging Face folder, .gguf file, or None for the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer folder to use instead of the model's own (vLLM's
    ``tokenizer``): for a GGUF, the base model's tokenizer rather than the one rebuilt from
    the file; None: the model's (``loader.tokenizer_override``)."""
    dtype: str = "float32"
    """Activations, float weights and KV cache: float32, bfloat16, float16, or auto (bfloat16
    on a CPU with native bf16 (flags + a matmul probe) or a GPU, float32 otherwise)."""
    quantization: str = "auto"
    """Weight format: auto (the default: a GGUF's own codes, Q4_0/1/K, Q5_0/1/K, Q6_K, Q3_K,
    Q2_K, Q8_0, IQ4, as vLLM and llama.cpp serve a GGUF; HF folders stay float), none (float:
    a GGUF dequantized, the reference that equals transformers), int4 or int8 (projections
    quantized at load; see roles/models/quantize.py), w4a8 (int4's weights with activations
    quantized to 8 bits on CPU: faster, less exact)."""
    kv_cache_dtype: str = "auto"
    """KV cache elements: auto (the activations' dtype), or fp8 / fp8_e4m3 / fp8_e5m2 (one
    byte each, no scale: half bfloat16's memory and bytes read per decode step; values
    clamped to the format's range, rounded to nearest even; see ``kv_cache_torch_dtype``)."""
    int4_group_size: int = 32
    """Columns per scale when quantizing float weights to int4 (32 or 128 usually)."""
    device: str = "cpu"
    """Torch device of the model and the KV cache."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory_bytes: int = 1 << 30
    """Bytes of KV cache to allocate (all layers, K and V)."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks (overrides kv_cache_memory_bytes; tests use it)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); defaults to the model's context length."""
    enable_prefix_caching: bool = True
    """Reuse KV of identical prompt prefixes by chained block hash."""
    max_num_seqs: int = 128
    """Most sequences in one step (each of a request's ``n`` samples is one)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step."""
    max_n: int = 16
    """Most samples (``n``) one request may ask for; more is refused (field ``n``)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps."""
    scheduling_policy: str = "fcfs"
    """fcfs (arrival order) or priority (``SamplingParams.priority``, lower first; vLLM's)."""
    seed: int = 0
    """Seed for requests that give none (their per-request seed is drawn from it)."""
    num_threads: int | None = None
    """Torch intra-op threads on CPU (None: torch's default)."""
    encoder_cache_bytes: int = 256 << 20
    """Image-embedding cache of a multimodal model's vision tower, by content hash."""
    pooler_config: dict[str, Any] | None = None
    """Embeddings' pooler over the model's own (vLLM's ``pooler_config``): ``{"pooling_type":
    "LAST" | "MEAN" | "CLS", "normalize": bool}``; None: the model folder's
    sentence-transformers config, else LAST, normalized (``roles/engine/pooling.py``)."""
    speculative_config: SpeculativeConfig | None = None
    """Draft-free speculative decoding, vLLM's dict form accepted
    (``{"method": "ngram" | "suffix", "num_speculative_tokens": k, ...}``); None: off."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.int4_group_size not in _INT4_GROUP_SIZES:
            raise ConfigError(
                f"int4_group_size must be one of {_INT4_GROUP_SIZES}, got {self.int4_group_size}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_bytes < 1:
            raise ConfigError("kv_cache_memory_bytes must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_n < 1:
            raise ConfigError(f"max_n must be >= 1, got {self.max_n}")
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens,  # validates
                        policy=self.scheduling_policy)
        object.__setattr__(self, "pooler_config", check_pooler_config(self.pooler_config))
        spec = SpeculativeConfig.from_any(self.speculative_config)  # a dict becomes a config
        object.__setattr__(self, "speculative_config", spec)

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            self.max_num_seqs, self.max_num_batched_tokens, self.enable_chunked_prefill,
            self.scheduling_policy,
        )


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: ``model_dtype`` for auto; e4m3fn for fp8 and fp8_e4m3
    (vLLM's fp8 on GPUs; 3 mantissa bits, up to 448), e5m2 for fp8_e5m2 (2 bits, up to
    57344)."""
    import torch

    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    if kv_cache_dtype == "fp8_e5m2":
        return torch.float8_e5m2
    raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def check_pooler_config(value: Any) -> dict[str, Any] | None:
    """``EngineConfig.pooler_config``: None or ``{"pooling_type": LAST|MEAN|CLS,
    "normalize": bool}`` (vLLM's keys; either may be left out)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"pooler_config must be a mapping, got {value!r}")
    unknown = sorted(set(value) - {"pooling_type", "normalize"})
    if unknown:
        raise ConfigError(f"pooler_config: unknown keys {unknown}; known: normalize, pooling_type")
    kind = value.get("pooling_type")
    if kind is not None and (not isinstance(kind, str) or kind.upper() not in POOLING_TYPES):
        raise ConfigError(f"pooler_config.pooling_type must be one of {POOLING_TYPES}, got {kind!r}")
    if "normalize" in value and not isinstance(value["normalize"], bool):
        raise ConfigError(f"pooler_config.normalize must be true or false, got {value['normalize']!r}")
    return {k: (v.upper() if k == "pooling_type" else v) for k, v in value.items()}
