"""Value types crossing the router's boundary: configuration, requests in, placements out.

Owns: ``RouterConfig``, ``RouteRequest``, ``Placement``, ``Migration`` and the
``InstanceRole`` names. Must not: hold mutable state or import anything but the
``splitserve`` vocabulary.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitserve.errors import ConfigError, InvalidRequestError


class InstanceRole(enum.StrEnum):
    """What an instance may be asked to do; one instance may hold several roles."""

    PREFILL = "prefill"
    DECODE = "decode"
    ENCODE = "encode"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Settings shared by the router and its policies."""

    ttft_slo_s: float = 5.0
    """TTFT SLO in seconds; DualMap falls back to load when both candidates would exceed it."""
    block_size: int = 512
    """Tokens per prefix block in the block hashes the router receives."""
    prefix_key_blocks: int = 2
    """K: the routing key is the chained hash of a request's first K blocks."""
    virtual_nodes: int = 160
    """Points per instance on each consistent-hash ring (more: smoother shares, slower joins)."""
    default_prefill_rate_tps: float = 10_000.0
    """Prefill tokens/s assumed for an instance until its first measured prefill."""
    rate_ewma_alpha: float = 0.2
    """Weight of the newest measurement in the prefill-rate moving average."""
    local_prefill_max_tokens: int = 0
    """Skip remote prefill when the decode instance's uncached prompt is at most this (0: never)."""
    default_kv_capacity_blocks: int = 1_000
    """KV capacity (in blocks) assumed for an instance added without one."""
    max_migrations_per_rebalance: int = 64
    """Upper bound on the migrations one ``rebalance`` call returns."""

    def __post_init__(self) -> None:
        if not (self.ttft_slo_s > 0 and math.isfinite(self.ttft_slo_s)):
            raise ConfigError(
                f"ttft_slo_s must be a positive number of seconds, got {self.ttft_slo_s}"
            )
        _require_positive("block_size", self.block_size)
        _require_positive("prefix_key_blocks", self.prefix_key_blocks)
        _require_positive("virtual_nodes", self.virtual_nodes)
        _require_positive("default_prefill_rate_tps", self.default_prefill_rate_tps)
        _require_positive("default_kv_capacity_blocks", self.default_kv_capacity_blocks)
        if not 0 < self.rate_ewma_alpha <= 1:
            raise ConfigError(f"rate_ewma_alpha must be in (0, 1], got {self.rate_ewma_alpha}")
        if self.local_prefill_max_tokens < 0:
            raise ConfigError(
                f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens}"
            )
        if self.max_migrations_per_rebalance < 0:
            raise ConfigError(
                "max_migrations_per_rebalance must be >= 0, got "
                f"{self.max_migrations_per_rebalance}"
            )


def _require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the router needs to know about a request to place it."""

    request_id: str
    """Unique id; every later event about the request uses it."""
    prompt_len: int
    """Prompt length in tokens."""
    block_hashes: Sequence[int] = ()
    """Chained hashes of the prompt's full blocks (``splitserve.hashing.hash_block_tokens``)."""
    image_hashes: Sequence[int] = ()
    """Content hashes of its images (``splitserve.hashing.hash_bytes``); empty: text only."""
    max_output_tokens: int = 0
    """Output budget, used to reserve decode KV (0: prompt only)."""
    ttft_slo_s: float | None = None
    """This request's own TTFT SLO (e.g. scaled with its prompt length); None: the config's."""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise InvalidRequestError("request_id must be a non-empty string", field="request_id")
        if self.prompt_len < 0:
            raise InvalidRequestError(
                f"prompt_len must be >= 0, got {self.prompt_len}", field="prompt_len"
            )
        if self.max_output_tokens < 0:
            raise InvalidRequestError(
                f"max_output_tokens must be >= 0, got {self.max_output_tokens}",
                field="max_output_tokens",
            )
        if self.ttft_slo_s is not None and not (
            self.ttft_slo_s > 0 and math.isfinite(self.ttft_slo_s)
        ):
            raise InvalidRequestError(
                f"ttft_slo_s must be a positive number of seconds, got {self.ttft_slo_s}",
                field="ttft_slo_s",
            )


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request runs. The router has already charged the loads it implies."""

    request_id: str
    prefill_instance: str | None
    """Instance that prefills the prompt; None when ``skip_remote_prefill``."""
    decode_instance: str
    """Instance that decodes (and prefills locally when ``skip_remote_prefill``)."""
    skip_remote_prefill: bool
    """True: the uncached prompt is short, the decode instance prefills it itself."""
    encode_instances: tuple[str, ...] = ()
    """One encode instance per image hash, in the request's image order (affinity by content)."""
    cached_tokens: int = 0
    """Prompt tokens the chosen prefill instance (or decode, when skipping) already holds."""
    predicted_ttft_s: float = 0.0
    """The router's predicted time to first token at the chosen instance."""
    candidates: tuple[str, ...] = field(default=())
    """Instances the policy considered first (DualMap: its two hash candidates)."""
    fallback: bool = False
    """True when the policy overrode its first choice because of load (DualMap's SLO fallback)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """Move a queued request that has not started prefill from ``source`` to ``target``."""

    request_id: str
    source: str
    target: str
    predicted_ttft_s: float
    """Predicted TTFT of the request at ``target`` when the move was decided."""
