"""Structured outputs and tool calls through ``serve`` (1 prefill + 1 decode worker) on SmolLM2,
with the official ``openai`` client and the gRPC client.

Every JSON-schema output parses and validates; the outputs equal the single engine's (the
constraint travels in SamplingParams; the decode worker rebuilds the matcher from the first
token); a named tool call's arguments validate; streaming equals non-streaming; bad input is a
400 / INVALID_ARGUMENT naming the field, refused before placement (no worker saw it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from splitserve import Cluster, SamplingParams
from splitserve.cluster.frontends.backend import ClusterBackend
from splitserve.cluster.frontends.client import Client, ClientError
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions

pytestmark = [pytest.mark.ray, pytest.mark.ucx]


def _obj(props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False, **extra}


NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SMALL_INT = {"type": "integer", "minimum": -1000, "maximum": 1000}
"""Bounded strings, arrays and integers: a 135M model cannot ramble past ``MAX_TOKENS``."""
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a capital city", _obj({"city": {"type": "string", "enum": ["Paris", "London", "Rome"]}})),
    ("three fruits", _obj({"fruits": {"type": "array", "items": NAME,
                                      "minItems": 1, "maxItems": 3}})),
    ("a nested config", _obj({"a": _obj({"b": _obj({"c": SMALL_INT})})})),
    ("a US zip code", _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("a price", _obj({"price": {"type": "number", "minimum": 0, "maximum": 1000}})),
    ("a task status", _obj({"done": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                   "maxLength": 20}})),
    ("some digits", {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                     "minItems": 2, "maxItems": 4}),
    ("a color and count", _obj({"color": {"enum": ["red", "green", "blue"]},
                                "count": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("a team", _obj({"people": {"type": "array", "minItems": 1, "maxItems": 2,
                                "items": _obj({"name": NAME, "age": {
                                    "type": "integer", "minimum": 0, "maximum": 99}})}})),
    ("a product code", _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}})),
    ("a point", _obj({"x": SMALL_INT, "y": {"type": "number", "minimum": -1000, "maximum": 1000}})),
    ("a job result", _obj({"status": {"const": "done"}, "flags": {
        "type": "array", "items": {"type": "boolean"}, "maxItems": 3}})),
    ("an email address", _obj({"email": {"type": "string",
                                         "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}})),
    ("a 2x2 matrix", _obj({"m": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2,
        "items": {"type": "integer", "minimum": 0, "maximum": 9}}}})),
    ("a book", _obj({"title": {"type": "string", "minLength": 1, "maxLength": 24},
                     "year": {"type": "integer", "minimum": 1900, "maximum": 2030}})),
    ("a pet", _obj({"kind": {"enum": ["cat", "dog"]},
                    "meta": _obj({"legs": {"type": "integer", "enum": [2, 4]}})})),
    ("a number or a word", {"anyOf": [_obj({"n": SMALL_INT}),
                                      _obj({"s": {"type": "string", "maxLength": 10}})]}),
    ("a temperature", _obj({"temp": {"type": "number", "exclusiveMinimum": -50,
                                     "exclusiveMaximum": 60}, "unit": {"enum": ["C", "F"]}})),
    ("a line segment", {"$defs": {"pt": _obj({"x": SMALL_INT, "y": SMALL_INT})},
                        **_obj({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}})}),
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": _obj({"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}})}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": _obj({"zone": NAME})}}
MAX_TOKENS = 96


def _messages(what: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply with JSON describing {what}."}]


@pytest.fixture(scope="module")
def server():
    with Cluster.local(prefill=1, decode=1, kv_cache_memory_bytes=256 << 20,
                       router={"local_prefill_max_tokens": 0}) as cluster, \
            BackgroundServer(ClusterBackend(cluster),
                             ServeOptions(port=0, grpc_port=0, tool_call_parser="hermes")) as srv:
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="none", max_retries=0)
        yield cluster, srv, client, client.models.list().data[0].id


def _schema_chat(client: openai.OpenAI, model: str, what: str, schema: dict[str, Any],
                 stream: bool) -> tuple[str, str | None]:
    """(text, finish_reason) of one chat under ``schema``, whole or streamed (deltas joined)."""
    res = client.chat.completions.create(
        model=model, messages=_messages(what), temperature=0, max_tokens=MAX_TOKENS,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        stream=stream,
    )
    if not stream:
        return res.choices[0].message.content or "", res.choices[0].finish_reason
    chunks = [c for c in res if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    return text, chunks[-1].choices[0].finish_reason


def _check_schemas(server: Any, smollm: Any, picks: list[tuple[str, dict[str, Any]]]) -> None:
    """Each schema asked once whole and once streamed, all at once (one continuous batch on
    the workers): every output parses, validates and stops; streamed equals whole; both equal
    the single engine under the same constraint."""
    cluster, _, client, model = server
    jobs = [(w, s, stream) for w, s in picks for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _schema_chat(client, model, *job), jobs))
    whole = {w: r for (w, _, stream), r in zip(jobs, results, strict=True) if not stream}
    streamed = {w: r for (w, _, stream), r in zip(jobs, results, strict=True) if stream}
    for what, schema in picks:
        text, finish = whole[what]
        assert finish == "stop", (what, text)
        jsonschema.validate(json.loads(text), schema)
        assert streamed[what] == whole[what], what
    want = smollm.chat(
        [_messages(w) for w, _ in picks],
        [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs={"json": s})
         for _, s in picks],
    )
    assert [whole[w][0] for w, _ in picks] == [o.outputs[0].text for o in want]
    _assert_clean(cluster)


REDUCED = ["a team", "a color and count", "a product code", "a temperature"]
"""Nested objects in an array, enums, a pattern, bounded numbers: the default suite's share."""


