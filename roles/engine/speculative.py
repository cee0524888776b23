"""Speculative decoding without a draft model: its configuration and the per-step policy.

Owns ``SpeculativeConfig`` (vLLM's ``speculative_config`` keys, validated; every error names
the setting) and the ``Speculator``: for each running request that is decoding, how many
draft tokens to verify this step (the proposer's guess, cut to the room left before
``max_tokens`` / ``max_model_len`` and to the step's token budget, and turned down when the
request's recent acceptance is low or the batch is large), and the counters behind the
``splitserve:spec_decode_*`` metrics.

Verification itself is the runner's (k + 1 decode rows over the request's own cache) and the
rejection sampler's (``rejection_sampler.py``); rollback is the scheduler's. This module must
not touch KV or tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from splitserve.errors import ConfigError
from splitserve.roles.engine.proposer import Proposer, create_proposer
from splitserve.roles.engine.request import Request

SETTING = "speculative_config"
METHODS = ("ngram", "suffix")
MAX_SPECULATIVE_TOKENS = 16
"""Cap on ``num_speculative_tokens``: a verify chunk is k + 1 rows per request, and past this
a draft-free guess is almost never accepted in full."""

_VERIFY_COST_PER_TOKEN = 0.04
"""Step time one more verified row adds, relative to a one-request decode step, per request
in the batch (CPU, SmolLM2: weight streaming dominates at a few rows; bench/spec_decode.py)."""
_PRIOR_ACCEPTANCE = 0.7
_EMA_WEIGHT = 0.3
_RELAX = 0.02
"""Per step without speculation, a request's acceptance estimate drifts back toward the
prior, so a request that turned speculation off tries again later."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Draft-free speculative decoding (``LLM(..., speculative_config={...})``)."""

    method: str
    """``ngram`` (prompt lookup) or ``suffix`` (suffix decoding)."""
    num_speculative_tokens: int
    """Most draft tokens verified per request per step (1 .. MAX_SPECULATIVE_TOKENS)."""
    prompt_lookup_min: int = 2
    """ngram: shortest suffix n-gram looked up in the prompt and output."""
    prompt_lookup_max: int = 5
    """ngram: longest suffix n-gram looked up (tried first)."""
    suffix_decoding_max_tree_depth: int = 24
    """suffix: longest substring the tries count (context match + draft)."""
    suffix_decoding_max_cached_requests: int = 1000
    """suffix: finished requests whose outputs the global trie keeps (FIFO; 0: none)."""
    suffix_decoding_max_spec_factor: float = 1.0
    """suffix: draft length <= this * length of the matched context suffix."""
    suffix_decoding_min_token_prob: float = 0.1
    """suffix: stop the draft where its estimated probability falls below this."""
    disable_by_batch_size: int | None = None
    """Do not speculate while this many requests or more are decoding (None: no limit)."""
    adaptive: bool = True
    """Turn each request's draft length down when its acceptance is low or the batch is
    large (a cost model); False verifies whatever the proposer offers, up to k."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _bad("method", f"unknown method {self.method!r}; supported: {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise _bad("num_speculative_tokens",
                       f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not _is_int(lo) or lo < 1:
            raise _bad("prompt_lookup_min", f"must be an integer >= 1, got {lo!r}")
        if not _is_int(hi) or hi < lo:
            raise _bad("prompt_lookup_max", f"must be an integer >= prompt_lookup_min ({lo}), "
                                            f"got {hi!r}")
        depth = self.suffix_decoding_max_tree_depth
        if not _is_int(depth) or depth < k + 1:
            raise _bad("suffix_decoding_max_tree_depth",
                       f"must be an integer > num_speculative_tokens ({k}), got {depth!r}")
        cached = self.suffix_decoding_max_cached_requests
        if not _is_int(cached) or cached < 0:
            raise _bad("suffix_decoding_max_cached_requests", f"must be an integer >= 0, got {cached!r}")
        factor = self.suffix_decoding_max_spec_factor
        if not isinstance(factor, int | float) or isinstance(factor, bool) or not factor > 0:
            raise _bad("suffix_decoding_max_spec_factor", f"must be a number > 0, got {factor!r}")
        prob = self.suffix_decoding_min_token_prob
        if not isinstance(prob, int | float) or isinstance(prob, bool) or not 0 <= prob <= 1:
            raise _bad("suffix_decoding_min_token_prob", f"must be in [0, 1], got {prob!r}")
        batch = self.disable_by_batch_size
        if batch is not None and (not _is_int(batch) or batch < 1):
            raise _bad("disable_by_batch_size", f"must be an integer >= 1 or null, got {batch!r}")
        if not isinstance(self.adaptive, bool):
            raise _bad("adaptive", f"must be true or false, got {self.adaptive!r}")

    @classmethod
    def from_any(cls, value: SpeculativeConfig | Mapping[str, Any] | None) -> SpeculativeConfig | None:
        """A config from vLLM's dict form (or None: speculation off). Unknown keys are errors."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, Mapping):
            raise _bad("", 'must be a mapping such as {"method": "ngram", '
                           f'"num_speculative_tokens": 4}}, got {value!r}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise _bad(unknown[0], f"unknown setting; known: {', '.join(sorted(known))}")
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise _bad(required, "is required")
        return cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SpeculativeConfigError(ConfigError):
    """A bad ``speculative_config``; ``setting`` is the key at fault ("" for the whole)."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{SETTING}{'.' if setting else ''}{setting}: {reason}")
        self.setting = setting
        self.reason = reason


def _bad(name: str, why: str) -> ConfigError:
    return SpeculativeConfigError(name, why)


@dataclass
class SpecDecodeStats:
    """Counters since start (the Prometheus ``splitserve:spec_decode_*`` metrics)."""

    num_drafts: int = 0
    """Verify chunks run (one per speculating request per step)."""
    num_draft_tokens: int = 0
    """Draft tokens proposed and verified."""
    num_accepted_tokens: int = 0
    """Draft tokens the target model agreed with (and that were kept)."""
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify chunk: accepted drafts plus the target's own token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_acceptance_rate": self.acceptance_rate,
            "spec_decode_mean_accepted_length": self.mean_accepted_length,
        }


class Speculator:
    """Per step and request: the draft to verify; afterwards: what was accepted."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        self.proposer = proposer or create_proposer(config)
        self.stats = SpecDecodeStats()
        self._acceptance: dict[str, float] = {}
        """Per request: running estimate of the chance that a draft token is accepted."""

    def draft(self, request: Request, room: int, batch_size: int) -> list[int]:
        """Draft tokens for a decoding request, at most ``room`` (budget and length left).

        ``batch_size``: requests decoding this step. Returns [] when speculation is off for
        this request now.
        """
        cfg = self.config
        limit = min(cfg.num_speculative_tokens, room, self._room_to_finish(request))
        if cfg.disable_by_batch_size is not None and batch_size >= cfg.disable_by_batch_size:
            return []
        if cfg.adaptive:
            limit = min(limit, self._best_length(request.request_id, batch_size))
        if limit < 1:
            return []
        return self.proposer.propose(request, limit)[:limit]

    @staticmethod
    def _room_to_finish(request: Request) -> int:
        """Drafts beyond max_tokens can never be kept: the verify chunk would overshoot."""
        return request.max_tokens - request.num_output_tokens - 1

    def _best_length(self, request_id: str, batch_size: int) -> int:
        """Draft length with the most expected tokens per unit of step time (0: none).

        With acceptance ``a`` per token, k drafts yield ``1 + a + ... + a^k`` tokens and cost
        ``1 + c * k * batch_size`` (c: one verified row's share of a step). A request whose
        acceptance sank drifts back toward the prior while it does not speculate.
        """
        a = self._acceptance.get(request_id, _PRIOR_ACCEPTANCE)
        cost = _VERIFY_COST_PER_TOKEN * max(batch_size, 1)
        best_k, best_rate, gain, term = 0, 1.0, 1.0, 1.0
        for k in range(1, self.config.num_speculative_tokens + 1):
            term *= a
            gain += term
            rate = gain / (1.0 + cost * k)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k == 0:
            self._acceptance[request_id] = a + _RELAX * (_PRIOR_ACCEPTANCE - a)
        return best_k

    def record(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        """A verify chunk of ``num_draft`` tokens kept ``num_accepted`` of them."""
        if num_draft <= 0:
            return
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_draft
        s.num_accepted_tokens += num_accepted
        while len(s.accepted_per_position) < num_draft:
            s.accepted_per_position.append(0)
        for i in range(num_accepted):
            s.accepted_per_position[i] += 1
        # per-token acceptance seen in this chunk (accepted / tried, a rejection ends a chunk)
        tried = min(num_accepted + 1, num_draft)
        rate = num_accepted / tried
        a = self._acceptance.get(request_id, _PRIOR_ACCEPTANCE)
        self._acceptance[request_id] = (1 - _EMA_WEIGHT) * a + _EMA_WEIGHT * rate

    def finish(self, request: Request) -> None:
        """The request left the engine: drop its state (the proposer may learn from it)."""
        self._acceptance.pop(request.request_id, None)
        self.proposer.finish(request)
