"""The OpenAI HTTP API through the official ``openai`` client, against a live uvicorn server.

One server (tiny random Llama, API key on) serves the whole module. Checks: greedy output
equals ``LLM.generate``; streaming adds up to the whole answer and ends with ``[DONE]``;
usage; ``n``; stop strings; seeds; logprobs in OpenAI's shapes; every bad input is a 4xx with
an OpenAI error body naming the field (never a 500) and the server keeps serving; 401 on a
wrong key; a client that disconnects gets its request aborted and its KV freed.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve import LLM, SamplingParams, offload
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions
from tests.utils import record_tokenizer_threads

KEY = "test-key"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[BackgroundServer]:
    backend = EngineBackend.from_config(
        model=str(tiny_model_dir), num_kv_blocks=256, max_model_len=MAX_MODEL_LEN
    )
    opts = ServeOptions(
        port=0, grpc_port=None, api_key=KEY, served_model_name="tiny", max_in_flight=3
    )
    with BackgroundServer(backend, opts) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.http_url, headers=headers, timeout=60) as c:
        yield c


def _engine_idle(server: BackgroundServer) -> bool:
    stats = server.backend.engine.stats()  # type: ignore[attr-defined]
    return (
        stats["num_running"] == 0
        and stats["num_waiting"] == 0
        and stats["num_free_blocks"] == stats["num_blocks"]
    )


def _wait_idle(server: BackgroundServer, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _engine_idle(server):
            return True
        time.sleep(0.02)
    return False


def test_models_health_openapi(client: openai.OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert http.get("/health").json()["workers"] == {"engine": 1}
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize"} <= set(paths)


def test_greedy_completion_equals_llm_generate(client: openai.OpenAI, tiny_model_dir) -> None:
    prompt = "The capital of France is"
    res = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64)
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert res.choices[0].text == ref.text
    assert res.choices[0].finish_reason == ref.finish_reason
    u = res.usage
    assert u.completion_tokens == len(ref.token_ids)
    assert u.prompt_tokens == len(llm.engine.tokenizer.encode(prompt))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0


def test_prefix_cache_shows_in_usage(client: openai.OpenAI) -> None:
    prompt = list(range(300, 300 + 40))  # 2 full blocks of 16 are cacheable
    client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    res = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert res.usage.prompt_tokens == 40
    assert res.usage.prompt_tokens_details.cached_tokens == 32


def test_cache_salt_keeps_tenants_apart(client: openai.OpenAI) -> None:
    prompt = list(range(4000, 4040))  # 2 full blocks of 16 are cacheable

    def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt is not None else {}
        res = client.completions.create(model="tiny", prompt=prompt, max_tokens=2,
                                        temperature=0, extra_body=extra)
        return res.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0 and cached(None) == 0
    assert cached("tenant-a") == 32 and cached(None) == 32


def test_stream_adds_up_and_reports_usage(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    timing = chunks[-1].model_extra["timing"]  # per-request breakdown, seconds
    assert timing["e2e"] >= timing["ttft"] > 0 and timing["decode"] >= 0
    assert timing["queue"] >= 0 and timing["prefill"] > 0 and timing["transfer"] == 0
    assert whole.model_extra["timing"]["e2e"] > 0
    # vLLM's continuous_usage_stats: every chunk has the usage so far, the count of tokens
    # streamed up to it (n=2: both choices')
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(**kwargs, n=2, stream=True, stream_options=options,
                                            extra_body={"return_token_ids": True}))
    streamed = 0
    for c in chunks[:-1]:
        streamed += sum(len(choice.model_extra["token_ids"]) for choice in c.choices)
        assert c.usage.completion_tokens == streamed, (streamed, c.usage)
        assert c.usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40 == streamed


def test_chat_stream_ends_with_done(http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: ") :])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_chat_n_and_usage(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a story"}],
        n=2,
        max_completion_tokens=8,
        temperature=1.0,
        seed=7,
    )
    assert [c.index for c in res.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in res.choices)
    assert res.usage.completion_tokens == 16
    streamed = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a story"}],
        n=2,
        max_completion_tokens=8,
        temperature=1.0,
        seed=7,
        stream=True,
    )
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in res.choices}


def test_stop_string(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt="A B C", max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert cut.model_extra["stop_reason"] == stop
    # streamed: the last chunk names the stop string too (vLLM's stop_reason), chat as well
    chunks = list(client.completions.create(**kwargs, stop=[stop], stream=True))
    assert [c.choices[0].model_extra["stop_reason"] for c in chunks] == \
        [None] * (len(chunks) - 1) + [stop]
    messages = [{"role": "user", "content": "A B C"}]
    chat_full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                               temperature=0).choices[0].message.content
    chat_stop = chat_full[len(chat_full) // 2: len(chat_full) // 2 + 2]
    chat = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                               temperature=0, stop=[chat_stop], stream=True))
    assert chat[-1].choices[0].finish_reason == "stop"
    assert chat[-1].choices[0].model_extra["stop_reason"] == chat_stop


def test_seed_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt="Random words:", max_tokens=12, temperature=1.0)
    a = client.completions.create(**kwargs, seed=123).choices[0].text
    b = client.completions.create(**kwargs, seed=123).choices[0].text
    c = client.completions.create(**kwargs, seed=124).choices[0].text
    assert a == b != c


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    res = client.completions.create(
        model="tiny", prompt="x y", max_tokens=4, temperature=0, logprobs=3
    )
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == res.choices[0].text
    assert lp.text_offset[0] == 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) >= 3 and top[token] == pytest.approx(value)
        assert value == pytest.approx(max(top.values()))  # greedy picks the best


def test_tokens_named_by_id(client: openai.OpenAI, tiny_model_dir) -> None:
    """vLLM's return_tokens_as_token_ids: logprobs name each token ``token_id:<id>``."""
    prompt = list(range(800, 812))
    want = LLM(str(tiny_model_dir), num_kv_blocks=64).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    res = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                    logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    lp = res.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in want.token_ids]
    assert all(all(k.startswith("token_id:") for k in top) for top in lp.top_logprobs)
    assert lp.text_offset[-1] < len(res.choices[0].text)  # offsets still index the text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    for entry in chat.choices[0].logprobs.content:
        assert entry.token.startswith("token_id:") and entry.bytes == list(entry.token.encode())


