"""The gRPC API through the generated stubs and the Python client, against a live grpc.aio server.

Checks: streaming generate adds up (text, token ids, n, chat and token-id inputs) and equals
``LLM.generate`` when greedy; bad requests are INVALID_ARGUMENT naming the field (NOT_FOUND for
an unknown model) and the server keeps serving; UNAUTHENTICATED without the key; the standard
health service reports SERVING; reflection lists the service; Abort, client cancellation and
deadlines all abort the request and free its KV; prompt logprobs come once per request and
equal the engine's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from splitserve import LLM, SamplingParams, offload
from splitserve.client import (
    AsyncClient,
    Client,
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    UnauthenticatedError,
    UnavailableError,
)
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.frontends.grpc_server import SERVICE_NAME, _chunk
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions
from splitserve.cluster.frontends.streams import ChoiceDelta
from splitserve.outputs import Logprob
from splitserve.proto.splitserve.v1 import inference_pb2 as pb
from splitserve.proto.splitserve.v1 import inference_pb2_grpc as pb_grpc
from tests.utils import record_tokenizer_threads

KEY = "grpc-key"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[BackgroundServer]:
    backend = EngineBackend.from_config(
        model=str(tiny_model_dir), num_kv_blocks=256, max_model_len=MAX_MODEL_LEN
    )
    opts = ServeOptions(port=0, grpc_port=0, api_key=KEY, served_model_name="tiny", max_in_flight=3)
    with BackgroundServer(backend, opts) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    """The same model in process: the reference for greedy output and prompt logprobs."""
    return LLM(str(tiny_model_dir), num_kv_blocks=64)


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.grpc_target, api_key=KEY, timeout=60) as c:
        yield c


def _wait_idle(server: BackgroundServer, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = server.backend.engine.stats()  # type: ignore[attr-defined]
        if s["num_running"] == s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_blocks"]:
            return True
        time.sleep(0.02)
    return False


def test_info_rpcs(client: Client) -> None:
    assert [m.id for m in client.models()] == ["tiny"]
    info = client.server_info()
    assert info.healthy and dict(info.workers) == {"engine": 1}
    assert info.backend == "EngineBackend" and info.max_model_len == MAX_MODEL_LEN
    # the formats /version shows: float32 as the engine's default asked, its float weights
    assert info.dtype == info.dtype_requested == "float32" and info.dtype_reason == "requested"
    assert info.quantization == "auto" and not info.dtype_warning
    assert info.kv_cache_dtype == "float32"  # kv_cache_dtype auto: the activations' dtype
    assert dict(info.weight_formats) == {"float32": sum(dict(info.weight_formats).values())} != {}
    (load,) = client.loads()
    assert load.role == "engine" and load.num_blocks == 256
    ids = client.tokenize("hello world")
    assert client.detokenize(ids) == "hello world"
    assert len(client.tokenize(messages=[{"role": "user", "content": "hi"}])) > 3


def test_a_request_that_does_not_parse_is_invalid_argument(server: BackgroundServer) -> None:
    """A string field that is not UTF-8 (here an encoded surrogate) fails protobuf's parse
    before any servicer code: grpcio answered UNKNOWN; it is INVALID_ARGUMENT, after the key."""
    bad = b"a\xed\xa0\x80"
    generate = b"\x1a" + bytes([len(bad)]) + bad  # GenerateRequest.text
    tokenize = b"\x0a" + bytes([len(bad)]) + bad  # TokenizeRequest.text
    auth = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(server.grpc_target) as ch:
        raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        gen = ch.unary_stream(f"/{SERVICE_NAME}/Generate", **raw)
        tok = ch.unary_unary(f"/{SERVICE_NAME}/Tokenize", **raw)
        for call in (lambda md: list(gen(generate, metadata=md, timeout=30)),
                     lambda md: tok(tokenize, metadata=md, timeout=30)):
            with pytest.raises(grpc.RpcError) as e:
                call(auth)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "does not parse" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                call(())
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = tok(b"\x0a\x05hello", metadata=auth, timeout=30)  # the same path still serves
        assert pb.TokenizeResponse.FromString(ok).token_ids


def test_tokenizing_runs_off_the_loop_and_the_engine_thread(
    server: BackgroundServer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As over HTTP (test_http_api): templates, encoding and decoding of requests run on
    worker threads, never on the server's loop or the engine's thread."""
    seen = record_tokenizer_threads(monkeypatch, server.backend.tokenizer)
    chat = [{"role": "user", "content": "hi"}]
    assert client.generate("hello there", max_tokens=2).usage.completion_tokens == 2
    assert client.generate(messages=chat, max_tokens=2).usage.completion_tokens == 2
    assert client.tokenize("hello") and client.tokenize(messages=chat)
    assert client.detokenize([10, 11]) is not None
    assert seen["encode"] and seen["apply_chat_template"] and seen["decode"]
    on_loop = {server._thread.name}  # type: ignore[attr-defined]
    assert not (seen["encode"] | seen["apply_chat_template"]) & (on_loop | {"splitserve-engine"})
    # on the preparation pool (offload.py), not the loop's default executor
    assert all(t.startswith(offload.THREAD_PREFIX)
               for t in seen["encode"] | seen["apply_chat_template"])
    assert not seen["decode"] & on_loop


