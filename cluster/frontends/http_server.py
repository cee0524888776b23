"""OpenAI-compatible HTTP frontend (FastAPI): completions, chat, models, tokenize, health, metrics.

Owns HTTP concerns only: request bodies and their validation, OpenAI response and error shapes,
server-sent events, the API key, body size limits, and aborting a request whose client went
away. Everything that runs a request goes through a ``Backend``; this module must not know
whether one engine or a cluster is behind it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import math
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve import __version__
from splitserve.cluster.frontends import reasoning_parsers, responses_api, tool_parsers
from splitserve.cluster.frontends.auth import WWW_AUTHENTICATE, ApiKeyCheck, http_path_is_open
from splitserve.cluster.frontends.backend import AdmissionBackend, Backend, PromptInput
from splitserve.cluster.frontends.metrics import CONTENT_TYPE, RequestRecorder, ServerMetrics
from splitserve.cluster.frontends.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
)
from splitserve.cluster.frontends.prompts import (
    chat_prompt,
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
    RequestAbortedError,
    SplitserveError,
)
from splitserve.offload import off_loop
from splitserve.outputs import Logprob, RequestOutput
from splitserve.roles.models import generation_config as gen_config
from splitserve.sampling_params import StructuredOutputsParams, embedding_request

DEFAULT_MAX_BODY_BYTES = 8 << 20


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(e: BaseException) -> APIError:
    """Map backend exceptions to HTTP errors (500 only for bugs)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), param=e.field)
    if isinstance(e, DuplicateRequestError):
        return APIError(409, str(e), param="x-request-id", code="duplicate_request_id")
    if isinstance(e, OverloadedError):
        return APIError(
            429,
            str(e) or "server overloaded",
            "rate_limit_exceeded",
            code="overloaded",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, NoHealthyWorkerError):
        # a worker of the role is being replaced: worth retrying soon
        return APIError(503, str(e) or "no healthy worker", "service_unavailable",
                        headers={"Retry-After": "1"})
    if isinstance(e, RequestAbortedError):
        return APIError(503, str(e) or "request aborted", "service_unavailable")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


class _Frontend:
    """State of one HTTP server: the backend, the served name, metrics, the API key."""

    def __init__(
        self,
        backend: Backend,
        served_model_name: str | None,
        api_key: str | None,
        metrics: ServerMetrics | None,
    ) -> None:
        self.backend = backend
        self.model_name = served_model_name or backend.model_id
        self.auth = ApiKeyCheck(api_key)
        self.metrics = metrics or ServerMetrics(self.model_name)
        self.created = int(time.time())
        self.tool_parser: tool_parsers.ToolParser | None = None
        self.reasoning_parser: reasoning_parsers.ReasoningParser | None = None
        self.responses = responses_api.ResponseStore()
        """Stored Responses API responses (``store: true``)."""
        self.generation_defaults: dict[str, Any] = {}
        """The model's generation config: defaults of the sampling fields a request leaves
        unset (``build_app``'s ``generation_config``)."""

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, self.backend.model_id):
            raise APIError(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            err = APIError(413, f"request body over {self.max_bytes} bytes", param="body")
            await err.response()(scope, receive, send)
            return
        await self.app(scope, _limited(receive, self.max_bytes), send)


class LoneSurrogateMiddleware:
    """400 naming the field for a JSON body with a lone UTF-16 surrogate in a string:
    ``"\\ud800"`` is valid JSON but no text (Python decodes it into a ``str`` that cannot be
    encoded), and the tokenizer, the grammar compilers and the answer's own UTF-8 encoding
    would each fail on it later (a 500, or a reset stream). Bodies without a ``\\uD8``-
    ``\\uDF`` escape, all but a few, are passed on without being parsed here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        messages: list[Any] = []
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except APIError as e:  # the body limit, raised while reading
            await e.response()(scope, receive, send)
            return
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        field = lone_surrogate_field(body)
        if field is not None:
            await APIError(400, lone_surrogate_message(field), param=field).response()(
                scope, receive, send)
            return
        pending = iter(messages)

        async def replay() -> Any:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate_field(body: bytes) -> str | None:
    """The path (``messages.0.content``; ``body`` for the top level) of the first string or
    key of a JSON body that holds an unpaired surrogate, or None (also for a body that is not
    JSON: the route reports that)."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return ".".join(path) or "body"
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                if not _is_text(k):  # the key itself cannot be named: its container is
                    return ".".join(path) or "body"
                stack.append((v, (*path, k)))
        elif isinstance(value, list):
            stack.extend((v, (*path, str(i))) for i, v in reversed(list(enumerate(value))))
    return None


def lone_surrogate_message(field: str) -> str:
    return (f"{field}: a string holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF "
            "without its pair), which is not text")


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _limited(receive: Receive, max_bytes: int) -> Receive:
    seen = 0

    async def wrapped() -> Any:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > max_bytes:
            raise APIError(413, f"request body over {max_bytes} bytes", param="body")
        return message

    return wrapped


def build_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    metrics: ServerMetrics | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    generation_config: str = "auto",
) -> FastAPI:
    """The FastAPI app serving ``backend``; run it with uvicorn. ``tool_call_parser``: how to
    find tool calls in the model's text for ``tool_choice: auto`` (see ``tool_parsers``);
    ``reasoning_parser``: how chat answers' thinking is told from their content (see
    ``reasoning_parsers``); ``generation_config``: whose sampling defaults apply (``auto``:
    the model's ``generation_config.json``, ``vllm``: none, or a folder's; see
    ``roles/models/generation_config``)."""
    app = FastAPI(
        title="splitserve",
        version=__version__,
        description="OpenAI-compatible API of a splitserve deployment.",
    )
    front = _Frontend(backend, served_model_name, api_key, metrics)
    front.tool_parser = tool_parsers.create_parser(tool_call_parser) if tool_call_parser else None
    front.reasoning_parser = (reasoning_parsers.create_parser(reasoning_parser)
                              if reasoning_parser else None)
    front.generation_defaults = gen_config.defaults_for(generation_config, backend.tokenizer)
    if front.generation_defaults:  # as vLLM warns: other defaults than a client may expect
        logging.getLogger(__name__).warning(
            "sampling defaults for fields a request leaves unset, from the model's "
            "generation config (--generation-config vllm turns them off): %s",
            front.generation_defaults)
    app.state.frontend = front
    _install_error_handlers(app)
    app.add_middleware(LoneSurrogateMiddleware)  # innermost: after the key and the size
    app.add_middleware(AuthMiddleware, front=front)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    _add_info_routes(app, front)
    _add_token_routes(app, front)
    _add_generation_routes(app, front)
    _add_embedding_routes(app, front)
    _install_openapi(app, front)
    return app