def _sse_chunks(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        data = [ln.removeprefix("data: ") for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_return_token_ids(http: httpx.Client, tiny_model_dir) -> None:
    """vLLM's return_token_ids: the prompt's ids and each choice's generated ids beside the
    text, whole and streamed (prompt ids once: chat's in the first chunk, a completion's in
    each choice's first), checked against the engine and the model's own chat template."""
    from transformers import AutoTokenizer

    llm = LLM(str(tiny_model_dir), num_kv_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompt = list(range(800, 812))
    want = list(llm.generate([prompt], greedy)[0].outputs[0].token_ids)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "n": 2, "return_token_ids": True}
    for choice in http.post("/v1/completions", json=body).json()["choices"]:
        assert choice["prompt_token_ids"] == prompt and choice["token_ids"] == want
    ids: dict[int, list[int]] = {0: [], 1: []}
    prompt_ids: dict[int, list] = {0: [], 1: []}
    for chunk in _sse_chunks(http, "/v1/completions", body):
        for c in chunk["choices"]:
            if not ids[c["index"]]:
                assert c["prompt_token_ids"] == prompt  # the choice's first chunk
            prompt_ids[c["index"]].append(c.get("prompt_token_ids"))
            ids[c["index"]] += c["token_ids"]
    assert ids == {0: want, 1: want}
    assert all(sum(p is not None for p in v) == 1 for v in prompt_ids.values())

    messages = [{"role": "user", "content": "hi there"}]
    chat_prompt = list(AutoTokenizer.from_pretrained(str(tiny_model_dir)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    chat_want = list(llm.generate([chat_prompt], greedy)[0].outputs[0].token_ids)
    chat = {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    res = http.post("/v1/chat/completions", json=chat).json()
    assert res["prompt_token_ids"] == chat_prompt
    assert res["choices"][0]["token_ids"] == chat_want
    chunks = _sse_chunks(http, "/v1/chat/completions", chat)
    assert chunks[0]["prompt_token_ids"] == chat_prompt
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]] == chat_want
    # not asked: no ids
    plain = http.post("/v1/chat/completions", json={**chat, "return_token_ids": False}).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]


def test_mistral_parser_keeps_special_tokens(tiny_model_dir) -> None:
    """--tool-call-parser mistral: its [TOOL_CALLS] marker is a special token, so a chat with
    tools decodes with special tokens kept (as vLLM adjusts such requests); without tools
    they are skipped as usual. A bias makes the tiny model say a special token."""
    from tests.utils import tiny_server

    with tiny_server(tiny_model_dir, grpc_port=None, tool_call_parser="mistral") as srv:
        marker = srv.backend.tokenizer.decode([1], skip_special_tokens=False)
        assert marker and srv.backend.tokenizer.decode([1]) == ""  # a special token
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "temperature": 0, "logit_bias": {"1": 100}}
        tools = [{"type": "function", "function": {"name": "f",
                                                   "parameters": {"type": "object"}}}]
        url = srv.http_url + "/v1/chat/completions"
        with_tools = httpx.post(url, json={**body, "tools": tools}, timeout=60).json()
        plain = httpx.post(url, json=body, timeout=60).json()
    assert marker in with_tools["choices"][0]["message"]["content"]
    assert marker not in (plain["choices"][0]["message"]["content"] or "")


def test_chat_echo(http: httpx.Client) -> None:
    """vLLM's chat echo: the last message's text leads the answer when the answer continues
    its turn (an assistant message being continued), whole and streamed; after a user
    message the answer is unchanged."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    body = {"model": "tiny", "messages": turns, "max_tokens": 4, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    echoed = http.post("/v1/chat/completions", json={**body, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == "Once upon" + plain["content"]
    assert echoed["usage"]["completion_tokens"] == 4  # the echo is not generated
    chunks = _sse_chunks(http, "/v1/chat/completions", {**body, "echo": True})
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert deltas[0].startswith("Once upon") and "".join(deltas) == "Once upon" + plain["content"]
    after_user = {**body, "messages": turns[:1], "add_generation_prompt": True,
                  "continue_final_message": False}
    want = http.post("/v1/chat/completions", json=after_user).json()["choices"][0]["message"]
    got = http.post("/v1/chat/completions", json={**after_user, "echo": True}).json()
    assert got["choices"][0]["message"]["content"] == want["content"]


def test_response_format_structural_tag(http: httpx.Client) -> None:
    """vLLM's and SGLang's response_format structural_tag: a tag format is enforced (begin,
    JSON under the schema, end); the older structures / triggers form is taken; a format
    xgrammar does not know is a 400 naming response_format."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    fmt = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<r>", "end": "</r>",
        "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}}}
    body = {**CHAT, "max_tokens": 40, "temperature": 0, "response_format": fmt}
    text = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert text.startswith("<r>") and text.endswith("</r>"), text
    assert isinstance(json.loads(text[3:-4])["n"], int)
    legacy = {"type": "structural_tag", "triggers": ["<f"],
              "structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}]}
    ok = http.post("/v1/chat/completions", json={**body, "response_format": legacy})
    assert ok.status_code == 200, ok.text
    bad = http.post("/v1/chat/completions", json={**body, "response_format": {
        "type": "structural_tag", "format": {"type": "nonsense"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = res.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())


def _prompt_values(llm: LLM, prompt: list[int], k: int) -> list[dict[int, float]]:
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k))
    return [{t: lp.logprob for t, lp in step.items()} for step in out[0].prompt_logprobs[1:]]


def test_prompt_logprobs_in_completions_and_chat(http: httpx.Client, tiny_model_dir) -> None:
    """vLLM's shape: per prompt token null (the first) or token id -> logprob, rank, decoded
    token; the values are the engine's; in each choice (completions) or at the top (chat)."""
    prompt = list(range(500, 530))
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64)
    want = _prompt_values(llm, prompt, 2)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2,
                                           "temperature": 0, "prompt_logprobs": 2, "n": 2})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:  # each of n carries the prompt's
        pl = choice["prompt_logprobs"]
        assert len(pl) == len(prompt) and pl[0] is None
        for p, (step, ref) in enumerate(zip(pl[1:], want, strict=True)):
            assert str(prompt[p + 1]) in step
            assert {int(t) for t in step} == set(ref)
            for t, entry in step.items():
                assert entry["logprob"] == pytest.approx(ref[int(t)], abs=1e-4)
                assert entry["decoded_token"] is not None and entry["rank"] >= 1
    r = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 1,
        "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    pl = r.json()["prompt_logprobs"]
    ids = http.post("/tokenize", json={"model": "tiny", "messages": [
        {"role": "user", "content": "hi there"}]}).json()["tokens"]
    assert len(pl) == len(ids) and pl[0] is None
    assert [int(next(iter(step))) for step in pl[1:]] == ids[1:]
    plain = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                               "max_tokens": 2, "temperature": 0}).json()
    assert "prompt_logprobs" not in plain["choices"][0]


