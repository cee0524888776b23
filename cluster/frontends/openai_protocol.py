"""OpenAI API request bodies (pydantic) and their translation to SamplingParams.

Owns field names, types, defaults and bounds of ``/v1/completions`` and
``/v1/chat/completions`` (OpenAI's, plus vLLM's extras such as ``top_k`` and ``ignore_eos``).
Unknown fields are ignored, as vLLM does; fields of OpenAI's or vLLM's that the
engine does not implement are declared and refused (400 naming them) unless neutral. Response bodies are built as plain dicts by the HTTP
server. Must not run requests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from splitserve.cluster.frontends import tool_parsers
from splitserve.errors import InvalidRequestError
from splitserve.sampling_params import (
    PoolingParams,
    SamplingParams,
    StructuredOutputsParams,
    embedding_request,
)

PromptField = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class StreamOptions(BaseModel):
    """``stream_options`` of a streaming request."""

    include_usage: StrictBool = False
    """Send a last chunk with ``usage`` (and ``"usage": null`` on every other chunk)."""
    continuous_usage_stats: StrictBool = False
    """vLLM extra: with ``include_usage``, every chunk carries the usage so far."""


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """The JSON schema the output must validate against."""
    strict: StrictBool | None = None
    """Accepted; the schema is always enforced by the grammar."""


class ResponseFormat(BaseModel):
    """OpenAI ``response_format``: text, any JSON object, or a JSON schema; vLLM's and
    SGLang's ``structural_tag`` too (``format``, or the older ``structures`` and
    ``triggers``: see ``StructuredOutputsParams.structural_tag``)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    format: dict[str, Any] | None = None
    structures: list[Any] | None = None
    triggers: list[Any] | None = None

    def structural_tag(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("format", "structures", "triggers")
                if getattr(self, k) is not None}


class FunctionDefinition(BaseModel):
    """``tools[i].function``."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """JSON schema of the arguments (default: no arguments)."""
    strict: StrictBool | None = None


class ToolParam(BaseModel):
    """One entry of ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: NamedFunction


def _checked(so: StructuredOutputsParams, field: str) -> StructuredOutputsParams:
    """``so`` after a tokenizer-free grammar check whose errors name ``field``."""
    from splitserve.roles.engine.structured import check_structured

    try:
        check_structured(so)
    except InvalidRequestError as e:
        message = str(e).replace(so.field, field, 1)
        raise InvalidRequestError(message, field=field) from e
    return so


DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty")
"""Sampling fields a model's generation config gives defaults for (with ``max_tokens``)."""


