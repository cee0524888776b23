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


def _cosine(a: list[float], b: list[float]) -> float:
    import math

    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_score_is_the_cosine_of_the_engines_embeddings(server, single: LLM) -> None:
    """vLLM's ``/score`` over an embedding model: one to one, one to many and pairwise."""
    texts = ["What is the capital of France?", "Paris is the capital of France.",
             "Bananas are yellow.", "The sky is blue."]
    emb = {t: o.outputs.embedding for t, o in zip(texts, single.embed(texts), strict=True)}
    url = f"{server.http_url}/score"
    cases = [
        ({"text_1": texts[0], "text_2": texts[1]}, [(texts[0], texts[1])]),
        ({"text_1": texts[0], "text_2": texts[1:]}, [(texts[0], t) for t in texts[1:]]),
        ({"text_1": texts[:2], "text_2": texts[2:]}, [(texts[0], texts[2]), (texts[1], texts[3])]),
    ]
    for body, pairs in cases:
        r = httpx.post(url, json={"model": "tiny", **body})
        assert r.status_code == 200, r.text
        got = r.json()
        assert [d["index"] for d in got["data"]] == list(range(len(pairs)))
        for d, (a, b) in zip(got["data"], pairs, strict=True):
            assert d["object"] == "score" and d["score"] == pytest.approx(_cosine(emb[a], emb[b]),
                                                                          abs=1e-9)
    assert httpx.post(f"{server.http_url}/v1/score",
                      json={"text_1": texts[0], "text_2": texts[1]}).status_code == 200


def test_rerank_orders_documents_by_the_cosine(server, single: LLM) -> None:
    query, docs = "a cat on a mat", ["dogs bark", "a cat sat on the mat", "stock prices", "cats"]
    emb = [o.outputs.embedding for o in single.embed([query, *docs])]
    want = sorted(range(len(docs)), key=lambda i: -_cosine(emb[0], emb[i + 1]))
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = httpx.post(f"{server.http_url}{path}",
                       json={"model": "tiny", "query": query, "documents": docs, "top_n": 3})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == want[:3]
        assert [x["document"]["text"] for x in results] == [docs[i] for i in want[:3]]
        scores = [x["relevance_score"] for x in results]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(_cosine(emb[0], emb[want[0] + 1]), abs=1e-9)
    r = httpx.post(f"{server.http_url}/rerank",
                   json={"query": query, "documents": docs, "return_documents": False})
    assert len(r.json()["results"]) == 4 and "document" not in r.json()["results"][0]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/score", {"text_1": [], "text_2": "x"}, "text_1"),
    ("/score", {"text_1": "x", "text_2": []}, "text_2"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
    ("/score", {"text_1": "", "text_2": "x"}, "text_1"),
    ("/score", {"text_1": "x", "text_2": "y " * 600}, "text_2"),
    ("/score", {"text_1": 5, "text_2": "x"}, "text_1"),
    ("/rerank", {"query": "q", "documents": []}, "documents"),
    ("/rerank", {"query": "", "documents": ["d"]}, "query"),
    ("/rerank", {"query": "q", "documents": ["d", ""]}, "documents"),
    ("/rerank", {"query": "q", "documents": ["d"], "top_n": -1}, "top_n"),
    ("/rerank", {"documents": ["d"]}, "query"),
    ("/rerank", {"query": "q", "documents": ["d"] * 257}, "documents"),
    ("/score", {"text_1": "q", "text_2": ["d"] * 257}, "text_2"),
])
def test_score_and_rerank_bad_input_name_the_field(server, path: str, body: dict,
                                                   param: str) -> None:
    r = httpx.post(f"{server.http_url}{path}", json={"model": "tiny", **body})
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["param"] == param, r.json()
    engine = server.backend.engine.engine
    wait_until(lambda: not engine.has_unfinished_requests()
               and engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"],
               "the engine idle with every block free", timeout_s=10.0)
