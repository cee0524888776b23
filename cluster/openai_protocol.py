"""OpenAI API request bodies (pydantic) and their translation to SamplingParams.

Owns field names, types, defaults and bounds of ``/v1/completions`` and
``/v1/chat/completions`` (OpenAI's, plus vLLM's extras such as ``top_k`` and ``ignore_eos``).
Unknown fields are ignored, as vLLM does. Response bodies are built as plain dicts by the HTTP
server. Must not run requests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from splitserve.errors import InvalidRequestError
from splitserve.sampling_params import SamplingParams

PromptField = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class StreamOptions(BaseModel):
    """``stream_options`` of a streaming request."""

    include_usage: bool = False
    """Send a last chunk with ``usage`` (and ``"usage": null`` on every other chunk)."""
    continuous_usage_stats: bool = False
    """Accepted for vLLM compatibility; usage is sent in the last chunk only."""


class _SamplingFields(BaseModel):
    """Fields the two endpoints share, in OpenAI / vLLM names."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """Served model name; defaults to the only model served."""
    n: int = Field(1, ge=1, le=128)
    """Completions per prompt."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """Softmax temperature (OpenAI range [0, 2]); default 1."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    top_k: int | None = Field(None, ge=-1)
    """vLLM extra: keep the k most likely tokens (-1 disables)."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """vLLM extra: minimum probability relative to the best token."""
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    """Seed of the request's draws (same seed and prompt give the same text)."""
    stop: str | list[str] | None = None
    """Strings that end generation (left out of the text)."""
    stop_token_ids: list[StrictInt] | None = None
    """vLLM extra: token ids that end generation."""
    stream: bool = False
    """Stream server-sent events."""
    stream_options: StreamOptions | None = None
    """Options of a streaming response."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Accepted only as 0 (the engine has no penalties yet)."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Accepted only as 0 (the engine has no penalties yet)."""
    ignore_eos: bool = False
    """vLLM extra: keep generating after EOS."""
    min_tokens: int = Field(0, ge=0)
    """vLLM extra: tokens before EOS may end the request."""
    skip_special_tokens: bool = True
    """vLLM extra: leave special tokens out of the text."""
    include_stop_str_in_output: bool = False
    """vLLM extra: keep the matched stop string."""
    user: str | None = None
    """Ignored."""

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Engine parameters; raises InvalidRequestError naming the field."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported yet (use 0)", field=name)
        kwargs: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "seed": None if self.seed is None else self.seed % 2**63,
        }
        for name in ("temperature", "top_p", "top_k", "min_p"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return SamplingParams(**kwargs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """Body of ``POST /v1/completions``."""

    prompt: PromptField
    """Text, token ids, or a batch of either (one choice list entry per prompt and sample)."""
    max_tokens: int | None = Field(16, ge=1)
    """Most tokens to generate per completion (OpenAI default 16)."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Top log-probabilities per token (OpenAI allows up to 5; vLLM 20)."""
    echo: bool = False
    """Accepted only as false."""
    suffix: str | None = None
    """Accepted only as null."""

    def to_sampling_params(self) -> SamplingParams:
        if self.echo:
            raise InvalidRequestError("echo is not supported", field="echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", field="suffix")
        return self.sampling_params(self.max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    """One chat message; content is a string or a list of OpenAI content parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    """The conversation so far."""
    max_tokens: int | None = Field(None, ge=1)
    """Deprecated OpenAI name of max_completion_tokens."""
    max_completion_tokens: int | None = Field(None, ge=1)
    """Most tokens to generate per choice (default: up to the context length)."""
    logprobs: bool = False
    """Return log-probabilities of the output tokens."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """Most likely alternatives per token (needs logprobs=true)."""
    add_generation_prompt: bool = True
    """vLLM extra: end the prompt with the assistant turn's header."""
    tools: list[dict[str, Any]] | None = None
    """Refused for now (no tool-call parser yet) rather than silently ignored."""
    tool_choice: str | dict[str, Any] | None = None
    """Only ``"none"`` (or unset) is accepted."""
    response_format: dict[str, Any] | None = None
    """Only ``{"type": "text"}`` (or unset) is accepted: no guided decoding yet."""

    def _check_unsupported(self) -> None:
        if self.tools:
            raise InvalidRequestError("tools are not supported yet", field="tools")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice is not supported yet", field="tool_choice")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequestError(
                "response_format other than text is not supported yet", field="response_format"
            )

    def to_sampling_params(self) -> SamplingParams:
        self._check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", field="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self.sampling_params(max_tokens, logprobs)


class TokenizeRequest(BaseModel):
    """Body of ``POST /tokenize``: ``prompt`` or ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    """Body of ``POST /detokenize``."""

    model: str | None = None
    tokens: list[StrictInt]
