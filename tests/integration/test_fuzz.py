"""Hostile clients: schemathesis against the HTTP API, hypothesis against gRPC ``Generate``.

One live server (tiny random Llama on one engine, API key on, a small in-flight limit) serves
the module. schemathesis (its CLI, bounded to 60 s) loads the server's own ``/openapi.json``
and runs its coverage, fuzzing and stateful phases with every check on except
``positive_data_acceptance`` (schema-valid bodies may still be refused by limits the schema
cannot state: context length, vocabulary, unsupported features; those answers are 400s and
the conformance checks hold them to the document). That includes no 5xx, declared status
codes, content types and response schemas, 405 with ``Allow``, and enforced auth. Then
hypothesis sends ``GenerateRequest`` messages with arbitrary fields over gRPC: every answer
is OK or a client-error status, never INTERNAL / UNKNOWN. After each run the server still
answers a real request and the engine is idle with every KV block free.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.client import Client
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions
from splitserve.proto.splitserve.v1 import inference_pb2 as pb
from splitserve.proto.splitserve.v1 import inference_pb2_grpc as pb_grpc

KEY = "fuzz-key"
MAX_MODEL_LEN = 128
FUZZ_SECONDS = 60


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[BackgroundServer]:
    backend = EngineBackend.from_config(
        model=str(tiny_model_dir), num_kv_blocks=128, max_model_len=MAX_MODEL_LEN
    )
    opts = ServeOptions(port=0, grpc_port=0, api_key=KEY, served_model_name="tiny",
                        max_in_flight=8)
    with BackgroundServer(backend, opts) as srv:
        yield srv


def _in_flight(server: BackgroundServer) -> float:
    text = httpx.get(server.http_url + "/metrics", timeout=30).text
    return float(text.split("\nsplitserve:requests_in_flight ")[1].split()[0])


def _still_serving_and_idle(server: BackgroundServer) -> None:
    # Every request the fuzzer started gave its admission slot back (CI once found all 8 held
    # by abandoned streams after the run, and every later request got 429).
    deadline = time.monotonic() + 30
    while (held := _in_flight(server)) != 0:
        assert time.monotonic() < deadline, f"{held} admission slots still held"
        time.sleep(0.05)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    r = httpx.post(server.http_url + "/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    with Client(server.grpc_target, api_key=KEY) as c:
        assert len(c.generate(token_ids=[5, 6], max_tokens=2, ignore_eos=True)
                   .completions[0].token_ids) == 2
    engine = server.backend.engine  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:  # aborted and finished requests give every block back
        stats = engine.stats()
        if (stats["num_running"], stats["num_waiting"]) == (0, 0) and (
            stats["num_free_blocks"] == stats["num_blocks"]
        ):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_schemathesis_finds_no_defect(server: BackgroundServer) -> None:
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", server.http_url + "/openapi.json",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-time", str(FUZZ_SECONDS), "--header", f"Authorization: Bearer {KEY}",
        "--no-color",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert "18 selected / 18 total" in report, report[-3000:]  # every operation exercised
    assert "Fuzzing" in report and "Stateful" in report
    _still_serving_and_idle(server)


_roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "", "robot"])
_int32 = st.integers(-(2**31), 2**31 - 1)
_text = st.text(max_size=40)


@st.composite
def _sampling(draw: st.DrawFn) -> pb.SamplingParams:
    fields = {
        "n": draw(st.one_of(st.integers(-2, 20), _int32)),
        "max_tokens": draw(st.one_of(st.integers(-2, 40), _int32)),
        "min_tokens": draw(st.one_of(st.integers(-2, 40), _int32)),
        "temperature": draw(st.floats(allow_nan=True, allow_infinity=True)),
        "top_p": draw(st.floats(allow_nan=True, allow_infinity=True)),
        "top_k": draw(_int32),
        "min_p": draw(st.floats(allow_nan=True, allow_infinity=True)),
        "seed": draw(st.integers(-(2**63), 2**63 - 1)),
        "ignore_eos": draw(st.booleans()),
        "logprobs": draw(st.one_of(st.integers(-2, 25), _int32)),
        "prompt_logprobs": draw(st.one_of(st.integers(-2, 25), _int32)),
        "truncate_prompt_tokens": draw(st.one_of(st.integers(-3, 40), _int32)),
        "bad_words": draw(st.lists(st.text(max_size=6), max_size=3)),
        "cache_salt": draw(st.text(max_size=8)),
        "include_stop_str_in_output": draw(st.booleans()),
        "skip_special_tokens": draw(st.booleans()),
    }
    chosen = draw(st.sets(st.sampled_from(sorted(fields))))
    msg = pb.SamplingParams(**{k: v for k, v in fields.items() if k in chosen})
    msg.stop.extend(draw(st.lists(_text, max_size=3)))
    msg.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=3)))
    return msg


@st.composite
def _requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), _text)),
        model=draw(st.sampled_from(["", "tiny", "gpt-9"])),
        sampling_params=draw(_sampling()),
    )
    kind = draw(st.sampled_from(["text", "token_ids", "messages", "none"]))
    if kind == "text":
        req.text = draw(st.text(max_size=200))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(
            st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)), max_size=200)))
    elif kind == "messages":
        msgs = draw(st.lists(st.tuples(_roles, _text), max_size=4))
        req.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in msgs)
        if draw(st.booleans()):
            req.messages.add_generation_prompt = draw(st.booleans())
    req.images.extend(draw(st.lists(st.binary(max_size=64), max_size=2)))
    return req


_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}


def test_grpc_generate_fuzz(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        metadata = (("authorization", f"Bearer {KEY}"),)

        @settings(max_examples=200, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(_requests())
        def one(request: pb.GenerateRequest) -> None:
            try:
                responses = list(stub.Generate(request, metadata=metadata, timeout=60))
            except grpc.RpcError as e:
                assert e.code() in _CLIENT_ERRORS, (e.code(), e.details(), request)
                assert e.details(), request  # the message says what is wrong
                return
            assert responses[-1].WhichOneof("response") == "complete", request

        one()
    _still_serving_and_idle(server)