def test_some_schemas_validate_stream_equal_and_equal_the_single_engine(server, smollm) -> None:
    _check_schemas(server, smollm, [(w, s) for w, s in SCHEMAS if w in REDUCED])


@pytest.mark.slow
def test_twenty_schemas_validate_stream_equal_and_equal_the_single_engine(server, smollm) -> None:
    _check_schemas(server, smollm, SCHEMAS)


def test_named_tool_call_validates_and_streams_equal(server) -> None:
    _, _, client, model = server
    kwargs: dict[str, Any] = {
        "model": model, "temperature": 0, "max_tokens": 64, "tools": [WEATHER, TIME],
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    res = client.chat.completions.create(**kwargs)
    message = res.choices[0].message
    assert res.choices[0].finish_reason == "stop"
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [
        (call.function.name, call.function.arguments)]
    assert not "".join(d.content or "" for d in deltas)  # no call text leaked as content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_required_tool_choice_returns_calls_of_the_tools(server) -> None:
    _, _, client, model = server
    res = client.chat.completions.create(
        model=model, temperature=0, max_tokens=80, tools=[WEATHER, TIME],
        tool_choice="required", parallel_tool_calls=False,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
    )
    assert res.choices[0].finish_reason == "tool_calls"
    (call,) = res.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_responses_api_through_the_cluster(server) -> None:
    """The Responses API over the 1P+1D cluster: a json_schema answer and a named function
    call equal chat's for the same conversation, whole and streamed."""
    _, _, client, model = server
    what, schema = SCHEMAS[0]
    chat_text, _ = _schema_chat(client, model, what, schema, stream=False)
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    res = client.responses.create(model=model, input=_messages(what)[0]["content"],
                                  temperature=0, max_output_tokens=MAX_TOKENS, text=fmt)
    assert res.status == "completed" and res.output_text == chat_text
    jsonschema.validate(json.loads(res.output_text), schema)
    with client.responses.stream(model=model, input=_messages(what)[0]["content"],
                                 temperature=0, max_output_tokens=MAX_TOKENS, text=fmt) as st:
        assert st.get_final_response().output_text == chat_text
    ask = "What is the weather in Paris?"
    chat = client.chat.completions.create(
        model=model, temperature=0, max_tokens=64, tools=[WEATHER, TIME],
        messages=[{"role": "user", "content": ask}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    flat = [{"type": "function", **t["function"]} for t in (WEATHER, TIME)]
    res = client.responses.create(model=model, input=ask, temperature=0, max_output_tokens=64,
                                  tools=flat, tool_choice={"type": "function",
                                                           "name": "get_weather"})
    (call,) = [item for item in res.output if item.type == "function_call"]
    assert (call.name, call.arguments) == (chat.choices[0].message.tool_calls[0].function.name,
                                           chat.choices[0].message.tool_calls[0].function.arguments)


def test_streaming_equals_non_streaming_and_other_constraints(server) -> None:
    _, _, client, model = server
    extra = {"structured_outputs": {"regex": "[A-Z][a-z]{2,9} (is|was) [a-z]{2,9}\\."}}
    kw: dict[str, Any] = {"model": model, "temperature": 0.8, "seed": 5, "max_tokens": 32,
                          "messages": _messages("a city"), "extra_body": extra}
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(**kw, stream=True) if c.choices)
    assert whole == streamed
    assert json.dumps(whole) and whole.endswith(".")
    choice = client.completions.create(
        model=model, prompt="The best pet is a", max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"choice": ["cat", "dog", "parrot"]}})
    assert choice.choices[0].text in ("cat", "dog", "parrot")


