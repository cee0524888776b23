"""gRPC frontend (grpc.aio): ``splitserve.v1.InferenceService``, health and reflection.

Owns the translation between the protobuf messages of ``proto/splitserve/v1/inference.proto``
and the Backend, gRPC status codes, the API key (``authorization`` metadata), the standard
``grpc.health.v1`` service (kept in step with ``Backend.health()``) and server reflection.
A deadline or a cancelled stream cancels the handler, which closes the backend stream and so
aborts the request and frees its KV. Must not know what kind of backend it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve import __version__
from splitserve.cluster.frontends import reasoning_parsers
from splitserve.cluster.frontends.auth import ApiKeyCheck
from splitserve.cluster.frontends.backend import Backend, PromptInput
from splitserve.cluster.frontends.metrics import RequestRecorder, ServerMetrics
from splitserve.cluster.frontends.prompts import (
    chat_prompt_ids,
    check_client_request_id,
    new_request_id,
)
from splitserve.cluster.frontends.streams import (
    EMBED_FIELDS,
    Accumulator,
    ChoiceDelta,
    EmbeddingLost,
    close_all,
    embed_all,
    merge,
    open_streams,
)
from splitserve.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    NoHealthyWorkerError,
    OverloadedError,
)
from splitserve.offload import off_loop
from splitserve.outputs import Logprob
from splitserve.proto.splitserve.v1 import inference_pb2 as pb
from splitserve.proto.splitserve.v1 import inference_pb2_grpc as pb_grpc
from splitserve.roles.engine.structured import check_structured
from splitserve.roles.models import generation_config as gen_config
from splitserve.roles.models.image import load_image
from splitserve.sampling_params import (
    PoolingParams,
    SamplingParams,
    StructuredOutputsParams,
    embedding_request,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
_HEALTH_POLL_S = 1.0
_OPTIONAL_SAMPLING = (
    "n",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "ignore_eos",
    "logprobs",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "prompt_logprobs",
    "truncate_prompt_tokens",
    "cache_salt",
    "priority",
)


def status_for(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message of a backend exception."""
    if isinstance(e, InvalidRequestError):
        field = e.field or "request"
        message = str(e) if field in str(e) else f"{field}: {e}"
        return grpc.StatusCode.INVALID_ARGUMENT, message
    if isinstance(e, DuplicateRequestError):
        return grpc.StatusCode.ALREADY_EXISTS, str(e)
    if isinstance(e, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e) or "server overloaded"
    if isinstance(e, NoHealthyWorkerError):
        return grpc.StatusCode.UNAVAILABLE, str(e) or "no healthy worker"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


async def _abort(context: grpc.aio.ServicerContext, e: BaseException) -> NoReturn:
    code, message = status_for(e)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def _load_proto(load: Any) -> pb.WorkerLoad:
    """A WorkerLoad message from the backend's snapshot; counters the proto does not carry
    (yet) stay out instead of failing the whole RPC."""
    fields = pb.WorkerLoad.DESCRIPTOR.fields_by_name
    return pb.WorkerLoad(**{k: v for k, v in vars(load).items() if k in fields})


def sampling_params_from_proto(msg: pb.SamplingParams,
                                defaults: dict[str, Any] | None = None) -> SamplingParams:
    """Engine parameters from the optional proto fields (unset: the model's generation config
    ``defaults``, then vLLM's defaults)."""
    kwargs: dict[str, Any] = dict(defaults or {})
    kwargs.update({name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)})
    if "seed" in kwargs:
        kwargs["seed"] %= 2**63
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.allowed_token_ids:
        kwargs["allowed_token_ids"] = list(msg.allowed_token_ids)
    if msg.bad_words:
        kwargs["bad_words"] = list(msg.bad_words)
    if msg.logit_bias:
        kwargs["logit_bias"] = {int(t): float(b) for t, b in msg.logit_bias.items() if b}
    return SamplingParams(**kwargs)


def structured_from_proto(request: pb.GenerateRequest) -> dict[str, Any] | None:
    """``GenerateRequest.structured_outputs`` as SamplingParams' dict form (None when unset)."""
    if not request.HasField("structured_outputs"):
        return None
    msg = request.structured_outputs
    kind = msg.WhichOneof("constraint")
    if kind is None:
        raise InvalidRequestError(
            "structured_outputs: set one of json, json_object, regex, choice, grammar, "
            "structural_tag",
            "structured_outputs",
        )
    value: Any = getattr(msg, kind)
    if kind == "choice":
        value = list(value.values)
    out: dict[str, Any] = {kind: value}
    if msg.HasField("disable_any_whitespace"):
        out["disable_any_whitespace"] = msg.disable_any_whitespace
    return out