def test_greedy_generate_equals_llm(client: Client, llm: LLM) -> None:
    prompt = "The capital of France is"
    res = client.generate(prompt, max_tokens=10, temperature=0.0)
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0]
    assert res.text == ref.outputs[0].text
    assert res.completions[0].token_ids == ref.outputs[0].token_ids
    assert res.completions[0].finish_reason == "length"
    assert res.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert (
        res.usage.completion_tokens == 10 and res.usage.total_tokens == res.usage.prompt_tokens + 10
    )
    assert res.timing.e2e >= res.timing.decode > 0
    assert res.timing.e2e >= res.timing.ttft > 0.0001


def test_stream_chunks_then_complete(client: Client) -> None:
    responses = list(
        client.stream(token_ids=[5, 6, 7], max_tokens=6, temperature=0.0, n=2, seed=3, logprobs=2)
    )
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"}
    done = responses[-1].complete
    assert [c.index for c in done.completions] == [0, 1]
    assert all(c.num_tokens == 6 for c in done.completions)
    for r in responses[:-1]:
        assert len(r.chunk.logprobs) == len(r.chunk.token_ids)
        for lp in r.chunk.logprobs:
            assert len(lp.top_logprobs) >= 2 and lp.rank == 1  # greedy: sampled is the best


def test_chat_input_and_seed(client: Client) -> None:
    msgs = [{"role": "user", "content": "Tell me a story"}]
    a = client.generate(messages=msgs, max_tokens=8, temperature=1.0, seed=11)
    b = client.generate(messages=msgs, max_tokens=8, temperature=1.0, seed=11)
    assert a.text == b.text and a.usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"text": "hi", "max_tokens": -1}, "max_tokens"),
        ({"text": "hi", "temperature": -1.0}, "temperature"),
        ({"text": "hi", "top_p": 0.0}, "top_p"),
        ({"text": "hi", "n": 0}, "n"),
        ({"text": "hi", "n": 17}, "n"),  # above the server's max_n (16)
        ({"text": "hi", "logprobs": 99}, "logprobs"),
        ({"text": ""}, "prompt"),
        ({"token_ids": [1, 10**8]}, "prompt_token_ids"),
        ({"token_ids": [7] * MAX_MODEL_LEN}, "prompt"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"text": "hi", "images": [b"\x89PNG"]}, "images"),  # a text-only model
        ({"text": "hi", "presence_penalty": 3.0}, "presence_penalty"),
        ({"text": "hi", "repetition_penalty": 0.0}, "repetition_penalty"),
        ({"text": "hi", "logit_bias": {10**8: 1.0}}, "logit_bias"),
        ({"text": "hi", "logit_bias": {5: 200.0}}, "logit_bias"),
        ({"text": "hi", "allowed_token_ids": [5, 10**8]}, "allowed_token_ids"),
        ({"text": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"text": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"text": "hi", "bad_words": [" "]}, "bad_words"),
        ({"text": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"text": "hi", "truncate_prompt_tokens": MAX_MODEL_LEN + 1}, "truncate_prompt_tokens"),
    ],
)
def test_invalid_argument_names_the_field(client: Client, kwargs, field) -> None:
    text = kwargs.pop("text", None)
    with pytest.raises(InvalidArgumentError) as e:
        client.generate(text, **kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.message
    assert client.generate("still serving", max_tokens=2).usage.completion_tokens == 2


def test_penalties_and_logit_bias_apply(server: BackgroundServer, client: Client) -> None:
    forced = client.generate(token_ids=[5, 6, 7], max_tokens=5, temperature=0.8, seed=2,
                             ignore_eos=True, logit_bias={1234: 100.0})
    assert forced.completions[0].token_ids == [1234] * 5
    only = client.generate(token_ids=[5, 6, 7], max_tokens=8, temperature=1.0, seed=9,
                           ignore_eos=True, allowed_token_ids=[40, 41])
    assert set(only.completions[0].token_ids) <= {40, 41}
    base = dict(token_ids=[5, 6, 7], max_tokens=6, temperature=0.0, ignore_eos=True)
    biased = client.generate(**base, logit_bias={1234: 20.0})
    pushed = client.generate(**base, logit_bias={1234: 20.0}, frequency_penalty=2.0)
    assert pushed.completions[0].token_ids != biased.completions[0].token_ids


def test_bad_words_and_truncate_prompt_tokens(client: Client, llm: LLM) -> None:
    long = [700 + i % 300 for i in range(MAX_MODEL_LEN + 100)]  # over the context
    res = client.generate(token_ids=long, max_tokens=3, temperature=0.0, truncate_prompt_tokens=40)
    want = llm.generate([long[-40:]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert res.usage.prompt_tokens == 40
    assert res.completions[0].token_ids == want.outputs[0].token_ids
    base = dict(token_ids=[5, 6, 7], max_tokens=6, temperature=0.0, ignore_eos=True)
    free = client.generate(**base)
    word = llm.engine.tokenizer.decode(free.completions[0].token_ids[:1]).strip()
    banned = client.generate(**base, bad_words=[word])
    ref = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                   bad_words=[word]))[0]
    assert banned.completions[0].token_ids == ref.outputs[0].token_ids
    assert banned.completions[0].token_ids != free.completions[0].token_ids


def test_chat_options(client: Client, llm: LLM) -> None:
    msgs = [{"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "My favourite color is"}]
    res = client.generate(messages=msgs, max_tokens=5, temperature=0.0,
                          add_generation_prompt=False, continue_final_message=True,
                          chat_template_kwargs={"enable_thinking": False, "depth": 2})
    want = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=5), add_generation_prompt=False,
                    continue_final_message=True)[0]
    assert res.completions[0].token_ids == want.outputs[0].token_ids
    for kwargs, field in (({"continue_final_message": True}, "continue_final_message"),
                          ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools")):
        with pytest.raises(InvalidArgumentError, match=field):
            client.generate(messages=msgs, max_tokens=2, **kwargs)


PROMPT = list(range(300, 318))


def _with_prompt_logprobs(responses: list[pb.GenerateResponse]) -> list[pb.GenerateChunk]:
    return [r.chunk for r in responses
            if r.WhichOneof("response") == "chunk" and r.chunk.prompt_logprobs]


def _reference(llm: LLM, k: int) -> list[dict]:
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1,
                                                   prompt_logprobs=k))
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    return out.prompt_logprobs[1:]  # type: ignore[return-value]