BAD_BODIES = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "not": {"const": "a"}}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= undefined"}}},
     "structured_outputs.grammar"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"response_format": {"type": "json_object"},
      "extra_body": {"structured_outputs": {"choice": ["a"]}}}, "response_format"),
]


GRPC_BAD = [
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"json": '{"type": "nope"}'}, "structured_outputs.json"),
    ({"json": {"type": "array", "uniqueItems": True}}, "structured_outputs.json"),  # unenforced
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"grammar": "root ::= undefined"}, "structured_outputs.grammar"),
    ({}, "structured_outputs"),  # no constraint set
    ({"structural_tag": {"format": {"type": "nonsense"}}}, "structured_outputs.structural_tag"),
    ({"structural_tag": "{not json"}, "structured_outputs.structural_tag"),
]


def test_bad_input_is_400_naming_the_field_before_placement(server) -> None:
    cluster, srv, client, model = server
    before = _requests_seen(cluster)
    for body, field in BAD_BODIES:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=_messages("x"), max_tokens=4,
                                           **body)
        assert e.value.status_code == 400
        assert e.value.body["param"] == field, (field, e.value.body)
    with Client(srv.grpc_target) as grpc_client:
        for so, field in GRPC_BAD:
            with pytest.raises(ClientError) as g:
                grpc_client.generate("x", max_tokens=4, structured_outputs=so)
            assert g.value.code.name == "INVALID_ARGUMENT", so
            assert field in str(g.value), (so, str(g.value))
        assert _requests_seen(cluster) == before  # none of the bad requests reached a worker
        ok = grpc_client.generate("Is water wet?", max_tokens=4, temperature=0,
                                  structured_outputs={"choice": ["yes", "no"]})
        assert ok.text in ("yes", "no")
        # an xgrammar structural tag (JSON text on the wire): begin, JSON under the schema, end
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                         "maximum": 9}},
                  "required": ["n"], "additionalProperties": False}
        tag = grpc_client.generate("Give a number.", max_tokens=48, temperature=0,
                                   structured_outputs={"structural_tag": {
                                       "type": "structural_tag", "format": {
                                           "type": "tag", "begin": "<r>", "end": "</r>",
                                           "content": {"type": "json_schema",
                                                       "json_schema": schema,
                                                       "max_whitespace_cnt": 1}}}})
        assert tag.text.startswith("<r>") and tag.text.endswith("</r>"), tag.text
        assert isinstance(json.loads(tag.text[3:-4])["n"], int)
    assert _requests_seen(cluster) > before  # the good one did (the counter can see it)
    _assert_clean(cluster)


def test_grammar_compile_timeout_is_refused_before_placement(server, monkeypatch) -> None:
    """A compile that outlives SPLITSERVE_GRAMMAR_COMPILE_TIMEOUT_S (0 here: every new grammar)
    is refused by the cluster before placement: a 400 naming the field the client set, or
    INVALID_ARGUMENT; no worker saw the requests."""
    cluster, srv, client, model = server
    monkeypatch.setenv("SPLITSERVE_GRAMMAR_COMPILE_TIMEOUT_S", "0")  # read per compile
    before = _requests_seen(cluster)
    fresh = _obj({"timeout_probe": {"type": "string", "pattern": "^[a-z]{1,7}$"}})
    with pytest.raises(openai.BadRequestError) as e:
        _schema_chat(client, model, "a probe", fresh, stream=False)
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "did not compile within" in e.value.body["message"]
    probe_tool = {"type": "function", "function": {"name": "probe", "parameters": _obj(
        {"timeout_probe_2": {"type": "integer", "minimum": 3}})}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=_messages("x"), max_tokens=4, tools=[probe_tool],
            tool_choice={"type": "function", "function": {"name": "probe"}})
    assert e.value.body["param"] == "tool_choice"
    with Client(srv.grpc_target) as grpc_client, pytest.raises(ClientError) as g:
        grpc_client.generate("x", max_tokens=4, structured_outputs={"regex": "[a-q]{2,5}z"})
    assert g.value.code.name == "INVALID_ARGUMENT"
    assert "did not compile within" in str(g.value)
    assert _requests_seen(cluster) == before
    _assert_clean(cluster)