def test_truncate_prompt_tokens_and_bad_words(client: openai.OpenAI, tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64)
    long = [700 + i % 300 for i in range(MAX_MODEL_LEN + 200)]  # over the context
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=long, max_tokens=3, temperature=0)
    res = client.completions.create(model="tiny", prompt=long, max_tokens=3, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 50})
    assert res.usage.prompt_tokens == 50
    want = llm.generate([long[-50:]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert res.choices[0].text == want.outputs[0].text
    free = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8,
                                     temperature=0)
    word = free.choices[0].text.split()[0]
    banned = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8,
                                       temperature=0, extra_body={"bad_words": [word]})
    ref = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8,
                                                            bad_words=[word]))[0]
    assert banned.choices[0].text == ref.outputs[0].text != free.choices[0].text


def test_continue_final_message_and_template_kwargs(
    client: openai.OpenAI, http: httpx.Client, tiny_model_dir
) -> None:
    msgs = [{"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "My favourite color is"}]
    body = {"model": "tiny", "messages": msgs, "add_generation_prompt": False,
            "continue_final_message": True}
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64)
    tok = llm.engine.tokenizer
    assert tok.decode(r.json()["tokens"], skip_special_tokens=False).endswith(
        "My favourite color is")
    res = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True,
                    "chat_template_kwargs": {"enable_thinking": False}})
    want = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=6), add_generation_prompt=False,
                    continue_final_message=True)[0].outputs[0].text
    assert res.choices[0].message.content == want


