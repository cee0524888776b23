"""Python client of the gRPC API: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Owns the convenience layer over the generated stubs: keyword sampling parameters in vLLM's
names, the ``authorization`` metadata, per-call timeouts, whole-result and streaming
generation, and turning gRPC status codes into ``ClientError`` subclasses. Must not import
server code.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.errors import SplitserveError
from splitserve.proto.splitserve.v1 import inference_pb2 as pb
from splitserve.proto.splitserve.v1 import inference_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
_SCALAR_SAMPLING = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name) - {
    "stop",
    "stop_token_ids",
}


def _embed_request(inputs: str | Sequence[int] | Sequence[str | Sequence[int]],
                   dimensions: int | None, normalize: bool | None,
                   truncate_prompt_tokens: int | None) -> Any:
    """An ``EmbedRequest``: a text, token ids, or a list of either (one embedding each)."""
    one = isinstance(inputs, str) or bool(inputs) and all(isinstance(t, int) for t in inputs)
    batch: list[Any] = [inputs] if one else list(inputs)
    items = [pb.EmbedInput(text=x) if isinstance(x, str)
             else pb.EmbedInput(token_ids=pb.TokenIds(ids=list(x))) for x in batch]
    return pb.EmbedRequest(inputs=items, dimensions=dimensions, normalize=normalize,
                           truncate_prompt_tokens=truncate_prompt_tokens)


class ClientError(SplitserveError):
    """A failed RPC; ``code`` is the gRPC status code, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class InvalidArgumentError(ClientError):
    """The server refused the request (INVALID_ARGUMENT / NOT_FOUND); the message names the field."""


class UnauthenticatedError(ClientError):
    """Wrong or missing API key."""


class UnavailableError(ClientError):
    """No healthy worker, overloaded (RESOURCE_EXHAUSTED) or server unreachable; retry later."""


class DeadlineExceededError(ClientError):
    """The call's timeout passed; the server aborted the request."""


_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _error(e: grpc.RpcError) -> ClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return _ERRORS.get(code, ClientError)(code, details or "")


@dataclass
class Completion:
    """One finished completion."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    logprobs: list[Any] = field(default_factory=list)
    """``TokenLogprob`` messages, one per token, when logprobs were asked for."""
    reasoning: str = ""
    """With a server's ``--reasoning-parser`` and chat input: the thinking (``text`` is
    then the answer's content)."""


@dataclass
class GenerateResult:
    """A whole Generate call: its completions (by index), usage and timing."""

    request_id: str
    completions: list[Completion]
    usage: Any
    timing: Any
    prompt_logprobs: list[Any] = field(default_factory=list)
    """With ``prompt_logprobs=k``: ``TokenLogprob`` messages, one per prompt token after the
    first (each with its top ``k``); empty otherwise."""

    @property
    def text(self) -> str:
        return self.completions[0].text


def build_request(
    text: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    model: str = "",
    request_id: str = "",
    images: Sequence[bytes] = (),
    structured_outputs: dict[str, Any] | None = None,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one input and vLLM-named sampling keywords; ``images``
    (PNG/JPEG bytes) fill the input's ``<image>`` placeholders in order (multimodal models);
    ``structured_outputs``: one of ``{"json": schema | text, "json_object": True, "regex": str,
    "choice": [str], "grammar": str, "structural_tag": tag | text}`` (plus
    ``disable_any_whitespace``). With ``messages``:
    ``add_generation_prompt`` (default true), ``continue_final_message`` and
    ``chat_template_kwargs`` as vLLM's chat options."""
    inputs = [x is not None for x in (text, token_ids, messages)]
    if sum(inputs) != 1:
        raise ValueError("give exactly one of text, token_ids or messages")
    unknown = set(sampling) - _SCALAR_SAMPLING - {"stop", "stop_token_ids"}
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {sorted(unknown)}")
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if k in _SCALAR_SAMPLING})
    stop = sampling.get("stop")
    params.stop.extend([stop] if isinstance(stop, str) else list(stop or []))
    params.stop_token_ids.extend(sampling.get("stop_token_ids") or [])
    req = pb.GenerateRequest(model=model, request_id=request_id, sampling_params=params)
    req.images.extend(images)
    if structured_outputs is not None:
        req.structured_outputs.CopyFrom(_structured(structured_outputs))
    if text is not None:
        req.text = text
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.messages.messages.extend(pb.ChatMessage(**m) for m in messages or [])
        if add_generation_prompt is not None:
            req.messages.add_generation_prompt = add_generation_prompt
        if continue_final_message:
            req.messages.continue_final_message = True
        if chat_template_kwargs is not None:
            req.messages.chat_template_kwargs.update(chat_template_kwargs)
    return req


