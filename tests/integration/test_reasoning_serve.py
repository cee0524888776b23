"""``serve --reasoning-parser``: a chat answer's thinking comes back as ``reasoning_content``,
apart from its content, whole and streamed, through the official ``openai`` client; a
constraint applies after the thinking.

The model is the tiny random Llama whose tokenizer has ``<think>`` and ``</think>`` as single
tokens (as Qwen3's). It thinks when made to: a prompt that ends inside an open ``<think>``
(``continue_final_message``) and a bias towards ``</think>`` under seeded sampling, or biases
towards both tags under a constraint. The raw text of the same request from ``LLM.chat`` (same
model, same seed) is what the server must have split: the split is checked against it, so a
parser that passed the text through, or dropped any of it, fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from splitserve import LLM, SamplingParams
from splitserve.cluster.frontends.client import Client
from splitserve.sampling_params import StructuredOutputsParams
from tests.utils import tiny_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TOOL_REGEX = '<tool_call>\\{"name": "get_weather", "arguments": \\{"city": "(Paris|Rome)"\\}\\}</tool_call>'
ASK = [{"role": "user", "content": "What is the weather like?"}]
OPEN = [*ASK, {"role": "assistant", "content": "<think>\nLet me see"}]
"""A prompt left inside the thinking (continue_final_message)."""
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True}
PULL = 8.0
"""Logit bias towards </think> under sampling: some thinking, the tag, then an answer."""


@pytest.fixture(scope="module")
def llm(thinking_model_dir) -> LLM:
    return LLM(str(thinking_model_dir), num_kv_blocks=256)


@pytest.fixture(scope="module")
def tags(llm) -> tuple[int, int]:
    tok = llm.engine.tokenizer
    ids = (tok.encode("<think>", add_special_tokens=False),
           tok.encode("</think>", add_special_tokens=False))
    assert all(len(i) == 1 for i in ids)  # single tokens, as Qwen3's
    return ids[0][0], ids[1][0]


@pytest.fixture(scope="module")
def server(thinking_model_dir) -> Iterator[Any]:
    with tiny_server(thinking_model_dir, grpc_port=0, tool_call_parser="hermes",
                     reasoning_parser="qwen3") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)


def _raw(llm: LLM, messages: list[dict[str, Any]], **params: Any) -> str:
    """The model's own text for the request (no parser): what the server splits."""
    chat = {k: params.pop(k) for k in list(params) if k in CONTINUE}
    return llm.chat(messages, SamplingParams(**params), **chat)[0].outputs[0].text


def _streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, str, list[Any]]:
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    return reasoning, content, chunks


@pytest.fixture(scope="module")
def seed(llm, tags) -> int:
    """A seed whose sampled answer thinks a while, closes the thinking and answers (found
    here, on this machine's arithmetic, not written down)."""
    for seed in range(32):
        raw = _raw(llm, OPEN, **_sampled(tags, seed), **CONTINUE)
        reasoning, tag, content = raw.partition("</think>")
        if tag and reasoning and content:
            return seed
    pytest.fail("no seed of 32 gave thinking, </think> and an answer")


def _sampled(tags: tuple[int, int], seed: int) -> dict[str, Any]:
    return {"temperature": 1.0, "seed": seed, "max_tokens": 24, "logit_bias": {tags[1]: PULL}}


def test_think_block_split_whole_and_streamed(client, llm, tags, seed) -> None:
    raw = _raw(llm, OPEN, **_sampled(tags, seed), **CONTINUE)
    want_reasoning, _, want_content = raw.partition("</think>")
    kwargs = dict(model="tiny", messages=OPEN, temperature=1.0, seed=seed, max_tokens=24,
                  logit_bias={str(tags[1]): PULL}, extra_body=CONTINUE)
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert message.reasoning_content == want_reasoning  # type: ignore[attr-defined]
    assert message.reasoning == want_reasoning  # type: ignore[attr-defined]  # newer vLLM name
    assert message.content == want_content

    reasoning, content, chunks = _streamed(client, **kwargs)
    assert (reasoning, content) == (want_reasoning, want_content)
    # the thinking streams first: no content delta before the last reasoning delta
    kinds = "".join(("r" if getattr(c.choices[0].delta, "reasoning_content", None) else "")
                    + ("c" if c.choices[0].delta.content else "") for c in chunks)
    assert re.fullmatch(r"r*(rc)?c*", kinds), kinds


