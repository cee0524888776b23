"""What generation returns: RequestOutput and CompletionOutput, shaped as in vLLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """Log-probability of one token and its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a prompt. In streaming deltas, text and token_ids are the new part."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result (or a streamed delta) of one request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Timestamps (time.time()) such as arrival, first_token, finished."""
    kv_transfer_params: dict[str, Any] | None = None
    """Set by a prefill engine that handed the request off: where a decode engine pulls its KV."""
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: per prompt token, its log-probability given
    the tokens before it (with the top ones), None for the first. In the first output after
    the prompt is computed; None in every other."""
    embedding: list[float] | None = None
    """With ``SamplingParams.pooling``: the prompt's embedding, in the output that finishes
    the request."""


@dataclass
class EmbeddingOutput:
    """One prompt's embedding (vLLM's name)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """What ``LLM.embed`` returns per prompt (vLLM's shape: ``out.outputs.embedding``)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
