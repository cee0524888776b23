"""OpenAI's Responses API (``/v1/responses``) through the official ``openai`` client: bodies and
every streamed event validate against the client's own types, answers equal the same chat on
``LLM.chat``, a conversation continues from a stored response, tools and reasoning come back
as their items, and bad input is a 400 naming the Responses field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from splitserve import LLM, SamplingParams
from splitserve.cluster.frontends.prompts import chat_prompt, chat_prompt_ids
from tests.utils import tiny_server

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}
THINK = [{"role": "user", "content": "Think."}]


@pytest.fixture(scope="module")
def tiny_llm(thinking_model_dir) -> LLM:
    """The served model (the tiny Llama with <think> / </think> tokens), in process."""
    return LLM(str(thinking_model_dir), num_kv_blocks=256)


@pytest.fixture(scope="module")
def server(thinking_model_dir) -> Iterator[Any]:
    with tiny_server(thinking_model_dir, grpc_port=None, tool_call_parser="hermes",
                     reasoning_parser="qwen3") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        yield c


def _create(client: openai.OpenAI, **kwargs: Any) -> Response:
    """A response, its raw body validated strictly against the client's type."""
    raw = client.responses.with_raw_response.create(model="tiny", **kwargs)
    return Response.model_validate(json.loads(raw.text))