def _messages(msg: pb.ChatMessages) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} for m in msg.messages]


def _template_kwargs(msg: pb.ChatMessages) -> dict[str, Any] | None:
    """``chat_template_kwargs`` as plain Python values (a Struct's numbers are floats: whole
    ones become ints, as JSON would give them)."""
    if not msg.HasField("chat_template_kwargs"):
        return None

    def plain(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in json_format.MessageToDict(msg.chat_template_kwargs).items()}


def _add_generation_prompt(msg: pb.ChatMessages) -> bool:
    return msg.add_generation_prompt if msg.HasField("add_generation_prompt") else True


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """``splitserve.v1.InferenceService`` over a Backend."""

    def __init__(
        self, backend: Backend, served_model_name: str | None, metrics: ServerMetrics | None,
        reasoning_parser: reasoning_parsers.ReasoningParser | None = None,
        generation_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.model_name = served_model_name or backend.model_id
        self.metrics = metrics or ServerMetrics(self.model_name)
        self.reasoning_parser = reasoning_parser
        """Splits chat answers' thinking into ``GenerateChunk.reasoning_text``."""
        self.generation_defaults = generation_defaults or {}
        """The model's generation config: defaults of the sampling fields left unset."""

    def _prompt(self, request: pb.GenerateRequest) -> PromptInput:
        prompt = self._input(request)
        if not request.images:
            return prompt
        if self.backend.image_token is None:
            raise InvalidRequestError(
                "images: the served model is text-only; it takes no images", "images"
            )
        images = list(request.images)
        for i, data in enumerate(images):  # a malformed image is this request's error
            load_image(data, field=f"images[{i}]")
        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        return {key: prompt, "multi_modal_data": {"image": images}}

    def _input(self, request: pb.GenerateRequest) -> str | list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            return request.text
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "messages":
            msgs = _messages(request.messages)
            return chat_prompt_ids(
                self.backend.tokenizer, msgs, _add_generation_prompt(request.messages),
                continue_final_message=request.messages.continue_final_message,
                template_kwargs=_template_kwargs(request.messages),
            )
        raise InvalidRequestError("input: set one of text, token_ids or messages", "input")

    def _check_model(self, model: str) -> None:
        if model and model not in (self.model_name, self.backend.model_id):
            raise _NotFound(f"model: `{model}` is not served here (serving `{self.model_name}`)")

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or new_request_id("grpc")
        recorder = self.metrics.recorder()  # starts the clock before the first token
        try:
            if request.request_id:
                check_client_request_id(request.request_id, "request_id")
            self._check_model(request.model)
            prompt = await off_loop(self._prompt, request)  # templates: off the loop
            params = sampling_params_from_proto(request.sampling_params,
                                                self.generation_defaults)
            structured = structured_from_proto(request)
            if structured is not None:
                params = dataclasses.replace(params, structured_outputs=structured)
                # INVALID_ARGUMENT before placement; off the loop (a large schema: seconds)
                await off_loop(check_structured, params.structured_outputs)
            thinking = None
            if self.reasoning_parser is not None and request.WhichOneof("input") == "messages":
                thinking, params = await self._reasoning(prompt, params)
            asked = request.sampling_params.HasField("max_tokens")  # else a default: capped
            streams = await open_streams(self.backend, [prompt], params, rid,
                                         max_tokens_asked=asked or "max_tokens" not in
                                         self.generation_defaults)
        except _NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except Exception as e:
            self.metrics.record_failure(status_for(e)[0].name)
            await _abort(context, e)
        try:
            async for response in self._stream(rid, params, streams, recorder, thinking):
                yield response
        finally:  # a cancelled call may never resume the generator: end its requests here
            await close_all(streams)

    async def _reasoning(self, prompt: PromptInput, params: SamplingParams
                         ) -> tuple[Callable[[], reasoning_parsers.ReasoningStream], SamplingParams]:
        """A chat request under the server's reasoning parser: a maker of each choice's
        splitter, and the params with a constraint gated on the thinking (as HTTP's)."""
        parser = self.reasoning_parser
        assert parser is not None
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        assert isinstance(ids, list)
        tail = str(await off_loop(self.backend.tokenizer.decode,
                                  ids[-reasoning_parsers.PROMPT_TAIL_TOKENS:],
                                  skip_special_tokens=False))
        so = params.structured_outputs
        if isinstance(so, StructuredOutputsParams):
            params = dataclasses.replace(params, structured_outputs=dataclasses.replace(
                so, think_start=parser.start, think_end=parser.end,
                thinking=parser.always_thinks or parser.prompt_opens(tail)))
        return (lambda: parser.stream(tail)), params

    async def _stream(
        self, rid: str, params: SamplingParams, streams: list[Any], recorder: RequestRecorder,
        thinking: Callable[[], reasoning_parsers.ReasoningStream] | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        acc = Accumulator(params.n)
        splitters: dict[int, reasoning_parsers.ReasoningStream] = {}
        stream = merge(streams)
        try:
            async for i, delta in stream:
                recorder.observe(delta)
                for cd in acc.add(i, delta):
                    chunk = _chunk(cd, params)
                    if thinking is not None:
                        splitter = splitters.get(cd.index)
                        if splitter is None:
                            splitter = splitters[cd.index] = thinking()
                        reasoning, content = splitter.feed(cd.text)
                        if cd.finish_reason is not None:
                            more_reasoning, more_content = splitter.finish()
                            reasoning, content = reasoning + more_reasoning, content + more_content
                        chunk.text, chunk.reasoning_text = content, reasoning
                    yield pb.GenerateResponse(request_id=rid, chunk=chunk)
        finally:
            await stream.aclose()
        reasons = [c.finish_reason for c in acc.ordered()]
        recorder.finish(sum(acc.prompt_tokens.values()), reasons)
        yield pb.GenerateResponse(request_id=rid, complete=_complete(acc, recorder.timing()))

    async def Abort(
        self,
        request: pb.AbortRequest,
        context: grpc.aio.ServicerContext,  # noqa: N802
    ) -> pb.AbortResponse:
        for rid in request.request_ids:
            await self.backend.abort(rid)
        return pb.AbortResponse()

    async def Embed(  # noqa: N802
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        """Each input's embedding, as ``/v1/embeddings`` computes it (``streams.embed_all``)."""
        rid = request.request_id or new_request_id("embd")
        recorder = self.metrics.recorder()
        try:
            if request.request_id:
                check_client_request_id(request.request_id, "request_id")
            self._check_model(request.model)
            inputs = await off_loop(self._embed_inputs, request)
            params = embedding_request(
                PoolingParams(
                    normalize=request.normalize if request.HasField("normalize") else None,
                    dimensions=request.dimensions if request.HasField("dimensions") else None),
                request.truncate_prompt_tokens if request.HasField("truncate_prompt_tokens")
                else None)
            vectors, tokens = await embed_all(self.backend, inputs, params, rid)
        except _NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except EmbeddingLost as e:
            self.metrics.record_failure("UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except InvalidRequestError as e:
            if e.field in EMBED_FIELDS:  # the engine's names for an input
                e = InvalidRequestError(str(e), field="inputs")
            self.metrics.record_failure(status_for(e)[0].name)
            await _abort(context, e)
        except Exception as e:
            self.metrics.record_failure(status_for(e)[0].name)
            await _abort(context, e)
        recorder.finish(sum(tokens), ["stop"] * len(inputs))
        return pb.EmbedResponse(request_id=rid, prompt_tokens=sum(tokens), embeddings=[
            pb.Embedding(values=v, prompt_tokens=n) for v, n in zip(vectors, tokens, strict=True)])

    def _embed_inputs(self, request: pb.EmbedRequest) -> list[PromptInput]:
        if not 1 <= len(request.inputs) <= 64:
            raise InvalidRequestError(
                f"inputs: give 1 to 64 inputs, got {len(request.inputs)}", "inputs")
        special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        inputs: list[PromptInput] = []
        for i, item in enumerate(request.inputs):
            kind = item.WhichOneof("input")
            if kind == "text":
                inputs.append(self.backend.tokenizer.encode(item.text, add_special_tokens=special))
            elif kind == "token_ids":
                inputs.append(list(item.token_ids.ids))
            else:
                raise InvalidRequestError(f"inputs[{i}]: set one of text or token_ids", "inputs")
        return inputs

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        tok = self.backend.tokenizer
        try:
            kind = request.WhichOneof("input")
            if kind == "messages":
                ids = await off_loop(
                    chat_prompt_ids,
                    tok, _messages(request.messages), _add_generation_prompt(request.messages),
                    continue_final_message=request.messages.continue_final_message,
                    template_kwargs=_template_kwargs(request.messages),
                )
            elif kind == "text":
                special = (
                    request.add_special_tokens if request.HasField("add_special_tokens") else True
                )
                ids = await off_loop(tok.encode, request.text, add_special_tokens=special)
            else:
                raise InvalidRequestError("input: set one of text or messages", "input")
        except Exception as e:
            await _abort(context, e)
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self.backend.max_model_len)

    async def Detokenize(  # noqa: N802
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        tok = self.backend.tokenizer
        if any(t >= tok.vocab_size for t in request.token_ids):
            await _abort(
                context,
                InvalidRequestError(f"token_ids must be in [0, {tok.vocab_size})", "token_ids"),
            )
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await off_loop(tok.decode, list(request.token_ids), skip)
        return pb.DetokenizeResponse(text=text)

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        model = pb.ModelInfo(
            id=self.model_name,
            root=self.backend.model_id,
            max_model_len=self.backend.max_model_len,
            owned_by="splitserve",
        )
        return pb.ListModelsResponse(models=[model])

    async def GetServerInfo(  # noqa: N802
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        h = await self.backend.health()
        fmt = await self.backend.formats()
        return pb.GetServerInfoResponse(
            version=__version__,
            model=self.model_name,
            max_model_len=self.backend.max_model_len,
            healthy=h.healthy,
            workers=h.workers,
            backend=self.backend.kind,
            **{k: str(fmt[k]) for k in ("dtype", "dtype_requested", "dtype_reason",
                                        "dtype_warning", "quantization", "kv_cache_dtype")
               if fmt.get(k)},
            weight_formats={str(k): int(v) for k, v in
                            (fmt.get("weight_formats") or {}).items()},
        )

    async def GetLoads(  # noqa: N802
        self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLoadsResponse:
        loads = await self.backend.loads()
        return pb.GetLoadsResponse(loads=[_load_proto(load) for load in loads])


class _NotFound(Exception):
    """An unknown model name (NOT_FOUND)."""


def _chunk(cd: ChoiceDelta, params: SamplingParams) -> pb.GenerateChunk:
    logprobs = [_token_logprob(step) for step in cd.logprobs or []]
    k = params.prompt_logprobs or 0
    prompt_logprobs = [  # the first prompt token has none: one entry per token after it
        pb.TokenLogprob() if step is None else _prompt_token_logprob(step, k)
        for step in (cd.prompt_logprobs or [])[1:]
    ]
    return pb.GenerateChunk(
        index=cd.index,
        token_ids=cd.token_ids,
        text=cd.text,
        logprobs=logprobs,
        finish_reason=cd.finish_reason or "",
        prompt_logprobs=prompt_logprobs,
    )


def _token_logprob(step: dict[int, Logprob]) -> pb.TokenLogprob:
    (tid, lp), *_ = step.items()  # the engine puts the sampled token first
    top = [
        pb.TopLogprob(token_id=t, token=p.decoded_token or "", logprob=p.logprob, rank=p.rank)
        for t, p in sorted(step.items(), key=lambda kv: kv[1].rank)
    ]
    return pb.TokenLogprob(
        token_id=tid,
        token=lp.decoded_token or "",
        logprob=lp.logprob,
        rank=lp.rank,
        top_logprobs=top,
    )


def _prompt_token_logprob(step: dict[int, Logprob], k: int) -> pb.TokenLogprob:
    """One prompt token's entry: the token's own logprob and rank, and exactly the top ``k``
    as ``top_logprobs`` (the engine puts the prompt token first, then the top ``k`` others:
    outside them, the token ranks last and is left out of ``top_logprobs``)."""
    (tid, lp), *_ = step.items()
    top = [
        pb.TopLogprob(token_id=t, token=p.decoded_token or "", logprob=p.logprob, rank=p.rank)
        for t, p in sorted(step.items(), key=lambda kv: kv[1].rank)[:k]
    ]
    return pb.TokenLogprob(
        token_id=tid, token=lp.decoded_token or "", logprob=lp.logprob, rank=lp.rank,
        top_logprobs=top,
    )


def _complete(acc: Accumulator, timing: dict[str, float]) -> pb.GenerateComplete:
    usage = acc.usage()
    details = usage["prompt_tokens_details"]
    assert isinstance(details, dict)
    results = [
        pb.CompletionResult(
            index=c.index,
            finish_reason=c.finish_reason or "abort",
            stop_reason="" if c.stop_reason is None else str(c.stop_reason),
            num_tokens=len(c.token_ids),
        )
        for c in acc.ordered()
    ]
    return pb.GenerateComplete(
        completions=results,
        usage=pb.Usage(
            prompt_tokens=usage["prompt_tokens"],  # type: ignore[arg-type]
            completion_tokens=usage["completion_tokens"],  # type: ignore[arg-type]
            total_tokens=usage["total_tokens"],  # type: ignore[arg-type]
            cached_tokens=details["cached_tokens"],
        ),
        timing=pb.Timing(**timing),
    )


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that may swap the method's handler for another (``wrap``)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return handler if handler is None else self.wrap(details, handler)

    def wrap(self, details: grpc.HandlerCallDetails,
             handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class ApiKeyInterceptor(_WrappingInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <key>``; health and reflection stay open."""

    def __init__(self, api_key: str) -> None:
        self.check = ApiKeyCheck(api_key)

    def wrap(self, details: grpc.HandlerCallDetails,
             handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.check.authorized(metadata.get("authorization")):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "invalid or missing API key (metadata authorization: Bearer <key>)"

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield None  # pragma: no cover

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kw)


class MalformedRequestInterceptor(_WrappingInterceptor):
    """INVALID_ARGUMENT, naming the message type, for a request that does not parse as its
    method's message (e.g. a string field that is not UTF-8). grpcio would answer UNKNOWN:
    the generated handlers parse before any servicer code runs. Health and reflection too."""

    def wrap(self, details: grpc.HandlerCallDetails,
             handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None or handler.request_streaming:
            return handler
        return _parse_leniently(handler)


class _Unparsed:
    """A request body that its deserializer refused."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parse_leniently(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 (protobuf's DecodeError, or any parser's)
            return _Unparsed(e)

    async def refuse(request: _Unparsed, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request does not parse: {request.error}")

    kw = {"request_deserializer": lenient, "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Unparsed):
                await refuse(request, context)
            result = inner_stream(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a coroutine that writes through the context
                await result

        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    inner = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsed):
            await refuse(request, context)
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, **kw)


async def _track_health(backend: Backend, servicer: health.aio.HealthServicer) -> None:
    """Mirror ``backend.health()`` into grpc.health.v1 (overall and per service)."""
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    while True:
        with contextlib.suppress(Exception):
            status = serving if (await backend.health()).healthy else not_serving
            for name in ("", SERVICE_NAME):
                await servicer.set(name, status)
        await asyncio.sleep(_HEALTH_POLL_S)


class GrpcServer:
    """A running grpc.aio server with its health tracker; ``stop(grace)`` drains it."""

    def __init__(
        self, server: grpc.aio.Server, health_servicer: Any, tracker: asyncio.Task[None]
    ) -> None:
        self.server, self.health, self.tracker = server, health_servicer, tracker

    async def stop(self, grace_s: float) -> None:
        self.tracker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.tracker
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_grpc_server(
    backend: Backend,
    host: str,
    port: int,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    metrics: ServerMetrics | None = None,
    credentials: grpc.ServerCredentials | None = None,
    reasoning_parser: str | None = None,
    generation_config: str = "auto",
) -> tuple[GrpcServer, int]:
    """Start the gRPC frontend on ``host:port`` (0: a free port); returns it and its port.
    With ``credentials`` it listens with TLS (``add_secure_port``) and nothing else."""
    # the key first: a caller without it is UNAUTHENTICATED whatever it sent
    interceptors: list[grpc.aio.ServerInterceptor] = [ApiKeyInterceptor(api_key)] if api_key else []
    interceptors.append(MalformedRequestInterceptor())
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(backend, served_model_name, metrics,
                          reasoning_parsers.create_parser(reasoning_parser)
                          if reasoning_parser else None,
                          gen_config.defaults_for(generation_config, backend.tokenizer)), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is not None:
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    tracker = asyncio.create_task(_track_health(backend, health_servicer))
    return GrpcServer(server, health_servicer, tracker), bound