class _SamplingFields(BaseModel):
    """Fields the two endpoints share, in OpenAI / vLLM names."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """Served model name; defaults to the only model served."""
    n: StrictInt = Field(1, ge=1, le=128)
    """Completions per prompt."""
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    """Softmax temperature (OpenAI range [0, 2]); default 1."""
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    top_k: StrictInt | None = Field(None, ge=-1)
    """vLLM extra: keep the k most likely tokens (-1 disables)."""
    min_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    """vLLM extra: minimum probability relative to the best token."""
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)
    """Seed of the request's draws (same seed and prompt give the same text)."""
    stop: str | list[str] | None = None
    """Strings that end generation (left out of the text)."""
    stop_token_ids: list[StrictInt] | None = None
    """vLLM extra: token ids that end generation."""
    stream: StrictBool = False
    """Stream server-sent events."""
    stream_options: StreamOptions | None = None
    """Options of a streaming response."""
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    """Subtracted from the logit of each token already in the output (default 0, or the
    model's generation config)."""
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    """Subtracted from a token's logit once per time it is already in the output."""
    logit_bias: dict[str, StrictFloat] | None = None
    """Token id (as a string, as OpenAI's) -> bias in [-100, 100] added to its logit."""
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0)
    """vLLM extra: logits of tokens in the prompt or output divided (positive) or multiplied
    (negative) by it."""
    allowed_token_ids: list[StrictInt] | None = None
    """vLLM extra: only these token ids can be generated."""
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    """vLLM extra: each prompt token's log-probability given the tokens before it, plus this
    many top ones (completions: in each choice; chat: at the top of the response)."""
    bad_words: list[str] | None = None
    """vLLM extra: words never generated (as written or after a space)."""
    truncate_prompt_tokens: StrictInt | None = None
    """vLLM extra: keep the prompt's last k tokens (-1: the context length's worth)."""
    cache_salt: str | None = None
    """vLLM extra: share prefix-cache KV only with requests of the same salt."""
    return_tokens_as_token_ids: StrictBool = False
    """vLLM extra: logprobs name tokens ``token_id:<id>`` instead of by their text."""
    return_token_ids: StrictBool = False
    """vLLM extra: the prompt's token ids (``prompt_token_ids``) and each choice's generated
    ids (``token_ids``) beside the text; streamed, the prompt's once (chat: in the first
    chunk; completions: in each choice's first chunk) and each chunk's own ids."""
    priority: StrictInt = 0
    """vLLM extra (priority scheduling): lower runs first; other than 0 needs the server's
    ``--scheduling-policy priority``."""
    ignore_eos: StrictBool = False
    """vLLM extra: keep generating after EOS."""
    min_tokens: StrictInt = Field(0, ge=0)
    """vLLM extra: tokens before EOS may end the request."""
    skip_special_tokens: StrictBool = True
    """vLLM extra: leave special tokens out of the text."""
    include_stop_str_in_output: StrictBool = False
    """vLLM extra: keep the matched stop string."""
    user: str | None = None
    """Ignored."""
    request_id: str | None = None
    """vLLM extra: the client's name of its request, as the ``X-Request-Id`` header (which
    wins when both are given): the response's ``id``, and what an abort names."""
    response_format: ResponseFormat | None = None
    """OpenAI structured output: ``json_object`` or ``json_schema`` (``text``: unconstrained)."""
    structured_outputs: dict[str, Any] | None = None
    """vLLM extra: one of ``json``, ``regex``, ``choice``, ``grammar`` (plus
    ``disable_any_whitespace``); exclusive with ``response_format``."""
    # Fields of OpenAI's and vLLM's that the engine does not implement. They are declared so
    # that a request which relies on one gets a 400 naming it instead of a 200 that silently
    # ignored it; their neutral values (as a client library fills them in) are accepted.
    best_of: StrictInt | None = Field(None, ge=1)
    """Accepted only as n (no best-of ranking; vLLM's V1 engine dropped it too)."""
    use_beam_search: StrictBool = False
    """vLLM extra; accepted only as false."""
    length_penalty: StrictFloat | None = None
    """vLLM extra (beam search); accepted only as 1."""
    guided_json: Any = None
    """vLLM's former name of ``structured_outputs.json``; accepted only as null."""
    guided_regex: Any = None
    """Former name of ``structured_outputs.regex``; accepted only as null."""
    guided_choice: Any = None
    """Former name of ``structured_outputs.choice``; accepted only as null."""
    guided_grammar: Any = None
    """Former name of ``structured_outputs.grammar``; accepted only as null."""

    def _refuse_unimplemented(self) -> None:
        """InvalidRequestError naming the first field set to something the engine would
        otherwise ignore."""
        neutral = {
            "best_of": self.best_of is None or self.best_of == self.n,
            "use_beam_search": not self.use_beam_search,
            "length_penalty": self.length_penalty in (None, 1.0),
        }
        for name, ok in neutral.items():
            if not ok:
                raise InvalidRequestError(f"{name} is not supported yet", field=name)
        for kind in ("json", "regex", "choice", "grammar"):
            if getattr(self, f"guided_{kind}") is not None:
                raise InvalidRequestError(
                    f"guided_{kind} is vLLM's former name: give structured_outputs: "
                    f'{{"{kind}": ...}} (or response_format)', field=f"guided_{kind}")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options needs stream=true", field="stream_options")

    def structured(self) -> StructuredOutputsParams | None:
        """The output constraint of ``response_format`` / ``structured_outputs``, checked."""
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.structured_outputs is not None:
            raise InvalidRequestError(
                "give response_format or structured_outputs, not both", field="response_format"
            )
        if self.structured_outputs is not None:
            so = SamplingParams(structured_outputs=self.structured_outputs).structured_outputs
            assert isinstance(so, StructuredOutputsParams)
            return _checked(so, so.field)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.type == "structural_tag":
            try:
                so = StructuredOutputsParams(structural_tag=fmt.structural_tag())
            except InvalidRequestError as e:
                raise InvalidRequestError(str(e).replace("structured_outputs.structural_tag",
                                                         "response_format"),
                                          field="response_format") from e
            return _checked(so, "response_format")
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format of type json_schema needs json_schema.schema",
                field="response_format.json_schema",
            )
        so = StructuredOutputsParams(json=fmt.json_schema.schema_)
        return _checked(so, "response_format.json_schema.schema")

    def constraint_field(self) -> str | None:
        """The request field the output constraint came from, for errors the cluster raises
        after the frontend's check (a compile timeout); None: ``structured_outputs.<kind>``."""
        fmt = self.response_format
        if self.structured_outputs is not None or fmt is None or fmt.type == "text":
            return None
        if fmt.type in ("json_object", "structural_tag"):
            return "response_format"
        return "response_format.json_schema.schema"

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None,
        structured: StructuredOutputsParams | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """Engine parameters; raises InvalidRequestError naming the field. ``defaults``: the
        model's generation config (``roles/models/generation_config``), for the sampling fields
        and ``max_tokens`` the request left unset, as vLLM applies it."""
        self._refuse_unimplemented()
        defaults = defaults or {}
        kwargs: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens if max_tokens is not None else defaults.get("max_tokens"),
            "min_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "seed": None if self.seed is None else self.seed % 2**63,
            "structured_outputs": structured or self.structured(),
            "logit_bias": self._logit_bias(),
            "allowed_token_ids": self.allowed_token_ids,
            "prompt_logprobs": self.prompt_logprobs,
            "bad_words": self.bad_words,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "cache_salt": self.cache_salt,
            "priority": self.priority,
        }
        for name in DEFAULTABLE:  # the request's, else the model's, else SamplingParams'
            value = getattr(self, name)
            value = value if value is not None else defaults.get(name)
            if value is not None:
                kwargs[name] = value
        return SamplingParams(**kwargs)

    def _logit_bias(self) -> dict[int, float] | None:
        """``logit_bias`` with its keys as token ids (zero biases dropped)."""
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            if not (key.isascii() and key.isdigit()):
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids (decimal integers), got {key!r}",
                    field="logit_bias")
            if bias:
                out[int(key)] = float(bias)
        return out or None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's ``continuous_usage_stats`` (with ``include_usage``): usage on every chunk."""
        return self.include_usage and bool(
            self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingFields):
    """Body of ``POST /v1/completions``."""

    prompt: PromptField
    """Text, token ids, or a batch of either (one choice list entry per prompt and sample)."""
    max_tokens: StrictInt | None = Field(16, ge=0)
    """Most tokens to generate per completion (OpenAI default 16); 0 only with ``echo``
    (the prompt alone, with its logprobs: how evaluation harnesses score a text)."""
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    """Top log-probabilities per token (OpenAI allows up to 5; vLLM 20)."""
    echo: StrictBool = False
    """Prepend the prompt to each choice's text; with ``logprobs``, the prompt tokens'
    logprobs come first too (the first token's null)."""
    suffix: str | None = None
    """Accepted only as null."""

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens=0``: the prompt is the whole answer."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", field="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens must be >= 1 (0 only with echo)",
                                      field="max_tokens")
        # echo_only: one token is drawn and dropped (the engine always computes one)
        params = self.sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs,
                                      defaults=defaults)
        if self.echo and self.logprobs is not None:  # the echoed prompt's logprobs
            params.prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        return params


