"""SamplingParams: how to pick tokens and when to stop, in vLLM's names and defaults.

``StructuredOutputsParams`` (vLLM's ``structured_outputs``) says which grammar the output must
follow; it is checked for shape here and compiled by ``roles/engine/structured.py``.
"""

from __future__ import annotations

import hashlib
import json as _json
import math
from dataclasses import dataclass, field
from typing import Any

from splitserve.errors import InvalidRequestError

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One output constraint (exactly one of the fields), in vLLM's names.

    Travels inside ``SamplingParams`` to every worker that touches the request; each compiles
    it (cached by ``content_hash``), so no extra state crosses the wire.
    """

    json: str | dict[str, Any] | None = None
    """A JSON schema (dict or JSON text) the output must validate against."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: tuple[str, ...] | list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar in EBNF (GBNF style: ``root ::= ...``)."""
    json_object: bool = False
    """Any JSON object (OpenAI ``response_format: {"type": "json_object"}``)."""
    structural_tag: str | dict[str, Any] | None = None
    """xgrammar's structural tag (dict or JSON text), as vLLM's: ``{"format": {...}}`` (a
    format of tags, triggered tags, sequences...) or the older ``{"structures": [{"begin",
    "schema", "end"}], "triggers": [...]}`` (free text until a trigger, then the structure
    it starts)."""
    disable_any_whitespace: bool = True
    """JSON without free whitespace (compact separators). Default true here, unlike vLLM:
    small models otherwise loop on whitespace; false allows any whitespace."""
    think_end: str | None = None
    """Set by a server's reasoning parser: the tag that ends the model's thinking. The
    constraint then applies from the token after it and the thinking before it is free
    (``roles/engine/structured.py``'s gate), as vLLM enforces structured outputs after
    reasoning."""
    think_start: str | None = None
    """The tag that opens thinking: the answer's first token may begin it instead of the
    constraint's first token (the tag's other tokens then follow, forced)."""
    thinking: bool = False
    """The prompt left a think block open: the answer starts inside the thinking."""

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise InvalidRequestError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, "
                f"json_object, structural_tag; got {set_kinds or 'none'}",
                field="structured_outputs",
            )
        self._check_types()

    def _check_types(self) -> None:
        where = f"structured_outputs.{self.kind}"
        for tag in (self.think_start, self.think_end):
            if tag is not None and (not isinstance(tag, str) or not 0 < len(tag) <= 64):
                raise InvalidRequestError("think tags are strings of 1-64 characters",
                                          field="structured_outputs")
        if self.json is not None and not isinstance(self.json, str | dict):
            raise InvalidRequestError(f"{where} must be a JSON schema object", field=where)
        if isinstance(self.json, str):
            try:
                loaded = _json.loads(self.json)
            except ValueError as e:
                raise InvalidRequestError(f"{where} is not valid JSON: {e}", field=where) from e
            if not isinstance(loaded, dict | bool):
                raise InvalidRequestError(f"{where} must be a JSON schema object", field=where)
        if self.structural_tag is not None:
            loaded_tag: Any = self.structural_tag
            if isinstance(loaded_tag, str):
                try:
                    loaded_tag = _json.loads(loaded_tag)
                except ValueError as e:
                    raise InvalidRequestError(f"{where} is not valid JSON: {e}",
                                              field=where) from e
            if not isinstance(loaded_tag, dict) or not (
                    "format" in loaded_tag or "structures" in loaded_tag):
                raise InvalidRequestError(
                    f'{where} must be an object with "format" (or the older "structures" and '
                    '"triggers")', field=where)
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise InvalidRequestError(f"{where} must be a non-empty string", field=where)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise InvalidRequestError(f"{where} must be a non-empty string", field=where)
        if self.choice is not None and (
            not self.choice or any(not isinstance(c, str) or not c for c in self.choice)
        ):
            raise InvalidRequestError(f"{where} must be a list of non-empty strings", field=where)

    @property
    def kind(self) -> str:
        """Which constraint: json, regex, choice, grammar or json_object."""
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def field(self) -> str:
        """The request field to name in errors about this constraint."""
        return f"structured_outputs.{self.kind}"

    @property
    def schema(self) -> Any:
        """The JSON schema as a Python object (json kind only)."""
        return _json.loads(self.json) if isinstance(self.json, str) else self.json

    @property
    def tag(self) -> dict[str, Any]:
        """The structural tag as a Python object (structural_tag kind only)."""
        tag = self.structural_tag
        return dict(_json.loads(tag) if isinstance(tag, str) else tag or {})

    @property
    def spec(self) -> str:
        """The constraint's canonical text (what the grammar is compiled from)."""
        if self.kind == "json":
            return _json.dumps(self.schema, separators=(",", ":"))  # key order matters
        if self.kind == "structural_tag":
            return _json.dumps(self.tag, separators=(",", ":"))
        if self.kind == "choice":
            return _json.dumps(list(self.choice or ()))
        if self.kind == "json_object":
            return ""
        return str(getattr(self, self.kind))

    @property
    def content_hash(self) -> str:
        """Hash of kind, whitespace mode and spec: the compiled-grammar cache key."""
        text = f"{self.kind}\0{int(self.disable_any_whitespace)}\0{self.spec}"
        return hashlib.sha256(text.encode()).hexdigest()