def test_prompt_logprobs_once_and_equal_the_engine(client: Client, llm: LLM) -> None:
    """prompt_logprobs=2: one chunk carries them, one entry per prompt token after the first:
    that token's own logprob and rank and exactly the 2 best, as the engine computes them."""
    kw = dict(token_ids=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
    responses = list(client.stream(**kw, prompt_logprobs=2))
    (chunk,) = _with_prompt_logprobs(responses)
    entries = list(chunk.prompt_logprobs)
    assert len(entries) == len(PROMPT) - 1
    assert [e.token_id for e in entries] == PROMPT[1:]
    ref = _reference(llm, 2)
    for e, step in zip(entries, ref, strict=True):
        assert e.logprob <= 0 and e.rank >= 1
        own = step[e.token_id]
        assert e.logprob == pytest.approx(own.logprob, abs=1e-4) and e.rank == own.rank
        assert e.token == own.decoded_token
        assert [t.rank for t in e.top_logprobs] == [1, 2]
        best = sorted(step.items(), key=lambda kv: kv[1].rank)[:2]
        assert [t.token_id for t in e.top_logprobs] == [t for t, _ in best]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            [p.logprob for _, p in best], abs=1e-4)
        if e.rank > 2:  # not one of the best two: they are no less likely than it
            assert e.top_logprobs[1].logprob >= e.logprob
    # the client's result keeps them; the same request again gives the same numbers
    res = client.generate(**kw, prompt_logprobs=2)
    assert list(res.prompt_logprobs) == entries
    # without prompt_logprobs: no chunk has the field, the result has none
    plain = list(client.stream(**kw))
    assert not _with_prompt_logprobs(plain) and not client.generate(**kw).prompt_logprobs
    assert [r.chunk.token_ids for r in plain[:-1]] == [r.chunk.token_ids for r in responses[:-1]]