class ChatMessage(BaseModel):
    """One chat message; content is a string or a list of OpenAI content parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls (rendered by templates that know tools)."""
    tool_call_id: str | None = None
    """A tool turn: the call it answers."""
    reasoning_content: str | None = None
    """An assistant turn's thinking, as a reasoning parser returned it (templates that know
    it, Qwen3's, render it; others leave it out)."""


class ChatCompletionRequest(_SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    """The conversation so far."""
    max_tokens: StrictInt | None = Field(None, ge=1)
    """Deprecated OpenAI name of max_completion_tokens."""
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """Most tokens to generate per choice (default: up to the context length)."""
    logprobs: StrictBool = False
    """Return log-probabilities of the output tokens."""
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    """Most likely alternatives per token (needs logprobs=true)."""
    add_generation_prompt: StrictBool = True
    """vLLM extra: end the prompt with the assistant turn's header."""
    continue_final_message: StrictBool = False
    """vLLM extra: the prompt ends inside the last (assistant) message, which the model goes
    on with (needs add_generation_prompt false)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM extra: more variables for the chat template (e.g. Qwen3's enable_thinking)."""
    echo: StrictBool = False
    """vLLM extra: the last message's text in front of the answer when it is the answer's
    turn (an assistant message, or any with ``add_generation_prompt`` false)."""
    chat_template: str | None = None
    """vLLM extra (a template of the request's own); accepted only as null: the model's
    template applies."""
    tools: list[ToolParam] | None = Field(None, max_length=128)
    """Functions the model may call (rendered by the chat template when it knows tools)."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """none, auto (default with tools; needs --tool-call-parser), required or a named function;
    required and named are enforced by a grammar built from the tools' schemas."""
    parallel_tool_calls: StrictBool = True
    """With ``required``: false allows exactly one call."""
    include_reasoning: StrictBool = True
    """vLLM extra: with a server's ``--reasoning-parser``, false leaves the thinking out of
    the response (it is still generated; ``enable_thinking`` in chat_template_kwargs is what
    turns Qwen3's off)."""

    def effective_tool_choice(self) -> str | dict[str, Any] | None:
        """None (no tool calls), "auto", "required" or ``{"type", "function": {"name"}}``."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise InvalidRequestError("tool_choice needs tools", field="tool_choice")
            return None
        if choice is None:
            return "auto"
        if choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            tool_parsers.named_tool(self.tool_dicts(), choice.function.name)
            return choice.model_dump()
        return choice

    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def _tool_constraint(self, choice: str | dict[str, Any] | None) -> StructuredOutputsParams | None:
        if choice is None or choice == "auto":
            return None
        if self.structured_outputs is not None or (
            self.response_format is not None and self.response_format.type != "text"
        ):
            raise InvalidRequestError(
                "tool_choice required or a named function cannot be combined with "
                "response_format or structured_outputs", field="tool_choice",
            )
        tools = self.tool_dicts()
        for i, tool in enumerate(tools):
            _checked(StructuredOutputsParams(json=tool_parsers.parameters_schema(tool)),
                     f"tools.{i}.function.parameters")
        schema = tool_parsers.tool_choice_schema(tools, choice, self.parallel_tool_calls)
        return _checked(StructuredOutputsParams(json=schema), "tool_choice")

    def echo_text(self) -> str:
        """``echo``: the text put in front of each choice's content, as vLLM's: the last
        message's when the answer continues its turn, else nothing."""
        last = self.messages[-1]
        if not self.echo or (self.add_generation_prompt and last.role != "assistant"):
            return ""
        if isinstance(last.content, list):
            return "".join(str(p.get("text", "")) for p in last.content if p.get("type") == "text")
        return last.content or ""

    def constraint_field(self) -> str | None:
        if self.effective_tool_choice() not in (None, "auto"):
            return "tool_choice"  # required / named: the grammar built from the tools
        return super().constraint_field()

    def to_sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.chat_template is not None:
            raise InvalidRequestError("a request's own chat_template is not supported; the "
                                      "model's applies", field="chat_template")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", field="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        forced = self._tool_constraint(self.effective_tool_choice())
        return self.sampling_params(max_tokens, logprobs, forced, defaults)


class TokenizeRequest(BaseModel):
    """Body of ``POST /tokenize``: ``prompt`` or ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: StrictBool = False
    """vLLM extra: each token's vocabulary string beside its id (``token_strs``)."""


class DetokenizeRequest(BaseModel):
    """Body of ``POST /detokenize``."""

    model: str | None = None
    tokens: list[StrictInt]


class EmbeddingRequest(BaseModel):
    """Body of ``POST /v1/embeddings`` (OpenAI's, with vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: PromptField
    """Text, token ids, or a batch of either (one embedding per entry, in order)."""
    encoding_format: Literal["float", "base64"] = "float"
    """float: a list of numbers; base64: the float32 values' little-endian bytes."""
    dimensions: StrictInt | None = Field(None, ge=1)
    """Keep the first ``dimensions`` values (Matryoshka), then normalize."""
    user: str | None = None
    truncate_prompt_tokens: StrictInt | None = None
    """vLLM extra: keep the last k tokens of each input (-1: the last ``max_model_len``)."""
    add_special_tokens: StrictBool = True
    """vLLM extra: add the tokenizer's special tokens (BOS) to text inputs."""
    normalize: StrictBool | None = None
    """vLLM extra: L2-normalize (default: the model's pooler, normalized for a decoder)."""
    request_id: str | None = None
    """vLLM extra: the response's ``id``."""

    def to_sampling_params(self) -> SamplingParams:
        return embedding_request(PoolingParams(normalize=self.normalize,
                                               dimensions=self.dimensions),
                                 self.truncate_prompt_tokens)


class ScoreRequest(BaseModel):
    """Body of ``POST /score`` (vLLM's): ``text_1`` against ``text_2`` one to one, one to
    many (a string and a list) or pairwise (two lists of one length)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: StrictInt | None = None
    request_id: str | None = None


class RerankRequest(BaseModel):
    """Body of ``POST /rerank`` (Jina's and Cohere's, as vLLM serves it)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str
    documents: list[str]
    top_n: StrictInt | None = Field(None, ge=0)
    """The n most relevant (0 or unset: all)."""
    return_documents: StrictBool = True
    truncate_prompt_tokens: StrictInt | None = None
    request_id: str | None = None
