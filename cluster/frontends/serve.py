"""Run the frontends: HTTP (uvicorn) and gRPC (grpc.aio) over one Backend, with a graceful stop.

Owns the servers' lifecycle: bind, report the bound addresses, and on stop refuse new work,
let in-flight requests finish for a bounded grace period, abort the rest and close the
backend. ``splitserve serve`` calls ``run_forever`` (signals stop it); tests and benchmarks use
``BackgroundServer`` (the same servers on a thread of their own). Must not build backends
beyond the single-engine default; the cluster launcher will pass its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvicorn

from splitserve.cluster.frontends.backend import AdmissionBackend, Backend
from splitserve.cluster.frontends.metrics import ServerMetrics
from splitserve.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """Where and how to serve."""

    host: str = "127.0.0.1"
    """Interface both servers bind."""
    port: int = 8000
    """HTTP port (0 picks a free one)."""
    grpc_port: int | None = 50051
    """gRPC port (0 picks a free one; None: no gRPC server)."""
    api_key: str | None = field(default=None, repr=False)
    """Required as ``Authorization: Bearer <key>`` (HTTP) / ``authorization`` metadata (gRPC).
    Never printed (kept out of the repr)."""
    tls: TlsOptions | None = None
    """Serve HTTPS and gRPC over TLS (None: plain text)."""
    served_model_name: str | None = None
    """Model name clients use (default: the backend's model id)."""
    max_in_flight: int | None = 512
    """Requests admitted at once across both APIs (None: unbounded); beyond it 429 /
    RESOURCE_EXHAUSTED."""
    tool_call_parser: str | None = None
    """Parser of the model's tool-call text for ``tool_choice: auto`` (``tool_parsers.PARSERS``);
    None refuses auto tool choice."""
    reasoning_parser: str | None = None
    """Splits chat answers' thinking into ``reasoning_content`` (qwen3, deepseek_r1); None
    leaves it in the content."""
    generation_config: str = "auto"
    """Whose sampling defaults fill the fields a request leaves unset: ``auto`` (the model
    folder's ``generation_config.json``), ``vllm`` (none) or a folder holding one."""
    chat_template: str | None = None
    """Jinja chat template used instead of the model's (vLLM's ``--chat-template``: the text,
    read by ``tokenizer.load_chat_template`` from a file or given inline); None: the model's."""
    grace_s: float = 10.0
    """How long in-flight requests may run on after a stop was asked for."""
    log_level: str = "warning"
    """uvicorn's log level."""


@dataclass(frozen=True)
class TlsOptions:
    """TLS of both frontends: a certificate chain and key, and optionally a client CA."""

    certfile: str
    """PEM certificate chain the servers present."""
    keyfile: str
    """PEM private key of that certificate."""
    client_ca: str | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""

    def __post_init__(self) -> None:
        for name in ("certfile", "keyfile", "client_ca"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file {path!r}")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile}
        if self.client_ca is not None:
            kwargs.update(ssl_ca_certs=self.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return kwargs

    def grpc_credentials(self) -> grpc.ServerCredentials:
        with open(self.keyfile, "rb") as k, open(self.certfile, "rb") as c:
            pair = (k.read(), c.read())
        ca = None
        if self.client_ca is not None:
            with open(self.client_ca, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling (we stop it ourselves)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningServers:
    """Bound addresses of the running frontends."""

    http_url: str
    grpc_target: str | None
    http: _Uvicorn
    http_task: asyncio.Task[None]
    grpc: Any = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def start_servers(backend: Backend, opts: ServeOptions) -> RunningServers:
    """Bind and start both frontends; returns once they accept connections."""
    from splitserve.cluster.frontends.http_server import build_app

    if opts.chat_template is not None:  # every chat the frontends render takes it
        backend.tokenizer.set_chat_template(opts.chat_template, name="--chat-template")
    if opts.max_in_flight is not None:
        backend = AdmissionBackend(backend, opts.max_in_flight)
    metrics = ServerMetrics(opts.served_model_name or backend.model_id)
    app = build_app(
        backend, api_key=opts.api_key, served_model_name=opts.served_model_name, metrics=metrics,
        tool_call_parser=opts.tool_call_parser, reasoning_parser=opts.reasoning_parser,
        generation_config=opts.generation_config,
    )
    port = opts.port or _free_port(opts.host)
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=port,
        log_level=opts.log_level,
        timeout_graceful_shutdown=max(int(opts.grace_s), 1),
        lifespan="off",
        **(opts.tls.uvicorn_kwargs() if opts.tls else {}),
    )
    http = _Uvicorn(config)
    task = asyncio.create_task(http.serve())
    while not http.started:
        if task.done():
            task.result()  # re-raises a bind failure
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.02)
    scheme = "https" if opts.tls else "http"
    servers = RunningServers(f"{scheme}://{_host_for_url(opts.host)}:{port}", None, http, task)
    if opts.grpc_port is not None:
        from splitserve.cluster.frontends.grpc_server import start_grpc_server

        grpc_server, grpc_port = await start_grpc_server(
            backend,
            opts.host,
            opts.grpc_port,
            api_key=opts.api_key,
            served_model_name=opts.served_model_name,
            metrics=metrics,
            credentials=opts.tls.grpc_credentials() if opts.tls else None,
            reasoning_parser=opts.reasoning_parser,
            generation_config=opts.generation_config,
        )
        servers.grpc = grpc_server
        servers.grpc_target = f"{_host_for_url(opts.host)}:{grpc_port}"
    return servers


def _host_for_url(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def stop_servers(servers: RunningServers, backend: Backend, grace_s: float) -> None:
    """Stop accepting work, let in-flight requests finish within ``grace_s``, close all."""
    servers.http.should_exit = True
    waits: list[asyncio.Future[Any]] = [servers.http_task]
    if servers.grpc is not None:
        waits.append(asyncio.ensure_future(servers.grpc.stop(grace_s)))
    try:
        await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), grace_s + 5)
    except TimeoutError:
        servers.http.force_exit = True
        logger.warning("frontends did not stop within the grace period; forcing")
    await backend.close()
    servers.stopped.set()


async def run_forever(backend: Backend, opts: ServeOptions, announce: Any = print) -> None:
    """Serve until SIGINT / SIGTERM, then drain (bounded by ``opts.grace_s``) and return.
    The signals are taken before the servers start, so one that comes as soon as the
    addresses are announced (or while starting) still stops the server cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    servers = await start_servers(backend, opts)
    announce(f"splitserve: model {opts.served_model_name or backend.model_id}")
    announce(f"splitserve: OpenAI HTTP API on {servers.http_url}/v1")
    if servers.grpc_target:
        over = " (TLS)" if opts.tls else ""
        announce(f"splitserve: gRPC InferenceService on {servers.grpc_target}{over}")
    if opts.api_key:
        announce("splitserve: API key required (Authorization: Bearer ...)")
    await stop.wait()
    announce(f"splitserve: stopping (up to {opts.grace_s:g}s for in-flight requests)")
    await stop_servers(servers, backend, opts.grace_s)
    announce("splitserve: stopped")


class BackgroundServer:
    """Both frontends over ``backend`` on a thread with its own event loop (tests, benches)."""

    def __init__(self, backend: Backend, opts: ServeOptions | None = None) -> None:
        self.backend = backend
        self.opts = opts or ServeOptions(port=0, grpc_port=0)
        self.loop = asyncio.new_event_loop()
        self.servers: RunningServers | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="splitserve-serve", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def http_url(self) -> str:
        assert self.servers is not None
        return self.servers.http_url

    @property
    def grpc_target(self) -> str:
        assert self.servers is not None and self.servers.grpc_target is not None
        return self.servers.grpc_target

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.servers = self.loop.run_until_complete(start_servers(self.backend, self.opts))
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_until_complete(self.servers.stopped.wait())

    def stop(self) -> None:
        if self.servers is None or self.servers.stopped.is_set():
            return
        fut = asyncio.run_coroutine_threadsafe(
            stop_servers(self.servers, self.backend, self.opts.grace_s), self.loop
        )
        fut.result(timeout=self.opts.grace_s + 30)
        self._thread.join(timeout=10)