def test_prompt_left_open_is_all_reasoning(client, llm) -> None:
    """Cut short by max_tokens before any </think>: reasoning, content null."""
    raw = _raw(llm, OPEN, temperature=0.0, max_tokens=6, **CONTINUE)
    assert raw and "</think>" not in raw
    res = client.chat.completions.create(model="tiny", messages=OPEN, temperature=0,
                                         max_tokens=6, extra_body=CONTINUE)
    assert res.choices[0].message.reasoning_content == raw  # type: ignore[attr-defined]
    assert res.choices[0].message.content is None
    assert res.choices[0].finish_reason == "length"
    reasoning, content, _ = _streamed(client, model="tiny", messages=OPEN, temperature=0,
                                      max_tokens=6, extra_body=CONTINUE)
    assert (reasoning, content) == (raw, "")


def test_plain_answer_has_no_reasoning(client, llm) -> None:
    raw = _raw(llm, ASK, temperature=0.0, max_tokens=8)
    assert "<think>" not in raw
    res = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=8)
    assert res.choices[0].message.content == raw
    assert getattr(res.choices[0].message, "reasoning_content", None) is None


def test_include_reasoning_false(client, llm, tags, seed) -> None:
    raw = _raw(llm, OPEN, **_sampled(tags, seed), **CONTINUE)
    res = client.chat.completions.create(
        model="tiny", messages=OPEN, temperature=1.0, seed=seed, max_tokens=24,
        logit_bias={str(tags[1]): PULL}, extra_body={**CONTINUE, "include_reasoning": False})
    message = res.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert message.content == raw.partition("</think>")[2]


def _gated(regex: str, thinking: bool = False) -> StructuredOutputsParams:
    """The constraint as the server passes it on with a reasoning parser."""
    return StructuredOutputsParams(regex=regex, think_start="<think>", think_end="</think>",
                                   thinking=thinking)


def test_constraint_applies_after_the_thinking(client, llm, tags) -> None:
    """The model may open a think block where the constraint would not allow it, thinks
    freely, and the constraint holds from after </think>: both tags come out (biased), though
    the regex alone refuses them, and the content matches the regex."""
    bias = {tags[0]: 40.0, tags[1]: 50.0}
    alone = _raw(llm, ASK, temperature=0.0, max_tokens=12, logit_bias=bias,
                 structured_outputs={"regex": "[a-z]{2,6}"})
    assert re.fullmatch("[a-z]{2,6}", alone)  # without the gate: no thinking possible
    raw = _raw(llm, ASK, temperature=0.0, max_tokens=12, logit_bias=bias,
               structured_outputs=_gated("[a-z]{2,6}"))
    assert raw.startswith("<think></think>") and re.fullmatch("[a-z]{2,6}", raw[15:]), raw
    res = client.chat.completions.create(
        model="tiny", messages=ASK, temperature=0, max_tokens=12,
        logit_bias={str(k): v for k, v in bias.items()},
        extra_body={"structured_outputs": {"regex": "[a-z]{2,6}"}})
    message = res.choices[0].message
    assert message.reasoning_content == ""  # type: ignore[attr-defined]
    assert message.content == raw[15:] and res.choices[0].finish_reason == "stop"