POOLING_TYPES = ("LAST", "MEAN", "CLS")
"""How a prompt's final hidden states become one embedding: the last token's (a decoder's
usual, and vLLM's default for them), their mean, or the first token's."""


@dataclass(frozen=True)
class PoolingParams:
    """An embedding request (vLLM's ``PoolingParams``, for ``LLM.embed`` and
    ``/v1/embeddings``): the prompt's hidden states after the model's final norm, pooled, cut
    to ``dimensions`` and normalized. Fields left None take the engine's pooler (the model's
    sentence-transformers pooling config, else LAST with normalization; ``pooler_config``
    overrides it)."""

    pooling_type: str | None = None
    """LAST, MEAN or CLS (any case)."""
    normalize: bool | None = None
    """Divide by the L2 norm (after cutting to ``dimensions``)."""
    dimensions: int | None = None
    """Matryoshka: keep the first ``dimensions`` values (1 to the hidden size)."""

    def __post_init__(self) -> None:
        kind = self.pooling_type
        if kind is not None:
            if not isinstance(kind, str) or kind.upper() not in POOLING_TYPES:
                raise InvalidRequestError(
                    f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {kind!r}",
                    field="pooling_type")
            object.__setattr__(self, "pooling_type", kind.upper())
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidRequestError(
                f"normalize must be true or false, got {self.normalize!r}", field="normalize")
        dims = self.dimensions
        if dims is not None and (not _is_token_id(dims) or dims < 1):
            raise InvalidRequestError(
                f"dimensions must be an integer >= 1, got {dims!r}", field="dimensions")