def _structured(so: dict[str, Any]) -> pb.StructuredOutputs:
    msg = pb.StructuredOutputs()
    for key, value in so.items():
        if key in ("json", "structural_tag"):  # JSON text, or an object to serialize
            setattr(msg, key, value if isinstance(value, str) else json.dumps(value))
        elif key == "choice":
            msg.choice.values.extend(value)
        else:
            setattr(msg, key, value)
    return msg


class _Collector:
    """Folds streamed responses into a GenerateResult."""

    def __init__(self) -> None:
        self.request_id = ""
        self.completions: dict[int, Completion] = {}
        self.complete: Any = None
        self.prompt_logprobs: list[Any] = []

    def add(self, response: pb.GenerateResponse) -> None:
        self.request_id = response.request_id
        if response.WhichOneof("response") == "complete":
            self.complete = response.complete
            return
        chunk = response.chunk
        c = self.completions.setdefault(chunk.index, Completion(chunk.index))
        c.text += chunk.text
        c.reasoning += chunk.reasoning_text
        c.token_ids.extend(chunk.token_ids)
        c.logprobs.extend(chunk.logprobs)
        if chunk.prompt_logprobs and not self.prompt_logprobs:  # sent once per request
            self.prompt_logprobs = list(chunk.prompt_logprobs)
        c.finish_reason = chunk.finish_reason or c.finish_reason

    def result(self) -> GenerateResult:
        done = self.complete
        completions = [self.completions[i] for i in sorted(self.completions)]
        return GenerateResult(
            self.request_id, completions, done and done.usage, done and done.timing,
            self.prompt_logprobs,
        )


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


Pem = bytes | str | os.PathLike[str]
"""PEM bytes, or the path of a PEM file."""


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class Tls:
    """How a client reaches a server that serves TLS (``serve --ssl-certfile``)."""

    root_certificates: Pem | None = None
    """CA that signed the server's certificate (None: the system's trust store)."""
    client_certificate: Pem | None = None
    """Certificate chain for mutual TLS (``serve --ssl-client-ca``), with its key below."""
    client_key: Pem | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("give both client_certificate and client_key, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.client_key),
            certificate_chain=_pem(self.client_certificate),
        )


def _tls(tls: Tls | bool | None, root_certificates: Pem | None) -> Tls | None:
    if isinstance(tls, Tls):
        return tls
    if tls or root_certificates is not None:
        return Tls(root_certificates=root_certificates)
    return None


def _open_channel(channels: Any, target: str, secure: Tls | None) -> Any:
    """A channel from ``grpc`` or ``grpc.aio`` (same factory names): TLS when ``secure`` is set."""
    if secure is None:
        return channels.insecure_channel(target)
    return channels.secure_channel(target, secure.credentials())