@pytest.mark.parametrize("stream", [False, True])
def test_echo_scores_a_text_as_evaluation_harnesses_do(
    client: openai.OpenAI, tiny_model_dir, stream: bool
) -> None:
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0 or 1. The
    prompt comes back as the text's start, its tokens' logprobs first (the first null)."""
    prompt = list(range(600, 620))
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64)
    want = _prompt_values(llm, prompt, 1)
    text = llm.engine.tokenizer.decode(prompt, skip_special_tokens=False)
    for max_tokens in (0, 1):
        kwargs: dict[str, Any] = dict(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                      temperature=0, logprobs=1, echo=True)
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            got_text = "".join(c.choices[0].text for c in chunks if c.choices)
            lps = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
            tokens = [t for lp in lps for t in lp.tokens]
            values = [v for lp in lps for v in lp.token_logprobs]
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            res = client.completions.create(**kwargs)
            got_text, lp = res.choices[0].text, res.choices[0].logprobs
            tokens, values, reason = lp.tokens, lp.token_logprobs, res.choices[0].finish_reason
            assert res.usage.completion_tokens == max_tokens
            assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert got_text.startswith(text)
        assert len(tokens) == len(prompt) + max_tokens == len(values)
        assert values[0] is None
        assert values[1:len(prompt)] == pytest.approx(
            [step[t] for step, t in zip(want, prompt[1:], strict=True)], abs=1e-4)
        if max_tokens == 0:
            assert got_text == text and reason == "length"
        else:
            gen = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
            assert got_text == text + gen.outputs[0].text
    # echo without logprobs: the text alone, the prompt as the client gave it
    res = client.completions.create(model="tiny", prompt="Once upon", max_tokens=2,
                                    temperature=0, echo=True)
    assert res.choices[0].text.startswith("Once upon")
    assert res.choices[0].logprobs is None


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_logprobs_of_tokens_a_constraint_rules_out_are_json(
    http: httpx.Client, path: str
) -> None:
    """Under a constraint most of the vocabulary has logprob -inf, which JSON cannot carry
    (schemathesis found the 500 this was): such tokens come back at the floor, -9999.0."""
    body: dict = {"model": "tiny", "max_tokens": 3, "temperature": 0,
                  "response_format": {"type": "json_object"}}
    if path == "/v1/completions":
        body.update(prompt="x", logprobs=9)
    else:
        body.update(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=9)
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if path == "/v1/completions":
        values = [v for top in choice["logprobs"]["top_logprobs"] for v in top.values()]
    else:
        values = [t["logprob"] for e in choice["logprobs"]["content"] for t in e["top_logprobs"]]
    assert len(values) >= 9  # nine alternatives at least for the first token
    assert -9999.0 in values  # the constraint ruled some of them out ...
    assert all(-9999.0 <= v <= 0.0 for v in values)  # ... and none is -inf or NaN


def test_tokenize_detokenize(http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 3 and chat["max_model_len"] == MAX_MODEL_LEN
    # vLLM's return_token_strs: the vocabulary's strings, byte-level marks and all
    strs = http.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert strs["tokens"] == ids and strs["token_strs"] == ["hello", "\u0120world"]
    assert "token_strs" not in http.post("/tokenize", json={"prompt": "hi"}).json()


GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
BAD_CASES = [
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    # text the tokenizer drops whole (schemathesis found a 500: an empty prompt hit the engine)
    ("/v1/completions", {**GOOD, "prompt": ["\u0016"]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "\u0016"}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    # an integer is not a boolean (schemathesis found /tokenize taking 1 for true)
    ("/tokenize", {"prompt": "hi", "add_generation_prompt": 1}, 400, "add_generation_prompt"),
    ("/v1/completions", {**GOOD, "stream": 0}, 400, "stream"),
    # nor a boolean or a string a number (schemathesis found logprobs: false taken as 0)
    ("/v1/completions", {**GOOD, "logprobs": False}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": "2"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": True}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "seed": False}, 400, "seed"),
    ("/v1/completions", {**GOOD, "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD, "n": 17}, 400, "n"),  # above the server's max_n (16)
    ("/v1/completions", {**GOOD, "logprobs": 30}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -2.1}, 400, "frequency_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {**GOOD, "logit_bias": {"10": 100.5}}, 400, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"-3": 1}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"10": "x"}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "stop": ["", "x"]}, 400, "stop"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [10] * MAX_MODEL_LEN}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [10, 10**9]}, 400, "prompt_token_ids"),
    ("/v1/completions", {**GOOD, "prompt": [10] * 8, "max_tokens": MAX_MODEL_LEN}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [IMAGE]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": None}]},
        400,
        "messages[0].content",
    ),
    ("/detokenize", {"tokens": [-5]}, 400, "tokens"),
    ("/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [[1, "a"]]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "stop": 5}, 400, "stop"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages.0.content",
    ),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_schema"}},
        400,
        "response_format.json_schema",
    ),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400,
     "response_format.type"),
    ("/v1/completions", {**GOOD, "structured_outputs": {"regex": "(a"}}, 400,
     "structured_outputs.regex"),
    # fields of OpenAI's / vLLM's the engine does not implement: a 400 naming them, not a
    # 200 that ignored them (they were ignored as unknown fields before)
    ("/v1/completions", {**GOOD, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {**GOOD, "use_beam_search": True}, 400, "use_beam_search"),
    ("/v1/completions", {**GOOD, "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/chat/completions", {**CHAT, "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ("/v1/completions", {**GOOD, "allowed_token_ids": [1, -2]}, 400, "allowed_token_ids"),
    ("/v1/completions", {**GOOD, "allowed_token_ids": [1, 10**9]}, 400, "allowed_token_ids"),
    ("/v1/completions", {**GOOD, "bad_words": [""]}, 400, "bad_words"),
    ("/v1/completions", {**GOOD, "cache_salt": ""}, 400, "cache_salt"),
    ("/v1/completions", {**GOOD, "priority": 1}, 400, "priority"),
    ("/v1/chat/completions", {**CHAT, "bad_words": "x"}, 400, "bad_words"),
    ("/v1/completions", {**GOOD, "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ("/v1/completions", {**GOOD, "truncate_prompt_tokens": MAX_MODEL_LEN + 1}, 400,
     "truncate_prompt_tokens"),
    ("/v1/completions", {**GOOD, "guided_regex": "a+"}, 400, "guided_regex"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tools": []}}, 400,
     "chat_template_kwargs.tools"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": "x"}, 400, "chat_template_kwargs"),
    ("/v1/chat/completions", {**CHAT, "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/v1/chat/completions", {**CHAT, "chat_template": "{{ messages }}"}, 400, "chat_template"),
    ("/tokenize", {"messages": CHAT["messages"], "chat_template_kwargs": {"messages": 1}}, 400,
     "chat_template_kwargs.messages"),
    ("/v1/chat/completions", {**CHAT, "guided_json": {"type": "object"}}, 400, "guided_json"),
    ("/v1/completions", {**GOOD, "guided_choice": ["a", "b"]}, 400, "guided_choice"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_CASES)
def test_bad_input_names_the_field(http: httpx.Client, path, body, status, param) -> None:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_penalties_and_logit_bias_reach_the_engine(
    server: BackgroundServer, http: httpx.Client
) -> None:
    """OpenAI's penalties and bias and vLLM's repetition_penalty are applied, not refused: a
    bias of 100 makes one token every token, and the penalties pushed against a smaller bias
    change the output (the engine-level tests check the values against a reference)."""
    force = {**GOOD, "prompt": [10, 11, 12], "max_tokens": 6, "temperature": 0,
             "ignore_eos": True}
    r = http.post("/v1/completions", json={**force, "logit_bias": {"1234": 100}})
    assert r.status_code == 200, r.text
    forced = server.backend.tokenizer.decode([1234] * 6)
    assert r.json()["choices"][0]["text"] == forced
    chat = http.post("/v1/chat/completions", json={
        **CHAT, "max_tokens": 4, "temperature": 0.7, "seed": 1, "logit_bias": {"1234": 100}})
    assert chat.json()["choices"][0]["message"]["content"] == server.backend.tokenizer.decode(
        [1234] * 4)
    bodies = [
        {**force, "logit_bias": {"1234": 20}},
        {**force, "logit_bias": {"1234": 20}, "frequency_penalty": 2.0},
        {**force, "logit_bias": {"1234": 20}, "presence_penalty": 2.0, "repetition_penalty": 1.5},
    ]
    allowed = http.post("/v1/completions", json={
        **force, "temperature": 1.0, "seed": 4, "allowed_token_ids": [300, 301, 302]})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["choices"][0]["text"] in {
        server.backend.tokenizer.decode(list(ids)) for ids in itertools.product(
            [300, 301, 302], repeat=6)}
    texts = []
    for body in bodies:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0] != texts[1] and texts[0] != texts[2]


def test_neutral_values_of_unimplemented_fields_are_accepted(http: httpx.Client) -> None:
    """What client libraries fill in for those fields (their defaults) still works."""
    neutral = {"logit_bias": {}, "best_of": 1, "repetition_penalty": 1.0,
               "use_beam_search": False, "length_penalty": 1.0, "prompt_logprobs": None,
               "allowed_token_ids": None, "bad_words": [], "truncate_prompt_tokens": None,
               "guided_regex": None}
    r = http.post("/v1/completions", json={**GOOD, **neutral, "logit_bias": {"10": 0}})
    assert r.status_code == 200, r.text
    assert http.post("/v1/chat/completions", json={**CHAT, **neutral}).status_code == 200


LONE_SURROGATE_CASES = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "stream": true, "max_tokens": 2,'
                        b' "stop": ["x", "\\udfff"]}', "stop.1"),
    ("/v1/chat/completions", b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user",'
                             b' "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', "model"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "logit_bias": {"\\ud800": 1}}',
     "logit_bias"),
    ("/tokenize", b'{"prompt": "\\udc00"}', "prompt"),
]


@pytest.mark.parametrize(("path", "raw", "param"), LONE_SURROGATE_CASES)
def test_lone_surrogates_are_a_400_naming_the_field(http: httpx.Client, path, raw, param) -> None:
    """``"\\ud800"`` is valid JSON but not text: the tokenizer failed on it with a 500 and a
    streamed answer reset its connection; now the body is refused before any work."""
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]
    # a pair (an emoji escaped as JSON does) is text and goes through
    ok = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\\ud83d\\ude00 hi",'
                   b' "max_tokens": 2}', headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_tokenizing_runs_off_the_loop_and_the_engine_thread(
    server: BackgroundServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Megabytes of prompt take the tokenizer or the chat template seconds (4 s here for
    7 MB): on the server's loop they held every other stream that long, on the engine thread
    every step. Each call is now made on a worker thread: the mechanism is asserted, not a
    time."""
    seen = record_tokenizer_threads(monkeypatch, server.backend.tokenizer)
    from splitserve.roles.engine import structured

    checked = structured.check_structured  # a large schema's check takes seconds too
    seen["check_structured"] = set()

    def check(*a: Any, **k: Any) -> Any:
        seen["check_structured"].add(threading.current_thread().name)
        return checked(*a, **k)

    monkeypatch.setattr(structured, "check_structured", check)
    chat = [{"role": "user", "content": "hi"}]
    assert http.post("/v1/completions", json={**GOOD, "prompt": "hello there"}).status_code == 200
    assert http.post("/v1/completions", json={
        **GOOD, "structured_outputs": {"regex": "[ab]+"}}).status_code == 200
    assert http.post("/v1/chat/completions", json={
        **CHAT, "response_format": {"type": "json_object"}}).status_code == 200
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert http.post("/tokenize", json={"prompt": "hello"}).status_code == 200
    assert http.post("/tokenize", json={"messages": chat}).status_code == 200
    assert http.post("/detokenize", json={"tokens": [10, 11]}).status_code == 200
    assert seen["encode"] and seen["apply_chat_template"] and seen["decode"]
    on_loop = {server._thread.name}  # type: ignore[attr-defined]
    assert not (seen["encode"] | seen["apply_chat_template"]) & (on_loop | {"splitserve-engine"})
    # on the preparation pool (offload.py), not the loop's default executor
    assert all(t.startswith(offload.THREAD_PREFIX)
               for t in seen["encode"] | seen["apply_chat_template"])
    assert not seen["decode"] & on_loop  # the engine thread detokenizes outputs, as it should
    assert seen["check_structured"] and not seen["check_structured"] & on_loop
    # the frontend's check runs on the pool; the compile's own check on the grammar thread
    assert any(t.startswith(offload.THREAD_PREFIX) for t in seen["check_structured"])