# ---------------------------------------------------------------------- errors and auth


def _param_of(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "role")`` -> ``messages.0.role``; union branches such as
    ``"list[int]"`` (pydantic names them after the type) end the path."""
    parts: list[str] = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (not p.isidentifier() or p in _TYPE_NAMES):
            break
        parts.append(str(p))
    return ".".join(parts) or "body"


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        headers = dict(e.headers or {})  # a 405 carries the router's Allow (RFC 9110 15.5.6)
        if e.status_code == 405:  # Starlette names the first route's methods; a path can
            headers["Allow"] = _allowed_methods(request)  # have one route per method
        return APIError(e.status_code, str(e.detail), type_, headers=headers or None).response()

    @app.exception_handler(SplitserveError)
    async def _ours(_: Request, e: SplitserveError) -> JSONResponse:
        return to_api_error(e).response()

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception) -> JSONResponse:
        return to_api_error(e).response()


def _allowed_methods(request: Request) -> str:
    """Every method some route of the request's path takes (GET's routes take HEAD too)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def _validation_error(errors: Sequence[Any]) -> APIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_of(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", param="body")
    message = f"{param}: {first.get('msg')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param=param)


class AuthMiddleware:
    """With a key set, 401 (with ``WWW-Authenticate``) on every path but the open ones
    (auth.OPEN_HTTP_PATHS) unless ``Authorization: Bearer <key>`` matches (pure ASGI)."""

    def __init__(self, app: ASGIApp, front: _Frontend) -> None:
        self.app, self.front = app, front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.front.auth.required
            and not http_path_is_open(scope["path"])
        ):
            header = dict(scope.get("headers", [])).get(b"authorization")
            if not self.front.auth.authorized(header):
                err = APIError(
                    401,
                    "invalid or missing API key (Authorization: Bearer <key>)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": WWW_AUTHENTICATE},
                )
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- info routes


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body; every non-2xx answer of this server has it."""

    error: _ErrorDetail


_ERROR_MEANING = {
    400: "invalid request: `param` names the field",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model",
    409: "the `X-Request-Id` names a request that is still running",
    413: "request body too large",
    429: "too many requests in flight; retry after `Retry-After` seconds",
    503: "no healthy worker for a needed role",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses."""
    return {c: {"model": ErrorResponse, "description": _ERROR_MEANING[c]} for c in codes}


_BODY_ERRORS = (400, 401, 404, 413)
_GENERATION_ERRORS = (*_BODY_ERRORS, 409, 429, 503)
_SSE_EVENT = {  # OpenAPI 3.1: the schema of one event
    "type": "object",
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk, an error body, or [DONE]"},
        "event": {"type": "string"},
    },
    "required": ["data"],
}
_SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
              "description": "the answer; server-sent events when `stream` is true"}}