class Client:
    """Blocking client. ``timeout`` (seconds) is the default deadline of every call."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        tls: Tls | bool | None = None,
        root_certificates: Pem | None = None,
    ) -> None:
        """``tls``/``root_certificates``: connect with TLS (a ``Tls`` for mutual TLS; True or a
        root certificate for server authentication only)."""
        self.channel = _open_channel(grpc, target, _tls(tls, root_certificates))
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata, self.timeout = _metadata(api_key), timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def stream(
        self, text: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Yield GenerateResponse messages (chunks, then one complete)."""
        call = self._call(self.stub.Generate, build_request(text, **kwargs), timeout)
        try:
            yield from call
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    def generate(
        self, text: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> GenerateResult:
        """Run a request to the end; see ``build_request`` for the keywords."""
        collector = _Collector()
        for response in self.stream(text, timeout=timeout, **kwargs):
            collector.add(response)
        return collector.result()

    def abort(self, *request_ids: str) -> None:
        self._call(self.stub.Abort, pb.AbortRequest(request_ids=request_ids), None)

    def tokenize(
        self, text: str | None = None, *, messages: Sequence[dict[str, str]] | None = None
    ) -> list[int]:
        req = (
            pb.TokenizeRequest(text=text)
            if messages is None
            else pb.TokenizeRequest(
                messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
            )
        )
        return list(self._call(self.stub.Tokenize, req, None).token_ids)

    def embed(self, inputs: str | Sequence[int] | Sequence[str | Sequence[int]], *,
              dimensions: int | None = None, normalize: bool | None = None,
              truncate_prompt_tokens: int | None = None) -> list[list[float]]:
        """One embedding per input (a text or token ids, or a list of them), in order."""
        req = _embed_request(inputs, dimensions, normalize, truncate_prompt_tokens)
        return [list(e.values) for e in self._call(self.stub.Embed, req, None).embeddings]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids)
        return str(self._call(self.stub.Detokenize, req, None).text)

    def models(self) -> list[Any]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), None).models)

    def server_info(self) -> Any:
        return self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest(), None)

    def loads(self) -> list[Any]:
        return list(self._call(self.stub.GetLoads, pb.GetLoadsRequest(), None).loads)

    def health(self, service: str = "") -> bool:
        """True when grpc.health.v1 reports SERVING for ``service`` ("" = the whole server)."""
        req = health_pb2.HealthCheckRequest(service=service)
        res = self._call(self.health_stub.Check, req, None)
        return bool(res.status == health_pb2.HealthCheckResponse.SERVING)


class AsyncClient:
    """asyncio client with the same methods as ``Client`` (awaitable / async iterators)."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        tls: Tls | bool | None = None,
        root_certificates: Pem | None = None,
    ) -> None:
        """``tls``/``root_certificates``: connect with TLS (a ``Tls`` for mutual TLS; True or a
        root certificate for server authentication only)."""
        self.channel = _open_channel(grpc.aio, target, _tls(tls, root_certificates))
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata, self.timeout = _metadata(api_key), timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def stream(
        self, text: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Yield GenerateResponse messages; leaving the loop early cancels the request."""
        call = self.stub.Generate(
            build_request(text, **kwargs), timeout=timeout or self.timeout, metadata=self.metadata
        )
        try:
            async for response in call:
                yield response
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def generate(
        self, text: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> GenerateResult:
        collector = _Collector()
        async for response in self.stream(text, timeout=timeout, **kwargs):
            collector.add(response)
        return collector.result()

    async def abort(self, *request_ids: str) -> None:
        await self._call(self.stub.Abort, pb.AbortRequest(request_ids=request_ids), None)

    async def tokenize(self, text: str) -> list[int]:
        res = await self._call(self.stub.Tokenize, pb.TokenizeRequest(text=text), None)
        return list(res.token_ids)

    async def embed(self, inputs: str | Sequence[int] | Sequence[str | Sequence[int]], *,
                    dimensions: int | None = None, normalize: bool | None = None,
                    truncate_prompt_tokens: int | None = None) -> list[list[float]]:
        """One embedding per input (a text or token ids, or a list of them), in order."""
        req = _embed_request(inputs, dimensions, normalize, truncate_prompt_tokens)
        return [list(e.values) for e in (await self._call(self.stub.Embed, req, None)).embeddings]

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        res = await self._call(
            self.stub.Detokenize, pb.DetokenizeRequest(token_ids=token_ids), None
        )
        return str(res.text)

    async def models(self) -> list[Any]:
        res = await self._call(self.stub.ListModels, pb.ListModelsRequest(), None)
        return list(res.models)

    async def server_info(self) -> Any:
        return await self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest(), None)

    async def loads(self) -> list[Any]:
        return list((await self._call(self.stub.GetLoads, pb.GetLoadsRequest(), None)).loads)

    async def health(self, service: str = "") -> bool:
        req = health_pb2.HealthCheckRequest(service=service)
        res = await self._call(self.health_stub.Check, req, None)
        return bool(res.status == health_pb2.HealthCheckResponse.SERVING)
