"""``POST /v1/embeddings`` on a real server, through the official ``openai`` client."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from splitserve import LLM, PoolingParams
from tests.utils import make_tiny_embedding_model, tiny_server, wait_until


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    with tiny_server(tiny_model_dir, grpc_port=None) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def single(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=256, max_model_len=512)


def test_embeddings_equal_the_engine_in_float_and_base64(client: OpenAI, single: LLM) -> None:
    texts = ["The cat sat on the mat.", "A second, longer sentence to embed here.", "hi"]
    want = [o.outputs.embedding for o in single.embed(texts)]
    # the client asks for base64 when no format is given, and decodes it to floats
    got = client.embeddings.create(model="tiny", input=texts)
    assert [d.index for d in got.data] == [0, 1, 2]
    assert [d.embedding for d in got.data] == want  # float32 bits, both ways
    as_floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    for d, w in zip(as_floats.data, want, strict=True):
        assert d.embedding == pytest.approx(w, abs=1e-7)
    n = sum(len(single.get_tokenizer().encode(t)) for t in texts)
    assert got.usage.prompt_tokens == got.usage.total_tokens == n
    assert got.model == "tiny" and got.object == "list"


def test_embeddings_are_counted_in_metrics(client: OpenAI, server) -> None:
    def counter(name: str) -> float:
        text = httpx.get(f"{server.http_url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name))

    prompt, success = counter("splitserve:prompt_tokens_total"), counter(
        "splitserve:request_success_total")
    generated = counter("splitserve:generation_tokens_total")
    out = client.embeddings.create(model="tiny", input=["one two three", "four"])
    assert counter("splitserve:prompt_tokens_total") - prompt == out.usage.prompt_tokens
    assert counter("splitserve:request_success_total") - success == 2
    assert counter("splitserve:generation_tokens_total") == generated


def test_token_ids_dimensions_and_vllm_extras(client: OpenAI, server, single: LLM) -> None:
    ids = single.get_tokenizer().encode("Token ids go straight to the model.")
    (want,) = single.embed([ids], PoolingParams(dimensions=8))
    got = client.embeddings.create(model="tiny", input=[ids], dimensions=8,
                                   encoding_format="float")
    assert got.data[0].embedding == pytest.approx(want.outputs.embedding, abs=1e-7)
    body = {"model": "tiny", "input": ids, "normalize": False, "truncate_prompt_tokens": 4,
            "encoding_format": "base64"}
    r = httpx.post(f"{server.http_url}/v1/embeddings", json=body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    vec = struct.unpack(f"<{len(raw) // 4}f", raw)
    (ref,) = single.embed([ids[-4:]], PoolingParams(normalize=False))
    assert list(vec) == pytest.approx(ref.outputs.embedding, abs=0)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [10**9]}, "input"),
    ({"input": "x " * 600}, "input"),  # past max_model_len (512)
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": 65}, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "model": "other"}, "model"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"input": ["a"] * 65}, "input"),
    ({"input": 3}, "input"),
])
def test_bad_input_gets_a_400_naming_the_field(server, single: LLM, body: dict, param: str) -> None:
    r = httpx.post(f"{server.http_url}/v1/embeddings", json={"model": "tiny", **body})
    assert r.status_code in (400, 404, 422), r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    engine = server.backend.engine.engine  # nothing stays behind on the engine
    wait_until(lambda: not engine.has_unfinished_requests()
               and engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"],
               "the engine idle with every block free", timeout_s=10.0)


def test_an_embedding_models_server_refuses_generation(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A base model's checkpoint (no head): embeddings served, completions and chat a 400."""
    folder = make_tiny_embedding_model(tmp_path, tokenizer_dir)
    with tiny_server(folder, grpc_port=None) as srv:
        client = OpenAI(base_url=f"{srv.http_url}/v1", api_key="unused", max_retries=0)
        got = client.embeddings.create(model="tiny", input="an embedding model")
        (want,) = LLM(str(folder), num_kv_blocks=64).embed(["an embedding model"])
        assert got.data[0].embedding == want.outputs.embedding
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}]})):
            r = httpx.post(f"{srv.http_url}{path}", json={"model": "tiny", **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