def _install_openapi(app: FastAPI, front: _Frontend) -> None:
    """Make the document say what the server does: validation errors are 400 (never
    FastAPI's 422), and with a key the protected operations declare Bearer security."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {})
        if front.auth.required:
            components.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer"
            }
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                operation.get("responses", {}).pop("422", None)
                if front.auth.required and not http_path_is_open(path):
                    operation["security"] = [{"bearer": []}]
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_info_routes(app: FastAPI, front: _Frontend) -> None:
    @app.get(
        "/health",
        summary="200 when every needed role has a healthy worker, else 503",
        responses=_errors(503),
    )
    async def health() -> JSONResponse:
        h = await front.backend.health()
        if not h.healthy:
            return APIError(503, h.message or "no healthy worker", "service_unavailable").response()
        return JSONResponse({"status": "ok", "workers": h.workers})

    @app.get("/version")
    async def version() -> dict[str, Any]:
        """The server's version, the numeric formats it serves (dtype, quantization) and the
        sampling defaults of unset request fields (the model's generation config)."""
        return {"version": __version__, **await front.backend.formats(),
                "default_sampling_params": front.generation_defaults}

    @app.get("/v1/models", responses=_errors(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(front)]}

    @app.get("/v1/models/{model:path}", responses=_errors(401, 404))
    async def model(model: str) -> dict[str, Any]:
        front.check_model(model)
        return _model_card(front)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        loads = await front.backend.loads()
        counters = await front.backend.counters()
        if isinstance(front.backend, AdmissionBackend):
            front.metrics.in_flight.set(front.backend.num_in_flight)
            front.metrics.in_flight_limit.set(front.backend.max_in_flight)
        return Response(front.metrics.render(loads, counters), media_type=CONTENT_TYPE)


def _model_card(front: _Frontend) -> dict[str, Any]:
    return {
        "id": front.model_name,
        "object": "model",
        "created": front.created,
        "owned_by": "splitserve",
        "root": front.backend.model_id,
        "max_model_len": front.backend.max_model_len,
    }


def _add_token_routes(app: FastAPI, front: _Frontend) -> None:
    @app.post("/tokenize", responses=_errors(*_BODY_ERRORS))
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        front.check_model(body.model)
        tok = front.backend.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        # off the loop (as every template and tokenizer call here): a large body takes
        # seconds, and the loop serves every other request's stream meanwhile
        if body.messages is not None:
            msgs = [m.model_dump() for m in body.messages]
            ids = await off_loop(
                chat_prompt_ids, tok, msgs, body.add_generation_prompt, front.backend.image_token,
                continue_final_message=body.continue_final_message,
                template_kwargs=body.chat_template_kwargs)
        else:
            ids = await off_loop(tok.encode, body.prompt,
                                add_special_tokens=body.add_special_tokens)
        out = {"tokens": ids, "count": len(ids), "max_model_len": front.backend.max_model_len}
        if body.return_token_strs:  # vLLM's: the vocabulary's strings ("Ġworld" for " world")
            out["token_strs"] = [tok.id_to_token(t) for t in ids]
        return out

    @app.post("/detokenize", responses=_errors(*_BODY_ERRORS))
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        front.check_model(body.model)
        tok = front.backend.tokenizer
        if any(not 0 <= t < tok.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be integers in [0, {tok.vocab_size})", param="tokens")
        return {"prompt": await off_loop(tok.decode, body.tokens)}


# ---------------------------------------------------------------------- generation routes


def _add_embedding_routes(app: FastAPI, front: _Frontend) -> None:
    @app.post("/v1/embeddings", responses=_errors(*_GENERATION_ERRORS))
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        """OpenAI's embeddings: each input's final hidden states pooled by the model's
        pooler (``roles/engine/pooling.py``), one request per input through the backend (a
        prefill-capable worker computes it and answers; nothing is handed off)."""
        front.check_model(body.model)
        inputs = _completion_prompts(body.input, "input")
        params = body.to_sampling_params()
        request_id = _client_request_id(request, body.request_id) or new_request_id("embd")
        if not body.add_special_tokens:  # the backend tokenizes text with them: do it here
            tok = front.backend.tokenizer
            inputs = [await off_loop(tok.encode, p, add_special_tokens=False)
                      if isinstance(p, str) else p for p in inputs]
        return await _cancel_on_disconnect(
            request, _embed(front, inputs, params, request_id, body.encoding_format))

    for path in ("/score", "/v1/score"):
        app.add_api_route(path, _score_route(front), methods=["POST"],
                          responses=_errors(*_GENERATION_ERRORS), name=f"score{path}")
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, _rerank_route(front), methods=["POST"],
                          responses=_errors(*_GENERATION_ERRORS), name=f"rerank{path}")


MAX_SCORED_TEXTS = 256
"""Texts per side of a score or rerank request: each is one embedding request (admitted like any
other, so more than the server's ``--max-in-flight`` at once is a 429)."""


def _score_route(front: _Frontend) -> Callable[..., Awaitable[Response]]:
    async def score(body: ScoreRequest, request: Request) -> Response:
        """vLLM's score API over this model's embeddings: the cosine similarity of each pair
        (the embeddings as ``/v1/embeddings`` computes them)."""
        front.check_model(body.model)
        first = [body.text_1] if isinstance(body.text_1, str) else body.text_1
        second = [body.text_2] if isinstance(body.text_2, str) else body.text_2
        if not first:
            raise APIError(400, "text_1 must not be empty", param="text_1")
        if not second:
            raise APIError(400, "text_2 must not be empty", param="text_2")
        for name, texts in (("text_1", first), ("text_2", second)):
            if len(texts) > MAX_SCORED_TEXTS:
                raise APIError(400, f"at most {MAX_SCORED_TEXTS} texts in {name}", param=name)
        if len(first) != 1 and len(first) != len(second):
            raise APIError(400, f"text_2 must hold one text per text_1 entry ({len(first)}) "
                           f"or text_1 one text; got {len(second)}", param="text_2")
        pairs = [(first[0] if len(first) == 1 else first[i], t) for i, t in enumerate(second)]
        request_id = _client_request_id(request, body.request_id) or new_request_id("score")

        async def answer() -> Response:
            scores, used = await _similarities(front, pairs, body.truncate_prompt_tokens,
                                               request_id, ("text_1", "text_2"))
            return JSONResponse({
                "id": request_id, "object": "list", "created": int(time.time()),
                "model": front.model_name,
                "data": [{"index": i, "object": "score", "score": v}
                         for i, v in enumerate(scores)],
                "usage": {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0},
            }, headers={"x-request-id": request_id})

        return await _cancel_on_disconnect(request, answer())

    return score


def _rerank_route(front: _Frontend) -> Callable[..., Awaitable[Response]]:
    async def rerank(body: RerankRequest, request: Request) -> Response:
        """Jina's / Cohere's rerank (as vLLM serves it) over this model's embeddings: the
        documents by cosine similarity to the query, most relevant first."""
        front.check_model(body.model)
        if not body.documents:
            raise APIError(400, "documents must not be empty", param="documents")
        if len(body.documents) > MAX_SCORED_TEXTS:
            raise APIError(400, f"at most {MAX_SCORED_TEXTS} documents", param="documents")
        request_id = _client_request_id(request, body.request_id) or new_request_id("rerank")

        async def answer() -> Response:
            scores, used = await _similarities(
                front, [(body.query, d) for d in body.documents], body.truncate_prompt_tokens,
                request_id, ("query", "documents"))
            order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
            if body.top_n:
                order = order[: body.top_n]
            results = []
            for i in order:
                item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
                if body.return_documents:
                    item["document"] = {"text": body.documents[i]}
                results.append(item)
            return JSONResponse({"id": request_id, "model": front.model_name,
                                 "results": results, "usage": {"total_tokens": used}},
                                headers={"x-request-id": request_id})

        return await _cancel_on_disconnect(request, answer())

    return rerank


async def _similarities(front: _Frontend, pairs: list[tuple[str, str]],
                        truncate_prompt_tokens: int | None, request_id: str,
                        fields: tuple[str, str]) -> tuple[list[float], int]:
    """Cosine similarity of each pair's embeddings (each distinct text embedded once; the two
    sides at once), and the prompt tokens used. An error names the side at fault."""
    params = embedding_request(truncate_prompt_tokens=truncate_prompt_tokens)
    sides = [list(dict.fromkeys(pair[k] for pair in pairs)) for k in (0, 1)]
    recorder = front.metrics.recorder()

    async def side(k: int) -> tuple[list[list[float]], list[int]]:
        try:
            return await embed_all(front.backend, sides[k], params, f"{request_id}-{k + 1}")
        except EmbeddingLost as e:
            raise APIError(503, str(e), code="unavailable") from e
        except Exception as e:
            err = to_api_error(e)
            if err.param in EMBED_FIELDS:
                err.param = fields[k]
            raise err from e

    try:
        results = await asyncio.gather(side(0), side(1))
    except APIError as e:
        front.metrics.record_failure(str(e.status))
        raise
    units = [{t: _unit(v) for t, v in zip(sides[k], results[k][0], strict=True)} for k in (0, 1)]
    used = sum(sum(tokens) for _, tokens in results)
    recorder.finish(used, ["stop"] * (len(sides[0]) + len(sides[1])))
    return [sum(a * b for a, b in zip(units[0][x], units[1][y], strict=True))
            for x, y in pairs], used


def _unit(vec: list[float]) -> list[float]:
    """``vec`` scaled to unit length in float64 (a zero vector stays zero)."""
    norm = math.sqrt(sum(x * x for x in vec))
    return [x / norm for x in vec] if norm > 0 else list(vec)


async def _embed(front: _Frontend, inputs: Sequence[PromptInput], params: Any, request_id: str,
                 encoding_format: str) -> Response:
    recorder = front.metrics.recorder()
    try:
        vectors, tokens = await embed_all(front.backend, inputs, params, request_id)
    except EmbeddingLost as e:
        front.metrics.record_failure("503")
        raise APIError(503, str(e), code="unavailable") from e
    except Exception as e:
        err = to_api_error(e)
        if err.param in EMBED_FIELDS:
            err.param = "input"
        front.metrics.record_failure(str(err.status))
        raise err from e
    data = []
    for i, vec in enumerate(vectors):
        value: Any = vec
        if encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": value})
    used = sum(tokens)
    recorder.finish(used, ["stop"] * len(inputs))  # the dropped sampled tokens not counted
    return JSONResponse({
        "id": request_id, "object": "list", "created": int(time.time()),
        "model": front.model_name, "data": data,
        "usage": {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0},
    }, headers={"x-request-id": request_id})


def _add_generation_routes(app: FastAPI, front: _Frontend) -> None:
    @app.post("/v1/completions", responses={**_SSE, **_errors(*_GENERATION_ERRORS)})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        front.check_model(body.model)
        prompts = _completion_prompts(body.prompt)
        # the constraint's check (a large schema: seconds) runs off the loop, as tokenizing
        params = await off_loop(body.to_sampling_params, front.generation_defaults)
        job = _Job(front, "cmpl", "text_completion", params, body,
                   _client_request_id(request, body.request_id))
        job.id_param = _id_param(request)
        job.echo_prompts = prompts if body.echo else None
        return await _cancel_on_disconnect(request, job.run(prompts))

    @app.post("/v1/chat/completions", responses={**_SSE, **_errors(*_GENERATION_ERRORS)})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        front.check_model(body.model)
        job = await _chat_job(front, body, lambda params: _Job(
            front, "chatcmpl", "chat.completion", params, body,
            _client_request_id(request, body.request_id)))
        job.id_param = _id_param(request)
        return await _cancel_on_disconnect(request, job.run([job.prompt]))

    @app.post("/v1/responses", responses={**_SSE, **_errors(*_GENERATION_ERRORS)})
    async def responses(body: responses_api.ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API (see ``responses_api``)."""
        front.check_model(body.model)
        try:
            body.refuse_unsupported()
            history: list[dict[str, Any]] = []
            if body.previous_response_id is not None:
                stored = front.responses.get(body.previous_response_id)
                if stored is None:
                    raise APIError(400, f"previous response {body.previous_response_id!r} not "
                                   "found (not stored, or evicted)", param="previous_response_id")
                history = stored[1]
            conversation = history + responses_api.input_messages(body.input)
            turns = conversation
            if body.truncation == "auto":
                turns = await off_loop(_fit_turns, front, body, conversation)
            chat = _responses_chat(body, turns)
            job = await _chat_job(front, chat, lambda params: _ResponsesJob(
                front, params, chat, body, conversation))
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=responses_api.responses_field(e.field)) from e
        except APIError as e:
            e.param = responses_api.responses_field(e.param)
            raise
        return await _cancel_on_disconnect(request, job.run([job.prompt]))

    def _not_stored(response_id: str) -> APIError:
        return APIError(404, f"response {response_id!r} not found", "not_found_error",
                        param="response_id")

    @app.get("/v1/responses/{response_id}", responses=_errors(401, 404))
    async def get_response(response_id: str) -> dict[str, Any]:
        """A stored response."""
        stored = front.responses.get(response_id)
        if stored is None:
            raise _not_stored(response_id)
        return stored[0]  # type: ignore[no-any-return]

    @app.delete("/v1/responses/{response_id}", responses=_errors(401, 404))
    async def delete_response(response_id: str) -> dict[str, Any]:
        """A stored response's removal."""
        if not front.responses.delete(response_id):
            raise _not_stored(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _chat_job(front: _Frontend, body: ChatCompletionRequest,
                    make_job: Callable[[Any], _Job]) -> _Job:
    """A chat request's job, its prompt rendered: 400s of constraints and tools before any
    work, their checks and the template off the loop."""
    msgs = [m.model_dump(exclude_none=True) for m in body.messages]
    params = await off_loop(body.to_sampling_params, front.generation_defaults)
    tool_choice = body.effective_tool_choice()
    if tool_choice == "auto" and front.tool_parser is None:
        raise APIError(400, "tool_choice auto needs a server started with --tool-call-parser "
                       f"({', '.join(sorted(tool_parsers.PARSERS))}); or use required or a "
                       "named function", param="tool_choice")
    ids, images = await off_loop(
        chat_prompt, front.backend.tokenizer, msgs, body.add_generation_prompt,
        front.backend.image_token, tools=body.tool_dicts() or None,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs)
    tail = None
    parser = front.reasoning_parser
    if parser is not None:
        tail = str(await off_loop(front.backend.tokenizer.decode,
                                  ids[-reasoning_parsers.PROMPT_TAIL_TOKENS:],
                                  skip_special_tokens=False))
        so = params.structured_outputs
        if isinstance(so, StructuredOutputsParams):  # the constraint starts after the thinking
            params.structured_outputs = dataclasses.replace(
                so, think_start=parser.start, think_end=parser.end,
                thinking=parser.always_thinks or parser.prompt_opens(tail))
    if tool_choice == "auto" and front.tool_parser is not None \
            and front.tool_parser.keeps_special_tokens:  # the calls' markers are special tokens
        params = dataclasses.replace(params, skip_special_tokens=False)
    job = make_job(params)
    job.prompt = ids
    if images:
        job.prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
    job.tool_choice = tool_choice
    if parser is not None and tail is not None:
        job.reasoning = (parser, tail)
    return job


def _fit_turns(front: _Frontend, body: responses_api.ResponsesRequest,
               conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``truncation: auto``: the conversation less the oldest turns that keep the prompt (under
    the instructions and tools) and ``max_output_tokens`` (at least one token) from fitting
    the context."""
    room = front.backend.max_model_len - (body.max_output_tokens or 1)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    kwargs = (body.model_extra or {}).get("chat_template_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else None  # a bad one: chat's 400 follows

    def fits(messages: list[dict[str, Any]]) -> bool:
        ids, _ = chat_prompt(front.backend.tokenizer, system + messages, True,
                             front.backend.image_token, tools=body.chat_tools(),
                             template_kwargs=kwargs)
        return len(ids) <= room

    return responses_api.fit_turns(conversation, fits)


def _responses_chat(body: responses_api.ResponsesRequest,
                    conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request a Responses request runs as (errors name the Responses fields)."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fields: dict[str, Any] = {
        "model": body.model, "messages": system + conversation, "stream": body.stream,
        "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature,
        "top_p": body.top_p, "tools": body.chat_tools(), "tool_choice": body.chat_tool_choice(),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": body.response_format(),
    }
    if body.logprobs:
        fields.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    extra = body.model_extra or {}
    fields.update({k: extra[k] for k in responses_api.SAMPLING_EXTRAS if k in extra})
    try:
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = _validation_error(e.errors())
        err.param = responses_api.responses_field(err.param)
        err.message = f"{err.param}: {e.errors()[0].get('msg')}" if e.errors() else err.message
        raise err from None


def _id_param(request: Request) -> str:
    return "x-request-id" if "x-request-id" in request.headers else "request_id"


def _client_request_id(request: Request, body_id: str | None = None) -> str | None:
    """The client's ``X-Request-Id``, else its body's ``request_id`` (vLLM's; a label of its
    request: the response's ``id``), if any."""
    value = request.headers.get("x-request-id")
    if value is None:
        return None if body_id is None else check_client_request_id(body_id, "request_id")
    return check_client_request_id(value, "x-request-id")


def _completion_prompts(prompt: Any, field: str = "prompt") -> list[PromptInput]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, f"{field} must not be empty", param=field)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if len(prompt) > 64:
        raise APIError(400, f"at most 64 {field}s per request", param=field)
    return list(prompt)


async def _cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run ``work``; if the client disconnects first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)
    finally:
        watcher.cancel()
        task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Job:
    """One completions / chat request: start its streams, then answer whole or as SSE."""

    def __init__(
        self,
        front: _Frontend,
        prefix: str,
        object_: str,
        params: Any,
        body: CompletionRequest | ChatCompletionRequest,
        client_id: str | None = None,
    ) -> None:
        self.front, self.params, self.body = front, params, body
        self.chat = object_ == "chat.completion"
        self.object = object_
        self.id = client_id or new_request_id(prefix)
        self.id_param = "x-request-id"
        """Where the client's name of the request came from (a 409 names it)."""
        self.created = int(time.time())
        self.acc = Accumulator(params.n)
        self.recorder = front.metrics.recorder()
        self.tool_choice: str | dict[str, Any] | None = None
        """Chat with tools: auto, required or a named function (None: plain content)."""
        self._tool_streams: dict[int, tool_parsers.ToolStream] = {}
        self.reasoning: tuple[reasoning_parsers.ReasoningParser, str] | None = None
        """Chat with a reasoning parser: it and the end of the rendered prompt."""
        self._reasoning_streams: dict[int, reasoning_parsers.ReasoningStream] = {}
        self.prompt: PromptInput = []
        """Chat: the rendered prompt."""
        self.echo_prompts: Sequence[PromptInput] | None = None
        """Completions with ``echo``: the prompts, as given, to prepend to their choices."""
        self._held: dict[int, list[ChoiceDelta]] = {}
        self._echoed: set[int] = set()
        self._prompt_texts: dict[int, str] = {}
        self._echo_heads: dict[int, dict[str, Any]] = {}
        self._ids_sent: set[int] = set()
        """Streamed ``return_token_ids``: the choices (chat: -1, the response) whose prompt
        ids went out."""

    @property
    def _echo_only(self) -> bool:
        return self.echo_prompts is not None and getattr(self.body, "echo_only", False)

    def _prompt_text(self, prompt_index: int) -> str:
        """The echoed prompt: as the client gave it, or its (cut) ids decoded, once."""
        assert self.echo_prompts is not None
        text = self._prompt_texts.get(prompt_index)
        if text is None:
            prompt = self.echo_prompts[prompt_index]
            if isinstance(prompt, str) and self.params.truncate_prompt_tokens is None:
                text = prompt
            else:
                text = str(self.front.backend.tokenizer.decode(
                    self.acc.prompt_ids[prompt_index], skip_special_tokens=False))
            self._prompt_texts[prompt_index] = text
        return text

    def _echo_logprobs(self, prompt_index: int) -> dict[str, Any]:
        """The echoed prompt's part of a choice's ``logprobs`` (the first token's null); built
        once per prompt, whatever its ``n``."""
        head = self._echo_heads.get(prompt_index)
        if head is None:
            head = self._echo_heads[prompt_index] = self._build_echo_logprobs(prompt_index)
        return head

    def _build_echo_logprobs(self, prompt_index: int) -> dict[str, Any]:
        ids = self.acc.prompt_ids[prompt_index]
        steps = self.acc.prompt_logprobs.get(prompt_index) or [None] * len(ids)
        tokenizer = self.front.backend.tokenizer
        first = tokenizer.decode(ids[:1], skip_special_tokens=False) if ids else ""
        as_ids = self.body.return_tokens_as_token_ids
        rest = completion_logprobs([s for s in steps[1:] if s is not None], len(first), as_ids)
        first_name = f"token_id:{ids[0]}" if as_ids and ids else first
        return {
            "tokens": [first_name, *rest["tokens"]][: len(ids)],
            "token_logprobs": [None, *rest["token_logprobs"]][: len(ids)],
            "top_logprobs": [None, *rest["top_logprobs"]][: len(ids)],
            "text_offset": [0, *rest["text_offset"]][: len(ids)],
        }

    def _with_echo(self, prompt_index: int, text: str, logprobs: dict[str, Any] | None
                   ) -> tuple[str, dict[str, Any] | None]:
        """A choice's text and logprobs with its prompt in front (``echo``)."""
        prefix = self._prompt_text(prompt_index)
        if logprobs is None:
            return prefix + text, None
        head = self._echo_logprobs(prompt_index)
        return prefix + text, {k: head[k] + logprobs[k] for k in head}

    def _prompt_logprobs_json(self, prompt_index: int) -> list[Any] | None:
        """vLLM's ``prompt_logprobs``: per prompt token, null for the first, else token id
        -> {logprob, rank, decoded_token}."""
        steps = self.acc.prompt_logprobs.get(prompt_index)
        if self.body.prompt_logprobs is None or steps is None:
            return None
        return [None if step is None else {
            str(t): {"logprob": _json_logprob(lp), "rank": lp.rank,
                     "decoded_token": lp.decoded_token}
            for t, lp in step.items()} for step in steps]

    def _max_tokens_asked(self) -> bool:
        """Whether the client set the answer's length (else it is the model's default or
        none: not refused when it does not fit beside the prompt)."""
        body = self.body
        if isinstance(body, ChatCompletionRequest):
            return (body.max_completion_tokens or body.max_tokens) is not None
        return body.max_tokens is not None

    def _chat_echo(self) -> str:
        body = self.body
        return body.echo_text() if isinstance(body, ChatCompletionRequest) else ""

    def _tool_stream(self, index: int) -> tool_parsers.ToolStream | None:
        if self.tool_choice is None:
            return None
        if index not in self._tool_streams:
            forced = None if self.tool_choice == "auto" else self.tool_choice
            parser = self.front.tool_parser
            if parser is not None:  # a parser may type the calls' arguments by the tools
                parser = parser.bind(self.body.tool_dicts())
            self._tool_streams[index] = tool_parsers.ToolStream(parser, forced)
        return self._tool_streams[index]

    def _reasoning_stream(self, index: int) -> reasoning_parsers.ReasoningStream | None:
        if self.reasoning is None:
            return None
        stream = self._reasoning_streams.get(index)
        if stream is None:
            parser, tail = self.reasoning
            so = self.params.structured_outputs
            # a constraint gated on the thinking (a reasoning parser's) lets the model think
            constrained = isinstance(so, StructuredOutputsParams) and so.think_end is None
            stream = self._reasoning_streams[index] = parser.stream(tail, constrained)
        return stream

    def _reasoning_fields(self, reasoning: str | None) -> dict[str, Any]:
        """A message's or delta's thinking, under both names clients read: vLLM's and
        SGLang's ``reasoning_content`` and newer vLLM's ``reasoning`` (none with
        ``include_reasoning: false``)."""
        if reasoning is None or not getattr(self.body, "include_reasoning", True):
            return {}
        return {"reasoning_content": reasoning, "reasoning": reasoning}

    def _finish_reason(self, reason: str | None, calls: list[Any]) -> str | None:
        """OpenAI reports a stop that produced calls as tool_calls (a named choice: stop)."""
        if calls and reason == "stop" and not isinstance(self.tool_choice, dict):
            return "tool_calls"
        return reason

    def _constraint_error(self, e: BaseException) -> BaseException:
        """An error about the constraint (a compile timeout in the cluster) named by the field
        the client set (``response_format...``, ``tool_choice``), not our internal form."""
        so, field = self.params.structured_outputs, self.body.constraint_field()
        if not isinstance(e, InvalidRequestError) or not isinstance(so, StructuredOutputsParams):
            return e
        if field is None or e.field != so.field:
            return e
        return InvalidRequestError(str(e).replace(so.field, field, 1), field=field)

    async def run(self, prompts: Sequence[PromptInput]) -> Response:
        try:
            streams = await open_streams(self.front.backend, prompts, self.params, self.id,
                                         max_tokens_asked=self._max_tokens_asked())
        except Exception as e:
            err = to_api_error(self._constraint_error(e))
            if err.code == "duplicate_request_id":
                err.param = self.id_param
            self.front.metrics.record_failure(str(err.status))
            raise err from e
        if self.body.stream:
            return _ClosingStreamingResponse(
                self._sse(streams),
                streams,
                media_type="text/event-stream",
                headers={"x-request-id": self.id},
            )
        return await self._whole(streams)

    async def _collect(self, streams: list[AsyncIterator[RequestOutput]]) -> None:
        """Every delta of a whole (not streamed) answer, folded into ``acc``."""
        stream = merge(streams)
        try:
            async for i, delta in stream:
                self.recorder.observe(delta)
                self.acc.add(i, delta)
        finally:
            await stream.aclose()
        self._finish()

    async def _choice_deltas(self, stream: AsyncIterator[tuple[int, RequestOutput]]
                             ) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """A streamed answer's deltas, per prompt index and choice, as ``acc`` folds them."""
        async for i, delta in stream:
            self.recorder.observe(delta)
            for cd in self.acc.add(i, delta):
                yield i, cd

    async def _whole(self, streams: list[AsyncIterator[RequestOutput]]) -> Response:
        await self._collect(streams)
        body = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.front.model_name,
            "choices": [self._full_choice(c) for c in self.acc.ordered()],
            "usage": self.acc.usage(),
            "timing": self.recorder.timing(),
        }
        if self.chat and self.body.prompt_logprobs is not None:  # vLLM: top level in chat
            body["prompt_logprobs"] = self._prompt_logprobs_json(0)
        if self.chat and self.body.return_token_ids:
            body["prompt_token_ids"] = self.acc.prompt_ids.get(0, [])
        return JSONResponse(
            body, headers={"x-request-id": self.id, "server-timing": _server_timing(self.recorder)}
        )

    def _finish(self) -> None:
        if self._echo_only:  # the drawn token is dropped: no completion tokens
            for c in self.acc.ordered():
                c.token_ids.clear()
                c.finish_reason = "length"
        reasons = [c.finish_reason for c in self.acc.ordered()]
        self.recorder.finish(sum(self.acc.prompt_tokens.values()), reasons)

    def _full_choice(self, c: Any) -> dict[str, Any]:
        if self.chat:
            text: str | None = c.text
            reasoning = None
            thinking = self._reasoning_stream(c.index)
            if thinking is not None:
                reasoning, text = thinking.split(c.text)
            message: dict[str, Any] = {"role": "assistant", "content": text,
                                       **self._reasoning_fields(reasoning)}
            echo = self._chat_echo()
            calls: list[tool_parsers.ToolCall] = []
            stream = self._tool_stream(c.index)
            if stream is not None:
                stream.text = text or ""
                content, calls = stream.result()
                message.update(content=content, tool_calls=[call.to_openai() for call in calls])
            if echo:  # vLLM's chat echo: the last message's text in front
                message["content"] = echo + (message["content"] or "")
            choice = {
                "index": c.index,
                "message": message,
                "logprobs": self._chat_logprobs(c.logprobs),
                "finish_reason": self._finish_reason(c.finish_reason, calls),
                "stop_reason": c.stop_reason,
            }
            if self.body.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
            return choice
        pi = c.index // self.params.n
        if self.echo_prompts is None:
            text, logprobs = c.text, self._cmpl_logprobs(c.logprobs, 0)
        else:
            drawn = [] if self._echo_only else c.logprobs
            logprobs = self._cmpl_logprobs(drawn, len(self._prompt_text(pi)))
            text, logprobs = self._with_echo(pi, "" if self._echo_only else c.text, logprobs)
        choice = {
            "index": c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": "length" if self._echo_only else c.finish_reason,
            "stop_reason": None if self._echo_only else c.stop_reason,
        }
        if self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs_json(pi)
        if self.body.return_token_ids:
            choice["prompt_token_ids"] = self.acc.prompt_ids.get(pi, [])
            choice["token_ids"] = list(c.token_ids)
        return choice

    async def _sse(self, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        stream = merge(streams)
        offsets: dict[int, int] = {}
        try:
            async for i, cd in self._choice_deltas(stream):
                for ready in self._echo_stream(i, cd):
                    chunk = self._chunk([self._delta_choice(ready, offsets)])
                    if self.chat and self.body.return_token_ids and -1 not in self._ids_sent:
                        self._ids_sent.add(-1)  # vLLM: the prompt's ids in the first chunk
                        chunk["prompt_token_ids"] = self.acc.prompt_ids.get(0, [])
                    yield _event(chunk)
            for index in sorted(self._held):  # never got their prompt logprobs (an error)
                for ready in self._release(index):
                    yield _event(self._chunk([self._delta_choice(ready, offsets)]))
            self._finish()
            if self.body.include_usage:
                timing = self.recorder.timing()
                yield _event({**self._chunk([], usage=self.acc.usage()), "timing": timing})
        except Exception as e:  # after headers went out, the error travels in the stream
            yield _event(to_api_error(e).body())
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    def _echo_stream(self, prompt_index: int, cd: ChoiceDelta) -> list[ChoiceDelta]:
        """Streamed ``echo``: a choice's first chunk starts with its prompt (and the prompt's
        logprobs, which one sample of the prompt brings: its siblings' deltas wait for them)."""
        if self.echo_prompts is None or cd.index in self._echoed:
            return [self._echo_only_delta(cd)] if self.echo_prompts is not None else [cd]
        self._held.setdefault(cd.index, []).append(cd)
        if self.params.logprobs is not None and prompt_index not in self.acc.prompt_logprobs:
            return []
        n = self.params.n
        return [d for index in sorted(self._held) if index // n == prompt_index
                for d in self._release(index)]

    def _release(self, index: int) -> list[ChoiceDelta]:
        """A held choice's deltas, its prompt put in front of the first."""
        held = self._held.pop(index)
        self._echoed.add(index)
        held = [self._echo_only_delta(d) for d in held]
        held[0].echo_of = index // self.params.n
        return held

    def _echo_only_delta(self, cd: ChoiceDelta) -> ChoiceDelta:
        if not self._echo_only:
            return cd
        reason = "length" if cd.finish_reason is not None else None
        return dataclasses.replace(cd, text="", token_ids=[], logprobs=[] if cd.logprobs is not None
                                   else None, finish_reason=reason, stop_reason=None)

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.front.model_name,
            "choices": choices,
        }
        if self.body.include_usage:
            chunk["usage"] = usage if usage is not None or not self.body.continuous_usage \
                else self.acc.usage()
        return chunk

    def _delta_choice(self, cd: ChoiceDelta, offsets: dict[int, int]) -> dict[str, Any]:
        if self.chat:
            text, reasoning = cd.text, None
            thinking = self._reasoning_stream(cd.index)
            if thinking is not None:
                reasoning, text = thinking.feed(cd.text)
                if cd.finish_reason is not None:
                    more_reasoning, more_text = thinking.finish()
                    reasoning, text = reasoning + more_reasoning, text + more_text
            delta: dict[str, Any] = {"content": text}
            finish_reason = cd.finish_reason
            stream = self._tool_stream(cd.index)
            if stream is not None:
                delta, finish_reason = self._tool_delta(stream, text, cd.finish_reason)
            if thinking is not None:
                if reasoning:
                    delta.update(self._reasoning_fields(reasoning))
                if not delta.get("content"):
                    delta["content"] = None
            if cd.first:
                delta["role"] = "assistant"
                echo = self._chat_echo()
                if echo:  # vLLM's chat echo: the last message's text leads the first chunk
                    delta["content"] = echo + (delta.get("content") or "")
            chat_choice = {
                "index": cd.index,
                "delta": delta,
                "logprobs": self._chat_logprobs(cd.logprobs),
                "finish_reason": finish_reason,
                "stop_reason": cd.stop_reason,  # vLLM's: on the last chunk, as whole answers
            }
            if self.body.return_token_ids:
                chat_choice["token_ids"] = list(cd.token_ids)
            return chat_choice
        start = offsets.get(cd.index, 0)
        if cd.echo_of is None:
            text, logprobs = cd.text, self._cmpl_logprobs(cd.logprobs, start)
        else:  # the choice's first chunk: its prompt in front
            generated = self._cmpl_logprobs(cd.logprobs, start + len(self._prompt_text(cd.echo_of)))
            text, logprobs = self._with_echo(cd.echo_of, cd.text, generated)
        offsets[cd.index] = start + len(text)
        choice = {
            "index": cd.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": cd.finish_reason,
            "stop_reason": cd.stop_reason,
        }
        if self.body.prompt_logprobs is not None and cd.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs_json(cd.index // self.params.n)
        if self.body.return_token_ids:
            if cd.index not in self._ids_sent:  # vLLM: in each choice's first chunk
                self._ids_sent.add(cd.index)
                choice["prompt_token_ids"] = self.acc.prompt_ids.get(cd.index // self.params.n, [])
            choice["token_ids"] = list(cd.token_ids)
        return choice

    def _tool_delta(
        self, stream: tool_parsers.ToolStream, text: str, finish_reason: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """Content that is surely not a call now; the calls, whole, with the last delta."""
        delta: dict[str, Any] = {"content": stream.feed(text)}
        if finish_reason is None:
            return delta, None
        rest, calls = stream.finish()
        delta["content"] = (delta["content"] + rest) or None
        if calls:
            delta["tool_calls"] = [call.to_delta(i) for i, call in enumerate(calls)]
        return delta, self._finish_reason(finish_reason, calls)

    def _cmpl_logprobs(
        self, lps: list[dict[int, Logprob]] | None, start: int
    ) -> dict[str, Any] | None:
        if self.params.logprobs is None:
            return None
        return completion_logprobs(lps or [], start, self.body.return_tokens_as_token_ids)

    def _chat_logprobs(self, lps: list[dict[int, Logprob]] | None) -> dict[str, Any] | None:
        if self.params.logprobs is None:
            return None
        return {"content": chat_logprobs(lps or [], self.params.logprobs,
                                         self.body.return_tokens_as_token_ids)}


class _ResponsesJob(_Job):
    """A Responses API request: a chat job whose answer is output items and typed events."""

    def __init__(self, front: _Frontend, params: Any, chat: ChatCompletionRequest,
                 body: responses_api.ResponsesRequest, conversation: list[dict[str, Any]]
                 ) -> None:
        super().__init__(front, "chatcmpl", "chat.completion", params, chat)
        self.id = new_request_id("resp")
        self.request = body
        self.conversation = conversation
        """The turns before the answer (without ``instructions``): what a later
        ``previous_response_id`` continues."""

    async def run(self, prompts: Sequence[PromptInput]) -> Response:
        try:
            return await super().run(prompts)
        except APIError as e:  # the engine's and the cluster's checks name chat's fields
            e.param = responses_api.responses_field(e.param)
            raise

    def _status(self) -> str:
        (choice,) = self.acc.ordered() or [None]
        return "incomplete" if choice is not None and choice.finish_reason == "length" \
            else "completed"

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        reasoning = "".join(c["text"] for item in output if item["type"] == "reasoning"
                            for c in item["content"])
        tokens = len(self.front.backend.tokenizer.encode(reasoning, add_special_tokens=False)) \
            if reasoning else 0
        usage = responses_api.usage(self.acc.usage(), tokens) if status != "in_progress" else None
        response = responses_api.response_object(
            self.id, self.created, self.front.model_name, self.request, status, output, usage)
        if status != "in_progress" and self.request.store:
            turns = self.conversation + responses_api.items_as_messages(output)
            self.front.responses.put(response, turns)
        return response

    async def _whole(self, streams: list[AsyncIterator[RequestOutput]]) -> Response:
        await self._collect(streams)
        (choice,) = self.acc.ordered()
        status = self._status()
        full = self._full_choice(choice)
        logprobs = (full["logprobs"] or {}).get("content") if self.request.logprobs else None
        output = responses_api.output_items(full["message"], status, logprobs)
        return JSONResponse(self._response(status, output), headers={
            "x-request-id": self.id, "server-timing": _server_timing(self.recorder)})

    async def _sse(self, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        events = responses_api.Events()
        started = self._response("in_progress", [])
        yield events.event("response.created", response=started)
        yield events.event("response.in_progress", response=started)
        stream = merge(streams)
        offsets: dict[int, int] = {}
        try:
            async for _, cd in self._choice_deltas(stream):
                choice = self._delta_choice(cd, offsets)
                if self.request.logprobs:
                    events.logprobs((choice["logprobs"] or {}).get("content") or [])
                for event in self._events(events, choice["delta"]):
                    yield event
            self._finish()
            status = self._status()
            if not any(item["type"] in ("message", "function_call") for item in events.items):
                for event in events.content(""):  # an empty answer is an empty message
                    yield event
            for event in events.close(status):
                yield event
            kind = "response.completed" if status == "completed" else "response.incomplete"
            yield events.event(kind, response=self._response(status, events.items))
        except Exception as e:  # after headers went out, the error travels in the stream
            err = to_api_error(e)
            yield events.event("error", code=err.code, message=err.message, param=err.param)
        finally:
            await stream.aclose()

    @staticmethod
    def _events(events: responses_api.Events, delta: dict[str, Any]) -> list[str]:
        out: list[str] = []
        if delta.get("reasoning_content"):
            out += events.reasoning(delta["reasoning_content"])
        if delta.get("content"):
            out += events.content(delta["content"])
        for call in delta.get("tool_calls") or []:
            out += events.function_call(call["id"], call["function"]["name"],
                                        call["function"]["arguments"])
        return out


class _ClosingStreamingResponse(StreamingResponse):
    """SSE whose requests end with the response, however it ends.

    Starlette stops iterating the body when the client goes away and neither closes it nor
    starts it if the client left before the first byte: the requests (their KV blocks and
    their admission slot) would stay open until garbage collection found the cycle.
    """

    def __init__(
        self, body: AsyncIterator[str], streams: list[AsyncIterator[RequestOutput]],
        **kwargs: Any,
    ) -> None:
        super().__init__(body, **kwargs)
        self._body, self._streams = body, streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self._body.aclose()  # type: ignore[attr-defined]
        await close_all(self._streams)


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _server_timing(recorder: RequestRecorder) -> str:
    return ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in recorder.timing().items())


def _sampled(step: dict[int, Logprob]) -> tuple[int, Logprob]:
    """The sampled token of one step: the engine puts it first."""
    return next(iter(step.items()))


def _token_text(token_id: int, lp: Logprob, as_id: bool = False) -> str:
    """A token as logprobs name it: its text, or vLLM's ``token_id:<id>`` with
    ``return_tokens_as_token_ids`` (exact where texts of several tokens look alike)."""
    if as_id:
        return f"token_id:{token_id}"
    return lp.decoded_token if lp.decoded_token is not None else f"<{token_id}>"


def completion_logprobs(steps: list[dict[int, Logprob]], start: int,
                        as_ids: bool = False) -> dict[str, Any]:
    """OpenAI completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset
    (offsets into the text, also when the tokens are named by id)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start
    for step in steps:
        tid, lp = _sampled(step)
        tokens.append(_token_text(tid, lp, as_ids))
        token_lps.append(_json_logprob(lp))
        tops.append({_token_text(t, p, as_ids): _json_logprob(p) for t, p in _by_rank(step)})
        offsets.append(offset)
        offset += len(_token_text(tid, lp))
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(steps: list[dict[int, Logprob]], top_n: int,
                  as_ids: bool = False) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content``: one entry per token with its top alternatives."""
    content = []
    for step in steps:
        tid, lp = _sampled(step)
        top = [_chat_entry(t, p, as_ids) for t, p in _by_rank(step)[:top_n]]
        content.append({**_chat_entry(tid, lp, as_ids), "top_logprobs": top})
    return content


def _chat_entry(token_id: int, lp: Logprob, as_id: bool = False) -> dict[str, Any]:
    text = _token_text(token_id, lp, as_id)
    return {"token": text, "logprob": _json_logprob(lp), "bytes": list(text.encode("utf-8"))}


LOGPROB_FLOOR = -9999.0
"""JSON has no -inf: a token the constraint or the sampling settings ruled out is reported with
this log-probability (as vLLM does), the rest as they are."""


def _json_logprob(lp: Logprob) -> float:
    value = lp.logprob
    return LOGPROB_FLOOR if not value > LOGPROB_FLOOR else value  # -inf and NaN too


def _by_rank(step: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(step.items(), key=lambda kv: kv[1].rank)