def test_tool_call_after_thinking(client, llm, tags) -> None:
    """The content after </think> is what the tool-call parser reads: the call comes out
    whole, the thinking apart from it."""
    bias = {tags[0]: 40.0, tags[1]: 50.0}
    raw = _raw(llm, ASK, temperature=0.0, max_tokens=60, logit_bias=bias,
               structured_outputs=_gated(TOOL_REGEX))
    assert raw.startswith("<think></think><tool_call>"), raw
    kwargs = dict(model="tiny", messages=ASK, temperature=0, max_tokens=60, tools=[WEATHER],
                  logit_bias={str(k): v for k, v in bias.items()},
                  extra_body={"structured_outputs": {"regex": TOOL_REGEX}})
    res = client.chat.completions.create(**kwargs)
    choice = res.choices[0]
    assert choice.message.reasoning_content == ""  # type: ignore[attr-defined]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    reasoning, content, chunks = _streamed(client, **kwargs)
    assert (reasoning, content) == ("", "")
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_history_reasoning_content_accepted(client) -> None:
    """An assistant turn given back with its reasoning_content (as clients of reasoning
    servers do) is accepted, and reaches the chat template (which may render it)."""
    from splitserve.cluster.frontends.openai_protocol import ChatCompletionRequest

    messages = [*ASK, {"role": "assistant", "content": "Sunny.", "reasoning_content": "hm"},
                {"role": "user", "content": "And tomorrow?"}]
    body = ChatCompletionRequest(model="tiny", messages=messages)
    assert body.messages[1].model_dump(exclude_none=True)["reasoning_content"] == "hm"
    res = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert res.choices[0].finish_reason == "length"


def test_grpc_chat_splits_thinking(server, llm, tags, seed) -> None:
    """gRPC chat (messages) under the server's parser: each chunk's reasoning_text and text
    join to the thinking and the answer; the tokens are all of them."""
    raw = _raw(llm, OPEN, **_sampled(tags, seed), **CONTINUE)
    want_reasoning, _, want_content = raw.partition("</think>")
    with Client(server.grpc_target) as c:
        res = c.generate(messages=OPEN, temperature=1.0, seed=seed, max_tokens=24,
                         logit_bias={tags[1]: PULL}, **CONTINUE)
        (done,) = res.completions
        assert (done.reasoning, done.text) == (want_reasoning, want_content)
        assert len(done.token_ids) == 24 and tags[1] in done.token_ids
        # a constraint after the thinking, as over HTTP
        bias = {tags[0]: 40.0, tags[1]: 50.0}
        res = c.generate(messages=ASK, temperature=0.0, max_tokens=12, logit_bias=bias,
                         structured_outputs={"regex": "[a-z]{2,6}"})
        assert res.completions[0].reasoning == ""
        assert re.fullmatch("[a-z]{2,6}", res.completions[0].text)
        assert res.completions[0].token_ids[:2] == list(tags)
        # text input is not chat: left as it is
        res = c.generate(text="<think>\nhello", temperature=0.0, max_tokens=6)
        assert res.completions[0].reasoning == ""
        assert res.completions[0].text == llm.generate(
            "<think>\nhello", SamplingParams(temperature=0.0, max_tokens=6))[0].outputs[0].text


XML_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city for some days",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}
XML_REGEX = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n(Paris|Rome)\n</parameter>\n"
             "<parameter=days>\n[1-9]\n</parameter>\n</function>\n</tool_call>")


@pytest.fixture(scope="module")
def coder_client(thinking_model_dir) -> Iterator[openai.OpenAI]:
    """A server with Qwen3-Coder's XML tool-call parser (and no reasoning parser)."""
    with tiny_server(thinking_model_dir, 64, grpc_port=None,
                     tool_call_parser="qwen3_coder") as srv:
        yield openai.OpenAI(base_url=srv.http_url + "/v1", api_key="none", max_retries=0)


def test_qwen3_coder_tool_calls(coder_client, llm) -> None:
    """``--tool-call-parser qwen3_coder``: the model's XML call (made here by a regex) comes
    back as tool_calls with arguments typed by the tool's schema, whole and streamed."""
    raw = _raw(llm, ASK, temperature=0.0, max_tokens=80,
               structured_outputs={"regex": XML_REGEX})
    city = re.search("(Paris|Rome)", raw).group(1)  # type: ignore[union-attr]
    days = int(re.search(r"days>\n([1-9])", raw).group(1))  # type: ignore[union-attr]
    kwargs = dict(model="tiny", messages=ASK, temperature=0, max_tokens=80, tools=[XML_WEATHER],
                  extra_body={"structured_outputs": {"regex": XML_REGEX}})
    res = coder_client.chat.completions.create(**kwargs)
    (call,) = res.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": city, "days": days}  # days: an int
    assert res.choices[0].finish_reason == "tool_calls" and not res.choices[0].message.content
    chunks = [c for c in coder_client.chat.completions.create(stream=True, **kwargs)
              if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        ("get_weather", {"city": city, "days": days})]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