_MAX_LOGPROBS = 20
_MAX_BAD_WORDS = 256
"""Each bad word is checked against every row's output at every step."""
_MAX_BAD_WORD_CHARS = 256


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters (validated on construction)."""

    n: int = 1
    """Number of completions to return for the prompt."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """Tokens to generate before EOS or stop token ids may end the request."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 or 0 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Seed of the request's draws; each draw depends only on (seed, position)."""
    stop: str | list[str] | None = None
    """Strings that end generation; they never appear in the returned text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (besides EOS)."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks)."""
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token (plus the sampled one)."""
    prompt_logprobs: int | None = None
    """vLLM extra: return the log-probability of each prompt token (after the first) under
    the model given the tokens before it, plus this many top log-probabilities per position
    (raw model distribution). The request then computes its whole prompt: it reads nothing
    from the prefix cache."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar (a dict is converted)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already in the output (OpenAI; [-2, 2])."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it is already in the output ([-2, 2])."""
    repetition_penalty: float = 1.0
    """Logits of tokens in the prompt or the output divided by it when positive, multiplied
    when negative (CTRL, as vLLM and transformers; > 0, 1 is off)."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before the penalties and sampling (OpenAI;
    each bias in [-100, 100]; ids are checked against the vocabulary on intake)."""
    allowed_token_ids: list[int] | None = None
    """vLLM extra: only these token ids can be generated (checked against the vocabulary on
    intake; EOS too must be listed to end the request early)."""
    bad_words: list[str] | None = None
    """vLLM extra: words never generated. Each is tokenized as written and with a leading
    space; the last token of either form is banned wherever the output so far ends with the
    tokens before it (a one-token word: everywhere)."""
    truncate_prompt_tokens: int | None = None
    """vLLM extra: keep only the prompt's last k tokens (k >= 1, at most the context length);
    -1: the last ``max_model_len``."""
    cache_salt: str | None = None
    """vLLM extra: the prefix cache shares KV only between requests with the same salt (a
    tenant's secret, e.g. 43 random base64 characters, so another cannot time its prompts
    by their cache hits). Not a sampling parameter, but it travels with them."""
    priority: int = 0
    """vLLM extra (a request argument there): with ``scheduling_policy="priority"``, lower
    values are admitted first and preempted last; any other value than 0 is refused under
    ``fcfs``. Not a sampling parameter, but it travels with them."""
    pooling: PoolingParams | dict[str, Any] | None = None
    """Set by ``LLM.embed`` and ``/v1/embeddings``: the request returns the prompt's embedding
    (``RequestOutput.embedding``) and ends at the prompt (``max_tokens`` 1, ``n`` 1; the
    one sampled token is not part of the answer). A dict is converted."""
    stop_list: list[str] = field(init=False, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, init=False, repr=False)
    """``bad_words`` as token sequences, set by the engine that runs the request."""

    def __post_init__(self) -> None:
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = _structured_from_dict(self.structured_outputs)
        if isinstance(self.pooling, dict):
            self.pooling = PoolingParams(**self.pooling)
        self._validate()

    def _validate(self) -> None:
        def bad(field_name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{field_name} {why}", field=field_name)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", f"must be -1 (disabled), 0 (disabled) or >= 1, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= _MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {_MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not _is_token_id(self.prompt_logprobs) or self.prompt_logprobs > _MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs",
                      f"must be an integer in [0, {_MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_list):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, f"must be in [-2, 2], got {value!r}")
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0 < rp < math.inf:
            raise bad("repetition_penalty", f"must be a finite number > 0, got {rp!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must map token ids to biases")
            for token, bias in self.logit_bias.items():
                if not _is_token_id(token):
                    raise bad("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
                if not _is_number(bias) or not -100 <= bias <= 100:
                    raise bad("logit_bias", f"biases must be in [-100, 100], got {bias!r} for {token}")
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, list | tuple) or not allowed:
                raise bad("allowed_token_ids", "must be a non-empty list of token ids")
            if not all(_is_token_id(t) for t in allowed):
                raise bad("allowed_token_ids", "must hold token ids (integers >= 0)")
            self.allowed_token_ids = list(allowed)
        words = self.bad_words
        if words is not None:
            if not isinstance(words, list | tuple) or not all(
                isinstance(w, str) and w.strip() for w in words
            ):
                raise bad("bad_words", "must be a list of non-blank strings")
            if len(words) > _MAX_BAD_WORDS:
                raise bad("bad_words", f"has {len(words)} words; at most {_MAX_BAD_WORDS}")
            if any(len(w) > _MAX_BAD_WORD_CHARS for w in words):
                raise bad("bad_words", f"words must be at most {_MAX_BAD_WORD_CHARS} characters "
                          "(each is tokenized by every engine that runs the request)")
            self.bad_words = list(words)
        tpt = self.truncate_prompt_tokens
        if tpt is not None and (not isinstance(tpt, int) or isinstance(tpt, bool)
                                or not (tpt == -1 or tpt >= 1)):
            raise bad("truncate_prompt_tokens", f"must be -1 or an integer >= 1, got {tpt!r}")
        salt = self.cache_salt
        if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 1024):
            raise bad("cache_salt", "must be a non-empty string of at most 1024 characters")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise bad("structured_outputs", "must be a StructuredOutputsParams or a dict")
        prio = self.priority
        if not _is_int(prio) or not -2**31 <= prio < 2**31:
            raise bad("priority", f"must be a 32-bit integer, got {prio!r}")
        if self.pooling is not None:
            if not isinstance(self.pooling, PoolingParams):
                raise bad("pooling", "must be a PoolingParams or a dict")
            if self.max_tokens != 1 or self.n != 1:
                raise bad("pooling", "requests end at their prompt: max_tokens and n must be 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """An allow-list, bad words, a bias or a penalty changes the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias
                    or self.allowed_token_ids or self.bad_words)

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop_list), default=0)


def _is_token_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x  # rejects NaN


def _structured_from_dict(data: dict[str, Any]) -> StructuredOutputsParams:
    known = set(_KINDS) | {"disable_any_whitespace"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequestError(
            f"structured_outputs has unknown field(s) {unknown}; known: {sorted(known)}",
            field=f"structured_outputs.{unknown[0]}",
        )
    return StructuredOutputsParams(**data)


def embedding_request(pooling: PoolingParams | None = None,
                      truncate_prompt_tokens: int | None = None) -> SamplingParams:
    """The parameters of an embedding request (``LLM.embed``, ``/v1/embeddings``, gRPC
    ``Embed``, score / rerank): one greedy token, dropped, after the pooled prompt."""
    return SamplingParams(max_tokens=1, temperature=0.0, pooling=pooling or PoolingParams(),
                          truncate_prompt_tokens=truncate_prompt_tokens)
