"""Backend faults the single engine cannot produce, seen through both frontends.

A stand-in Backend (the faults of a cluster: no healthy prefill worker, overload) shows that
the frontends depend only on the Backend contract: 503 / UNAVAILABLE and NOT_SERVING when
unhealthy, 429 with Retry-After / RESOURCE_EXHAUSTED when overloaded.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.cluster.frontends.backend import Backend, BackendHealth, PromptInput, WorkerLoad
from splitserve.cluster.frontends.client import Client, UnavailableError
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions
from splitserve.errors import NoHealthyWorkerError, OverloadedError
from splitserve.outputs import RequestOutput
from splitserve.sampling_params import SamplingParams


class FaultyBackend(Backend):
    """Refuses every request with ``error``; reports no healthy prefill worker."""

    def __init__(self) -> None:
        self.error: Exception = NoHealthyWorkerError("no healthy prefill worker")

    @property
    def model_id(self) -> str:
        return "fake"

    @property
    def max_model_len(self) -> int:
        return 128

    @property
    def tokenizer(self) -> None:
        return None

    def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self._refuse()

    async def _refuse(self) -> AsyncIterator[RequestOutput]:
        raise self.error
        yield  # pragma: no cover (makes this an async generator)

    async def abort(self, request_id: str) -> None:
        return None

    async def health(self) -> BackendHealth:
        return BackendHealth(False, {"prefill": 0, "decode": 1}, "no healthy prefill worker")

    async def loads(self) -> list[WorkerLoad]:
        return [WorkerLoad("d0", "decode", num_blocks=8, num_free_blocks=8)]

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[BackgroundServer, FaultyBackend]]:
    backend = FaultyBackend()
    with BackgroundServer(backend, ServeOptions(port=0, grpc_port=0, max_in_flight=None)) as s:
        yield s, backend


def test_unhealthy_is_503_and_unavailable(faulty) -> None:
    server, backend = faulty
    backend.error = NoHealthyWorkerError("no healthy prefill worker")
    r = httpx.get(server.http_url + "/health")
    assert r.status_code == 503 and "prefill" in r.json()["error"]["message"]
    r = httpx.post(server.http_url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert r.headers["retry-after"] == "1"  # a replacement is on its way: clients retry soon
    with Client(server.grpc_target) as c:
        with pytest.raises(UnavailableError) as e:
            c.generate("hi")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert not c.server_info().healthy


def test_grpc_health_not_serving(faulty) -> None:
    server, _ = faulty
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.1)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_overload_is_429_and_resource_exhausted(faulty) -> None:
    server, backend = faulty
    backend.error = OverloadedError("prefill queue full")
    r = httpx.post(server.http_url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    with Client(server.grpc_target) as c:
        with pytest.raises(UnavailableError) as e:
            c.generate("hi")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metrics_label_workers_by_role(faulty) -> None:
    server, _ = faulty
    text = httpx.get(server.http_url + "/metrics").text
    assert 'splitserve:num_free_kv_blocks{role="decode",worker="d0"} 8.0' in text
    assert 'splitserve:request_failure_total{model_name="fake",reason="503"}' in text