def test_prompt_logprobs_once_with_n(client: Client, llm: LLM) -> None:
    """n=2 samples one prompt: its logprobs come once; prompt_logprobs=0: no top ones."""
    responses = list(client.stream(token_ids=PROMPT, n=2, max_tokens=4, temperature=1.0,
                                   seed=5, prompt_logprobs=0))
    (chunk,) = _with_prompt_logprobs(responses)
    assert [e.token_id for e in chunk.prompt_logprobs] == PROMPT[1:]
    assert all(not e.top_logprobs for e in chunk.prompt_logprobs)
    ref = [step[t].logprob for step, t in zip(_reference(llm, 0), PROMPT[1:], strict=True)]
    assert [e.logprob for e in chunk.prompt_logprobs] == pytest.approx(ref, abs=1e-4)
    assert [c.index for c in responses[-1].complete.completions] == [0, 1]
    assert all(c.num_tokens == 4 for c in responses[-1].complete.completions)


def test_prompt_logprob_entries_hold_exactly_the_top_k() -> None:
    """The engine's entry is the prompt token then the top k others: with the token among the
    top k the entry has k items, else k + 1; ``top_logprobs`` is the top k either way."""
    steps = [
        None,
        {7: Logprob(-0.1, 1, "a"), 9: Logprob(-2.5, 2, "b")},  # 7 is the best
        {3: Logprob(-6.0, 5, "c"), 7: Logprob(-0.2, 1, "a"), 9: Logprob(-1.9, 2, "b")},
    ]
    cd = ChoiceDelta(0, "", [], None, None, True, prompt_logprobs=steps)  # type: ignore[arg-type]
    chunk = _chunk(cd, SamplingParams(prompt_logprobs=2))
    first, second = chunk.prompt_logprobs
    assert (first.token_id, first.rank, first.token) == (7, 1, "a")
    assert [(t.token_id, t.rank) for t in first.top_logprobs] == [(7, 1), (9, 2)]
    assert (second.token_id, second.rank, second.logprob) == (3, 5, -6.0)
    assert [(t.token_id, t.rank) for t in second.top_logprobs] == [(7, 1), (9, 2)]
    k0 = _chunk(cd, SamplingParams(prompt_logprobs=0))  # only the token's own
    assert [(e.token_id, len(e.top_logprobs)) for e in k0.prompt_logprobs] == [(7, 0), (3, 0)]


def test_no_input_and_unknown_model(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        md = (("authorization", f"Bearer {KEY}"),)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(), metadata=md))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="x", model="gpt-9"), metadata=md))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "model" in e.value.details()


def test_api_key_required(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as ch:  # the scheme in any case
        stub = pb_grpc.InferenceServiceStub(ch)
        for scheme in ("bearer", "BEARER"):
            md = (("authorization", f"{scheme} {KEY}"),)
            assert stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10).models
        with pytest.raises(grpc.RpcError) as e:
            stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", KEY),), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for key in (None, "wrong"):
        with Client(server.grpc_target, api_key=key) as c:
            with pytest.raises(UnauthenticatedError):
                c.models()
            with pytest.raises(UnauthenticatedError):
                c.generate("hi", max_tokens=2)
            assert c.health()  # health stays open for probes