def test_a_text_prompt_is_tokenized_once(
    server: BackgroundServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The context check tokenizes a text prompt (max_tokens set) and the backend gets those
    ids: before, the backend tokenized the same text again (seconds for megabytes). Same
    tokens out as the ids sent directly, and the same prompt length counted."""
    tok = server.backend.tokenizer
    text = "the quick brown fox " * 50
    ids = tok.encode(text)
    calls: list[str] = []
    inner = tok.encode

    def encode(prompt: Any, *a: Any, **k: Any) -> Any:
        if prompt == text:
            calls.append(threading.current_thread().name)
        return inner(prompt, *a, **k)

    monkeypatch.setattr(tok, "encode", encode)
    body = {**GOOD, "max_tokens": 6, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "prompt": text})
    assert r.status_code == 200, r.text
    assert len(calls) == 1, calls
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    direct = http.post("/v1/completions", json={**body, "prompt": ids})
    assert direct.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    assert len(calls) == 1


def test_bad_bodies_are_4xx_and_server_keeps_serving(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    cases = [
        b'{"model": "tiny", "prompt": ',  # not JSON
        b'{"model": "tiny", "prompt": "\xff\xfe"}',  # not UTF-8
        b"[]",
        b'{"model": "tiny", "prompt": "' + b"a" * (10 << 20) + b'"}',  # 10 MB
    ]
    for raw in cases:
        r = http.post("/v1/completions", content=raw, headers=headers)
        assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text[:200])
        assert "error" in r.json()
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_streaming_bad_input_is_a_plain_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[10] * MAX_MODEL_LEN, stream=True)
    assert e.value.body["param"] == "prompt"


def test_api_key(server: BackgroundServer) -> None:
    for header in ("Bearer wrong", None, KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"):
        headers = {"Authorization": header} if header else {}
        for path in ("/v1/completions", "/tokenize", "/v1/nowhere"):
            r = httpx.post(server.http_url + path, json=GOOD, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == 'Bearer realm="splitserve"'
    bad = openai.OpenAI(base_url=server.http_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # The scheme is case-insensitive (RFC 9110 11.1); the token is not.
    for scheme in ("bearer", "BEARER", "BeArEr"):
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert httpx.get(server.http_url + "/v1/models", headers=headers).status_code == 200
    headers = {"Authorization": f"Bearer {KEY.upper()}"}
    assert httpx.get(server.http_url + "/v1/models", headers=headers).status_code == 401
    # Exactly these stay open (docs/serving.md lists them).
    for path in ("/health", "/version", "/metrics", "/openapi.json", "/docs", "/redoc"):
        assert httpx.get(server.http_url + path).status_code == 200, path


def test_stream_disconnect_aborts_and_frees_kv(
    server: BackgroundServer, http: httpx.Client
) -> None:
    assert _wait_idle(server)
    body = {
        **GOOD,
        "prompt": list(range(1000, 1100)),
        "max_tokens": 800,
        "ignore_eos": True,
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert not _engine_idle(server)
    assert _wait_idle(server), server.backend.engine.stats()  # type: ignore[attr-defined]


def _in_flight(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("splitserve:requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no splitserve:requests_in_flight in /metrics")


def _raw_post(server: BackgroundServer, body: dict, read_until: bytes | None) -> None:
    """POST on a bare socket and hang up: before any answer (None) or once ``read_until``."""
    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + data)
        got = b""
        while read_until is not None and read_until not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk


def test_disconnects_free_their_admission_slot_without_gc(
    server: BackgroundServer, http: httpx.Client
) -> None:
    """Every way a client can leave gives its slot back at once, not when the garbage collector
    finds the abandoned stream (the 8 slots of CI's fuzz server stayed taken: every later
    request got 429). The collector is off meanwhile, so only deterministic closing counts."""
    assert _wait_idle(server) and _in_flight(http) == 0
    long = {"model": "tiny", "prompt": list(range(1000, 1100)), "max_tokens": 800,
            "ignore_eos": True}
    gc.disable()
    try:
        for stream, n, read_until in (
            (True, 1, b"data: "),  # mid-stream
            (True, 2, b"data: "),  # mid-stream, two samples merged
            (True, 1, None),  # before the first byte of the answer
            (False, 1, None),  # a whole answer never waited for
            (False, 2, None),
        ):
            _raw_post(server, {**long, "stream": stream, "n": n}, read_until)
            _wait_no_slot_held(server, http, (stream, n, read_until))
        # More prompts than slots (3): the fourth is refused while the first three start; all
        # three must end (a gather that returned at the refusal left them running: CI's fuzz)
        many = {**long, "prompt": [[5, 6, 7, i] for i in range(5)], "max_tokens": 4}
        for stream in (False, True):
            r = http.post("/v1/completions", json={**many, "stream": stream})
            assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded", r.text
            _wait_no_slot_held(server, http, ("five prompts", stream))
    finally:
        gc.enable()


def _wait_no_slot_held(server: BackgroundServer, http: httpx.Client, case: object) -> None:
    deadline = time.monotonic() + 10
    while _in_flight(http) != 0 or not _engine_idle(server):
        assert time.monotonic() < deadline, (case, _in_flight(http))
        time.sleep(0.02)


def test_duplicate_live_request_id_is_409(server: BackgroundServer, http: httpx.Client) -> None:
    assert _wait_idle(server)
    # long enough (4 x 960 tokens) to still run when the second request arrives
    body = {**GOOD, "prompt": list(range(3000, 3050)), "max_tokens": 960, "n": 4,
            "ignore_eos": True, "stream": True}
    mine = {"X-Request-Id": "dup-http"}
    with http.stream("POST", "/v1/completions", json=body, headers=mine) as r:
        assert r.headers["x-request-id"] == "dup-http"  # headers come with the first delta
        again = http.post("/v1/completions", json={**GOOD, "max_tokens": 2}, headers=mine)
        assert again.status_code == 409, again.text
        assert again.json()["error"]["param"] == "x-request-id"
        assert http.post("/v1/completions", json={**GOOD, "max_tokens": 2},
                         headers={"X-Request-Id": "other"}).status_code == 200
    assert _wait_idle(server)
    reused = http.post("/v1/completions", json={**GOOD, "max_tokens": 2}, headers=mine)
    assert reused.status_code == 200 and reused.json()["id"] == "dup-http"
    bad = http.post("/v1/completions", json=GOOD, headers={"X-Request-Id": "x" * 129})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-id"
    # vLLM's request_id in the body names a request the same way; the header wins over it
    with http.stream("POST", "/v1/chat/completions", json={
            **CHAT, "max_tokens": 960, "ignore_eos": True, "stream": True,
            "request_id": "dup-body"}) as r:
        assert r.headers["x-request-id"] == "dup-body"
        again = http.post("/v1/completions", json={**GOOD, "request_id": "dup-body"})
        assert again.status_code == 409 and again.json()["error"]["param"] == "request_id"
    assert _wait_idle(server)
    named = http.post("/v1/completions", json={**GOOD, "request_id": "dup-body"})
    assert named.status_code == 200 and named.json()["id"] == "dup-body"
    both = http.post("/v1/completions", json={**GOOD, "request_id": "b"}, headers={
        "X-Request-Id": "h"})
    assert both.json()["id"] == "h"
    bad = http.post("/v1/completions", json={**GOOD, "request_id": "x" * 129})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"


def test_whole_request_disconnect_aborts(server: BackgroundServer) -> None:
    assert _wait_idle(server)
    body = {**GOOD, "prompt": list(range(2000, 2100)), "max_tokens": 800, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.http_url + "/v1/completions", json=body, headers=headers, timeout=0.3)
    assert _wait_idle(server), server.backend.engine.stats()  # type: ignore[attr-defined]


def test_metrics(http: httpx.Client) -> None:
    http.post("/v1/completions", json=GOOD)
    text = http.get("/metrics").text
    for name in (
        "splitserve:time_to_first_token_seconds_count",
        "splitserve:inter_token_latency_seconds_count",
        "splitserve:e2e_request_latency_seconds_count",
        'splitserve:num_requests_running{role="engine",worker="0"}',
        "splitserve:kv_cache_usage_perc",
        "splitserve:prefix_cache_hits_total",
        "splitserve:prefix_cache_hit_rate",
        "splitserve:generation_tokens_total",
        'splitserve:request_success_total{finished_reason="length",model_name="tiny"}',
        'splitserve:request_queue_time_seconds_count{model_name="tiny"}',
        'splitserve:request_decode_time_seconds_count{model_name="tiny"}',
        'splitserve:kv_transfer_bytes_total{role="engine",worker="0"} 0.0',
        'splitserve:encoder_cache_hits_total{role="engine",worker="0"} 0.0',
        "# TYPE splitserve:router_decisions_total counter",
    ):
        assert name in text, name


def test_batch_of_prompts(client: openai.OpenAI) -> None:
    res = client.completions.create(
        model="tiny", prompt=["one", "two two"], n=2, max_tokens=3, temperature=0
    )
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert res.choices[0].text == res.choices[1].text  # greedy: both samples agree
    single = client.completions.create(model="tiny", prompt="two two", max_tokens=3, temperature=0)
    assert res.choices[2].text == single.choices[0].text
    assert res.usage.completion_tokens == 12


def test_overload_is_429_and_accepted_requests_complete(http: httpx.Client) -> None:
    body = {
        **GOOD,
        "prompt": list(range(3000, 3020)),
        "max_tokens": 150,
        "ignore_eos": True,
        "stream": True,
    }
    with contextlib.ExitStack() as stack:
        streams = [
            stack.enter_context(http.stream("POST", "/v1/completions", json=body)) for _ in range(3)
        ]
        assert all(s.status_code == 200 for s in streams)
        refused = http.post("/v1/completions", json=GOOD)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        for s in streams:
            lines = [ln for ln in s.iter_lines() if ln]
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    assert http.post("/v1/completions", json=GOOD).status_code == 200


_json_scalars = (
    st.none() | st.booleans() | st.integers(-3, 8) | st.floats(allow_nan=True) | st.text(max_size=8)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_FIELDS = [
    "model",
    "prompt",
    "messages",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "ignore_eos",
    "min_tokens",
    "echo",
    "prompt_logprobs",
    "bad_words",
    "truncate_prompt_tokens",
    "chat_template_kwargs",
    "continue_final_message",
    "cache_salt",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "priority",
    "max_completion_tokens",
]
_bodies = st.fixed_dictionaries(
    {"max_tokens": st.integers(-2, 6) | st.text(max_size=3) | st.just(None)},
    optional={name: _json for name in _FIELDS},
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
    body=_bodies | _json,
)
def test_fuzzed_bodies_never_5xx(http: httpx.Client, path: str, body: object) -> None:
    if isinstance(body, dict) and body.get("max_tokens") is None:
        body.pop("max_tokens", None)
        body["max_completion_tokens"] = 4  # keep chat requests short on a CPU
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body, r.text[:300])
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def test_openapi_declares_what_the_server_answers(server: BackgroundServer) -> None:
    """405 carries Allow; validation errors are 400 (never 422) in the document and on the
    wire; protected operations declare Bearer security, open ones do not."""
    r = httpx.request("DELETE", server.http_url + "/v1/completions",
                      headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert httpx.request("TRACE", server.http_url + "/health").headers["allow"] == "GET"
    r = httpx.request("PUT", server.http_url + "/v1/responses/resp_1",  # one route per method
                      headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    doc = httpx.get(server.http_url + "/openapi.json").json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    operation_ids = [op["operationId"] for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids)), sorted(operation_ids)
    assert not [k for k, op in ops.items() if "422" in op["responses"]]
    completions = ops[("/v1/completions", "post")]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(completions)
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert ops[("/v1/completions", "post")]["security"] == [{"bearer": []}]
    assert "security" not in ops[("/health", "get")]
    assert set(ops[("/metrics", "get")]["responses"]["200"]["content"]) == {"text/plain"}
    r = httpx.post(server.http_url + "/v1/completions", json={"prompt": 5},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