def _events(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    """A streamed response's events, each validated strictly, numbered 0, 1, 2, ..."""
    with client.responses.with_streaming_response.create(model="tiny", stream=True,
                                                         **kwargs) as raw:
        lines = [line.removeprefix("data: ") for line in raw.iter_lines()
                 if line.startswith("data: ")]
    events = [EVENTS.validate_python(json.loads(line)) for line in lines]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def _chat_text(tiny_llm: Any, messages: list[dict[str, Any]], max_tokens: int,
               regex: str | None = None, **params: Any) -> str:
    params = {"temperature": 0.0, **params}
    sampling = SamplingParams(max_tokens=max_tokens, **params,
                              structured_outputs={"regex": regex} if regex else None)
    return tiny_llm.chat(messages, sampling)[0].outputs[0].text


def _no_think(tiny_llm: Any) -> dict[str, Any]:
    """With a reasoning parser a constrained answer may think first (the constraint applies
    after </think>); a bias against <think> keeps the tiny model to the constraint."""
    think = tiny_llm.engine.tokenizer.encode("<think>", add_special_tokens=False)[0]
    return {"logit_bias": {str(think): -100.0}}


def _thinking(tiny_llm: Any) -> dict[str, Any]:
    """Sampling that makes the model open <think>, think, close it and answer: biases towards
    both tags and a seed found here (this machine's arithmetic), not written down."""
    tok = tiny_llm.engine.tokenizer
    ids = [tok.encode(t, add_special_tokens=False)[0] for t in ("<think>", "</think>")]
    for seed in range(48):
        params = {"temperature": 1.0, "seed": seed, "logit_bias": {ids[0]: 8.0, ids[1]: 8.0}}
        raw = _chat_text(tiny_llm, THINK, 24, **params)
        thought, tag, answer = raw.removeprefix("<think>").partition("</think>")
        if raw.startswith("<think>") and tag and thought and answer:
            return params
    pytest.fail("no seed of 48 gave <think>, thinking, </think> and an answer")


def test_text_answer_whole_and_streamed(client, tiny_llm) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = _chat_text(tiny_llm, messages, 8)
    res = _create(client, input="Hi", instructions="Be brief.", max_output_tokens=8,
                  temperature=0)
    assert res.output_text == want and res.status == "incomplete"
    assert res.incomplete_details is not None
    assert res.incomplete_details.reason == "max_output_tokens"
    (item,) = res.output
    assert item.type == "message" and item.role == "assistant"
    prompt = chat_prompt_ids(tiny_llm.engine.tokenizer, messages)
    assert res.usage is not None and res.usage.input_tokens == len(prompt)
    assert res.usage.output_tokens == 8 and res.usage.total_tokens == len(prompt) + 8

    events = _events(client, input="Hi", instructions="Be brief.", max_output_tokens=8,
                     temperature=0)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == want
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert done.text == want
    final = events[-1].response
    assert final.output_text == want and final.usage.output_tokens == 8
    # the client's own stream helper accepts the sequence (it checks items and parts; it
    # wants a completed response: an answer that stops)
    short = _chat_text(tiny_llm, messages, 8, "[a-z]{2,4}")
    with client.responses.stream(model="tiny", input="Hi", instructions="Be brief.",
                                 max_output_tokens=8, temperature=0,
                                 extra_body={"structured_outputs": {"regex": "[a-z]{2,4}"},
                                             **_no_think(tiny_llm)}) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == short


def test_conversation_continues_from_stored_response(client, http, tiny_llm) -> None:
    first = _create(client, input="Name a color.", max_output_tokens=4, temperature=0)
    second = _create(client, input="Another one?", max_output_tokens=4, temperature=0,
                     previous_response_id=first.id)
    turns = [{"role": "user", "content": "Name a color."},
             {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "Another one?"}]
    # the stored turns were put before the input: the prompt is the whole conversation
    assert second.usage.input_tokens == len(chat_prompt_ids(tiny_llm.engine.tokenizer, turns))
    assert second.output_text == _chat_text(tiny_llm, turns, 4)
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    assert http.delete(f"/v1/responses/{first.id}").json()["deleted"] is True
    assert http.get(f"/v1/responses/{first.id}").status_code == 404
    r = http.post("/v1/responses", json={"input": "x", "previous_response_id": first.id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    unstored = _create(client, input="Hi", max_output_tokens=2, store=False)
    assert http.get(f"/v1/responses/{unstored.id}").status_code == 404


def test_function_call_and_its_output(client, tiny_llm) -> None:
    no_think = _no_think(tiny_llm)
    res = _create(client, input="Weather in Paris?", tools=[WEATHER], max_output_tokens=40,
                  tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                  extra_body=no_think)
    calls = [item for item in res.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
    events = _events(client, input="Weather in Paris?", tools=[WEATHER], max_output_tokens=40,
                     tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                     extra_body=no_think)
    (args,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args.arguments == calls[0].arguments
    # the call's result goes back as an input item, after the stored turn
    follow = _create(client, previous_response_id=res.id, max_output_tokens=4, temperature=0,
                     tools=[WEATHER], tool_choice="none",
                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                             "output": '{"temp": 21}'}])
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [{
                 "id": calls[0].call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
             {"role": "tool", "tool_call_id": calls[0].call_id, "content": '{"temp": 21}'}]
    prompt, _ = chat_prompt(tiny_llm.engine.tokenizer, turns, tools=[{
        "type": "function", "function": {k: WEATHER[k] for k in ("name", "description",
                                                                "parameters")}}])
    assert follow.usage.input_tokens == len(prompt)


def test_reasoning_item(client, tiny_llm) -> None:
    params = _thinking(tiny_llm)
    raw = _chat_text(tiny_llm, THINK, 24, **params)
    thought, _, answer = raw.removeprefix("<think>").partition("</think>")
    body = dict(input="Think.", max_output_tokens=24, temperature=1.0, extra_body={
        "seed": params["seed"], "logit_bias": {str(k): v for k, v in params["logit_bias"].items()}})
    res = _create(client, **body)
    assert [item.type for item in res.output] == ["reasoning", "message"]
    assert res.output[0].content[0].text == thought and res.output_text == answer
    assert res.usage.output_tokens_details.reasoning_tokens > 0
    events = _events(client, **body)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer
    assert [i.type for i in events[-1].response.output] == ["reasoning", "message"]


def test_json_schema_format(client, tiny_llm) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    res = _create(client, input="A digit as JSON.", max_output_tokens=30, temperature=0,
                  text={"format": {"type": "json_schema", "name": "digit", "schema": schema,
                                   "strict": True}}, extra_body=_no_think(tiny_llm))
    assert res.status == "completed"
    jsonschema.validate(json.loads(res.output_text), schema)


def test_output_logprobs_whole_and_streamed(client, tiny_llm) -> None:
    """include message.output_text.logprobs: every answer token's logprob with top_logprobs
    alternatives on the text part, the same entries spread over the streamed text deltas and
    on the done event, equal to the engine's for the same chat."""
    no_think = _no_think(tiny_llm)
    messages = [{"role": "user", "content": "Hi"}]
    want = tiny_llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, logprobs=2,
                                                  logit_bias={int(k): v for k, v in
                                                              no_think["logit_bias"].items()})
                         )[0].outputs[0]
    chosen = [step[t].logprob for step, t in zip(want.logprobs, want.token_ids, strict=True)]
    kwargs = dict(input="Hi", max_output_tokens=6, temperature=0, top_logprobs=2,
                  include=["message.output_text.logprobs"], extra_body=no_think)
    res = _create(client, **kwargs)
    (message,) = [item for item in res.output if item.type == "message"]
    entries = message.content[0].logprobs
    assert [e.logprob for e in entries] == pytest.approx(chosen, abs=1e-4)
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-6
    events = _events(client, **kwargs)
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    (done,) = [ev for ev in events if ev.type == "response.output_text.done"]
    assert [e.logprob for e in streamed] == pytest.approx(chosen, abs=1e-4)
    assert [e.model_dump() for e in done.logprobs] == [e.model_dump() for e in streamed]
    # top_logprobs alone asks for nothing (as OpenAI's and vLLM's)
    plain = _create(client, input="Hi", max_output_tokens=6, temperature=0, top_logprobs=2,
                    extra_body=no_think)
    assert all(not item.content[0].logprobs for item in plain.output if item.type == "message")


def test_truncation_auto_drops_oldest_turns(client, http, tiny_llm) -> None:
    """truncation auto: the fewest oldest turns dropped that make the prompt and
    max_output_tokens fit the 512-token context (the instructions kept); without it the
    same input is a 400 naming the input."""
    filler = "word " * 150
    items: list[dict[str, Any]] = []
    for i in range(4):
        items += [{"role": "user", "content": f"{i} {filler}"},
                  {"role": "assistant", "content": "ok"}]
    items.append({"role": "user", "content": "And now?"})
    body = {"input": items, "instructions": "Be brief.", "max_output_tokens": 4,
            "temperature": 0}
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    system = [{"role": "system", "content": "Be brief."}]
    tok = tiny_llm.engine.tokenizer
    dropped = next(k for k in range(1, 5)
                   if len(chat_prompt_ids(tok, system + items[2 * k:])) + 4 <= 512)
    assert dropped >= 2  # the search had more than one turn to drop
    kept = system + items[2 * dropped:]
    res = _create(client, **{**body, "truncation": "auto"})
    assert res.usage.input_tokens == len(chat_prompt_ids(tok, kept))
    assert res.output_text == _chat_text(tiny_llm, kept, 4)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}},
     "text.format.schema"),
    ({"input": []}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice.name"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": "required",
      "parallel_tool_calls": False, "text": {"format": {"type": "json_object"}}}, "tool_choice"),
    ({"input": "x", "tools": [{**WEATHER, "parameters": {"type": "object", "required": 3}}],
      "tool_choice": "required"}, "tools.0.parameters"),
    ({"input": "x", "previous_response_id": "resp-missing"}, "previous_response_id"),
    ({"input": "x", "include": ["message.output_text.logprobs", "nope"]}, "include.1"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "word " * 600, "truncation": "auto"}, "input"),  # one turn: nothing to drop
    ({"input": "x", "max_output_tokens": 10_000}, "max_output_tokens"),  # past the context
    ({"input": "word " * 600}, "input"),  # the prompt alone is past the context
])
def test_bad_input_names_the_field(http, body, param) -> None:
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