def _requests_seen(cluster: Cluster) -> int:
    """Constrained requests that reached a prefill worker (each compiles or hits its cache)."""
    return sum(w.get("grammar_compiles", 0) + w.get("grammar_cache_hits", 0)
               for w in cluster.status()["workers"] if w["role"] == "prefill")


def _assert_clean(cluster: Cluster) -> None:
    for w in cluster.status()["workers"]:
        if not w["healthy"]:
            continue
        assert w.get("num_grammar_matchers", 0) == 0, w
        assert w["kv_usage"] == 0.0, w


NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 99},
           "minItems": 24, "maxItems": 24}
"""Long enough (about 70 tokens) to outlive the kill, and it always terminates."""


@pytest.mark.slow  # a SIGKILL, a replacement worker and three reference runs: ~1 min quiet
def test_decode_worker_sigkilled_mid_stream_replays_under_the_constraint(server, smollm) -> None:
    """Runs last (it kills the module's decode worker). A greedy and a seeded constrained
    stream: the prefill worker samples the first token under the grammar (one masked row per
    request there, and that token is not the free model's first token); the decode worker is
    SIGKILLed mid-stream; both streams are replayed on its replacement, which rebuilds each
    matcher from the request and the tokens so far; the outputs equal the single engine's."""
    cluster, _, _, _ = server
    prompt = "Tell me about the history of Rome."
    so = {"json": NUMBERS}
    params = [SamplingParams(temperature=0.0, max_tokens=100, structured_outputs=so),
              SamplingParams(temperature=0.8, seed=7, max_tokens=100, structured_outputs=so)]
    single = [o.outputs[0] for o in smollm.generate([prompt] * 2, params)]
    want = [o.token_ids for o in single]
    free_first = smollm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))[0]
    assert free_first.outputs[0].token_ids[0] != want[0][0]  # the grammar decides the first
    prefill = next(h for h in cluster.workers.values() if h.role == "prefill" and h.healthy)
    decode = next(h for h in cluster.workers.values() if h.role == "decode" and h.healthy)
    masked_on_prefill = _worker_stats(cluster, prefill.worker_id)["grammar_masked_rows"]
    replays = cluster.counters["replays"]
    got, firsts = asyncio.run(_stream_and_kill(cluster, prompt, params, decode))
    assert got == want
    assert firsts == [w[:1] for w in want]  # the first delta: the prefill worker's token
    assert _worker_stats(cluster, prefill.worker_id)["grammar_masked_rows"] == \
        masked_on_prefill + len(params)
    assert cluster.counters["replays"] == replays + len(params)
    new = [h for h in cluster.workers.values() if h.role == "decode" and h.healthy]
    assert [h.worker_id for h in new] != [decode.worker_id]
    stats = _worker_stats(cluster, new[0].worker_id)
    assert stats["grammar_compiles"] + stats["grammar_cache_hits"] >= len(params)
    assert stats["grammar_masked_rows"] > 0  # the replayed streams ran under the grammar
    for out in single:  # the very tokens the cluster streamed
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), NUMBERS)
    _assert_clean(cluster)


async def _stream_and_kill(cluster: Cluster, prompt: str, params: list[SamplingParams],
                           decode: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Streams every request; SIGKILLs ``decode`` once each has a few decoded tokens."""
    got: list[list[int]] = [[] for _ in params]
    firsts: list[list[int]] = [[] for _ in params]
    ready = [asyncio.Event() for _ in params]

    async def one(i: int) -> None:
        async for delta in cluster.astream(prompt, params[i]):
            if not got[i]:
                firsts[i] = list(delta.outputs[0].token_ids)
            got[i] += delta.outputs[0].token_ids
            if len(got[i]) >= 4:
                ready[i].set()

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(params))]
    await asyncio.gather(*(e.wait() for e in ready))
    assert not any(t.done() for t in tasks)  # both streams are still running
    os.kill(int(decode.info["pid"]), signal.SIGKILL)
    await asyncio.gather(*tasks)
    return got, firsts


def _worker_stats(cluster: Cluster, worker_id: str) -> dict[str, Any]:
    return next(w for w in cluster.status()["workers"] if w["worker_id"] == worker_id)