def test_standard_health_and_reflection(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            res = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert res.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (res,) = list(refl.ServerReflectionInfo(iter([req]), timeout=5))
        names = {s.name for s in res.list_services_response.service}
    assert {"splitserve.v1.InferenceService", "grpc.health.v1.Health"} <= names


LONG = {"token_ids": list(range(500, 540)), "max_tokens": 900, "ignore_eos": True}


def test_abort_mid_stream_frees_blocks(server: BackgroundServer, client: Client) -> None:
    assert _wait_idle(server)
    stream = client.stream(request_id="abort-me", **LONG)
    for _ in range(3):
        assert next(stream).WhichOneof("response") == "chunk"
    client.abort("abort-me")
    last = list(stream)[-1]
    assert last.complete.completions[0].finish_reason == "abort"
    assert _wait_idle(server)


def test_duplicate_live_request_id_is_already_exists(
    server: BackgroundServer, client: Client
) -> None:
    assert _wait_idle(server)
    stream = client.stream(request_id="dup", **LONG)
    assert next(stream).WhichOneof("response") == "chunk"
    with pytest.raises(ClientError) as e:
        client.generate("again", max_tokens=2, request_id="dup")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "dup" in e.value.message
    client.abort("dup")
    assert list(stream)[-1].complete.completions[0].finish_reason == "abort"
    assert client.generate("reuse", max_tokens=2, request_id="dup").usage.completion_tokens == 2
    assert _wait_idle(server)


@pytest.mark.parametrize("rid", ["r" * 129, "a\x01b", "a\tb"])
def test_request_id_is_held_to_the_http_bound(client: Client, rid: str) -> None:
    """1..128 printable characters, as HTTP's X-Request-Id (it took 20,000 characters and
    control characters before, which go with the request to the workers and into logs)."""
    with pytest.raises(ClientError) as e:
        client.generate("hi", max_tokens=2, request_id=rid)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.value.message
    assert client.generate("hi", max_tokens=2, request_id="r" * 128).usage.completion_tokens == 2


def test_deadline_exceeded_aborts(server: BackgroundServer, client: Client) -> None:
    assert _wait_idle(server)
    with pytest.raises(DeadlineExceededError):
        client.generate(timeout=0.3, **LONG)
    assert _wait_idle(server)


async def test_async_client_cancel_aborts(server: BackgroundServer) -> None:
    assert _wait_idle(server)
    async with AsyncClient(server.grpc_target, api_key=KEY) as c:
        assert await c.health()
        count = 0
        async for _ in c.stream(**LONG):
            count += 1
            if count == 3:
                break
        await asyncio.sleep(0)
        res = await c.generate("after cancel", max_tokens=3)
        assert res.usage.completion_tokens == 3
    assert await asyncio.to_thread(_wait_idle, server)


def test_overload_is_resource_exhausted(server: BackgroundServer, client: Client) -> None:
    assert _wait_idle(server)
    params = {"token_ids": list(range(700, 720)), "max_tokens": 150, "ignore_eos": True}
    streams = [client.stream(**params) for _ in range(3)]
    for s in streams:
        assert next(s).WhichOneof("response") == "chunk"  # admitted
    with pytest.raises(UnavailableError) as e:
        client.generate("one too many", max_tokens=2)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for s in streams:
        last = list(s)[-1]
        assert last.complete.completions[0].finish_reason == "length"
    assert client.generate("after the burst", max_tokens=2).usage.completion_tokens == 2


def test_embed_equals_the_engine(server: BackgroundServer, client: Client, llm: LLM) -> None:
    """``Embed``: texts and token ids in order, float32 values as the engine computes them,
    ``dimensions`` / ``normalize`` / ``truncate_prompt_tokens`` as ``PoolingParams``."""
    from splitserve import PoolingParams

    ids = llm.get_tokenizer().encode("token ids to embed, straight to the model")
    want = [o.outputs.embedding for o in llm.embed(["a text to embed", ids])]
    assert client.embed(["a text to embed", ids]) == want
    cut = client.embed(ids, dimensions=8, normalize=False)
    assert cut == [llm.embed([ids], PoolingParams(dimensions=8, normalize=False))[0]
                   .outputs.embedding] and len(cut[0]) == 8
    assert client.embed(ids, truncate_prompt_tokens=3) == [
        llm.embed([ids[-3:]])[0].outputs.embedding]
    got = asyncio.run(_async_embed(server))
    assert got == [want[0]]
    assert _wait_idle(server)


async def _async_embed(server: BackgroundServer) -> list[list[float]]:
    async with AsyncClient(server.grpc_target, api_key=KEY, timeout=60) as c:
        return await c.embed("a text to embed")


@pytest.mark.parametrize(("request_kwargs", "field"), [
    ({}, "inputs"),
    ({"inputs": [pb.EmbedInput()]}, "inputs"),
    ({"inputs": [pb.EmbedInput(text="")]}, "inputs"),
    ({"inputs": [pb.EmbedInput(token_ids=pb.TokenIds(ids=[10**9]))]}, "inputs"),
    ({"inputs": [pb.EmbedInput(text="x")] * 65}, "inputs"),
    ({"inputs": [pb.EmbedInput(text="x")], "dimensions": 0}, "dimensions"),
    ({"inputs": [pb.EmbedInput(text="x")], "dimensions": 65}, "dimensions"),
    ({"inputs": [pb.EmbedInput(text="x")], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
])
def test_embed_bad_input_is_invalid_argument_naming_the_field(
    server: BackgroundServer, request_kwargs: dict, field: str
) -> None:
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        md = (("authorization", f"Bearer {KEY}"),)
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(**request_kwargs), metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details().startswith(field), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")], model="gpt-9"),
                       metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _wait_idle(server)
