"""TLS on both frontends, with certificates made here by ``trustme`` (a throwaway CA).

HTTPS: the official ``openai`` client trusting the CA gets answers; a client that does not
trust it fails the handshake; a plain-HTTP request to the TLS port gets no answer. gRPC:
``splitserve.client.Client`` with the CA's root certificate works, a plain-text channel
does not. Mutual TLS (``client_ca``): a client without a certificate signed by that CA is
refused by both servers, one with such a certificate is served.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from splitserve.client import Client, Tls, UnavailableError
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions, TlsOptions

KEY = "tls-test-key"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Server certificate (for 127.0.0.1 and localhost), a client certificate, the CA."""
    d = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.test")
    paths = {
        "ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
        "client_cert": d / "client.pem", "client_key": d / "client.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(paths["cert"]), append=True)
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(paths["client_cert"]), append=True)
    return paths


@pytest.fixture(scope="module")
def backend(tiny_model_dir) -> EngineBackend:
    return EngineBackend.from_config(model=str(tiny_model_dir), num_kv_blocks=64, max_model_len=256)


def _serve(backend: EngineBackend, tls: TlsOptions) -> BackgroundServer:
    opts = ServeOptions(port=0, grpc_port=0, api_key=KEY, served_model_name="tiny", tls=tls)
    return BackgroundServer(_Unclosed(backend), opts)


class _Unclosed:
    """The module's backend, shared by two servers: stopping one must not close it."""

    def __init__(self, backend: EngineBackend) -> None:
        self._backend = backend

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._backend, name)

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def tls_server(backend: EngineBackend, pems: dict[str, Path]) -> Iterator[BackgroundServer]:
    with _serve(backend, TlsOptions(str(pems["cert"]), str(pems["key"]))) as srv:
        yield srv


def test_https_with_the_ca(tls_server: BackgroundServer, pems: dict[str, Path]) -> None:
    assert tls_server.http_url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=ssl.create_default_context(cafile=pems["ca"])) as http:
        client = openai.OpenAI(base_url=tls_server.http_url + "/v1", api_key=KEY,
                               max_retries=0, http_client=http)
        out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage is not None and out.usage.completion_tokens == 3


def test_https_refuses_an_untrusting_client_and_plain_http(tls_server: BackgroundServer) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls_server.http_url + "/health")  # the system store does not know our CA
    plain = tls_server.http_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # a TLS server does not speak HTTP in the clear
        httpx.get(plain + "/health", timeout=5)


def test_grpc_tls_client(tls_server: BackgroundServer, pems: dict[str, Path]) -> None:
    with Client(tls_server.grpc_target, api_key=KEY, root_certificates=pems["ca"]) as c:
        assert len(c.generate(token_ids=[5, 6, 7], max_tokens=3, ignore_eos=True)
                   .completions[0].token_ids) == 3
        assert c.health()
    with Client(tls_server.grpc_target, api_key=KEY, timeout=5) as plain:
        with pytest.raises(UnavailableError):
            plain.models()


def test_mutual_tls(backend: EngineBackend, pems: dict[str, Path]) -> None:
    tls = TlsOptions(str(pems["cert"]), str(pems["key"]), client_ca=str(pems["ca"]))
    with _serve(backend, tls) as srv:
        ctx = ssl.create_default_context(cafile=pems["ca"])
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            with httpx.Client(verify=ctx) as http:
                http.get(srv.http_url + "/health", timeout=5)
        ctx.load_cert_chain(pems["client_cert"], pems["client_key"])
        with httpx.Client(verify=ctx) as http:
            assert http.get(srv.http_url + "/health", timeout=10).status_code == 200
        with Client(srv.grpc_target, root_certificates=pems["ca"], timeout=5) as anonymous:
            with pytest.raises(UnavailableError):
                anonymous.health()
        mutual = Tls(root_certificates=pems["ca"], client_certificate=pems["client_cert"],
                     client_key=pems["client_key"])
        with Client(srv.grpc_target, api_key=KEY, tls=mutual) as c:
            assert c.health() and c.models()[0].id == "tiny"
