"""``serve --reasoning-parser``: a chat answer's thinking comes back as ``reasoning_content``,
apart from its content, whole and streamed, through the official ``openai`` client.

The tiny random model does not think by itself, so the tests make it: a regex constraint that
allows a think block first (the way a constrained request can think), or a prompt that ends
inside an open ``<think>`` (``continue_final_message``). The raw text of the same request from
``LLM.chat`` (same model, greedy) is what the server must have split: the split is checked
against it, so a parser that passed the text through, or dropped any of it, fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from splitserve import SamplingParams
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions

THINK_REGEX = "<think>[a-z]{2,6}</think>[a-z]{2,6}"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TOOL_REGEX = ('<think>[a-z]{2,6}</think><tool_call>\\{"name": "get_weather", '
              '"arguments": \\{"city": "(Paris|Rome)"\\}\\}</tool_call>')
ASK = [{"role": "user", "content": "What is the weather like?"}]


@pytest.fixture(scope="module")
def client(tiny_model_dir) -> Iterator[openai.OpenAI]:
    backend = EngineBackend.from_config(model=str(tiny_model_dir), num_kv_blocks=256,
                                        max_model_len=512)
    opts = ServeOptions(port=0, grpc_port=None, served_model_name="tiny",
                        tool_call_parser="hermes", reasoning_parser="qwen3")
    with BackgroundServer(backend, opts) as srv:
        yield openai.OpenAI(base_url=srv.http_url + "/v1", api_key="none", max_retries=0)


def _raw(tiny_llm: Any, messages: list[dict[str, Any]], max_tokens: int,
         regex: str | None = None, **chat: Any) -> str:
    """The model's own text for the request (no parser): what the server splits."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                            structured_outputs={"regex": regex} if regex else None)
    return tiny_llm.chat(messages, params, **chat)[0].outputs[0].text


def _streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, str, list[Any]]:
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    return reasoning, content, chunks


def test_think_block_split_whole_and_streamed(client, tiny_llm) -> None:
    raw = _raw(tiny_llm, ASK, 40, THINK_REGEX)
    assert raw.startswith("<think>") and "</think>" in raw, raw
    want_reasoning, _, want_content = raw.removeprefix("<think>").partition("</think>")
    kwargs = dict(model="tiny", messages=ASK, temperature=0, max_tokens=40,
                  extra_body={"structured_outputs": {"regex": THINK_REGEX}})
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert message.reasoning_content == want_reasoning  # type: ignore[attr-defined]
    assert message.reasoning == want_reasoning  # type: ignore[attr-defined]  # newer vLLM name
    assert message.content == want_content and "<think>" not in message.content
    assert whole.choices[0].finish_reason == "stop"

    reasoning, content, chunks = _streamed(client, **kwargs)
    assert (reasoning, content) == (want_reasoning, want_content)
    # the thinking streams first: no content delta before the last reasoning delta
    kinds = [("r" if getattr(c.choices[0].delta, "reasoning_content", None) else "")
             + ("c" if c.choices[0].delta.content else "") for c in chunks]
    seen = "".join(k for k in kinds if k)
    assert seen.rstrip("c").replace("rc", "r").strip("r") == "", kinds
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_prompt_left_open_is_all_reasoning(client, tiny_llm) -> None:
    """A prompt that ends inside <think> (continue_final_message): the answer, cut short by
    max_tokens before any </think>, is reasoning; content null."""
    messages = [*ASK, {"role": "assistant", "content": "<think>\nLet me see"}]
    chat = dict(add_generation_prompt=False, continue_final_message=True)
    raw = _raw(tiny_llm, messages, 6, **chat)
    assert raw and "</think>" not in raw
    res = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                         max_tokens=6, extra_body=chat)
    assert res.choices[0].message.reasoning_content == raw  # type: ignore[attr-defined]
    assert res.choices[0].message.content is None
    assert res.choices[0].finish_reason == "length"
    reasoning, content, _ = _streamed(client, model="tiny", messages=messages, temperature=0,
                                      max_tokens=6, extra_body=chat)
    assert (reasoning, content) == (raw, "")


def test_plain_answer_has_no_reasoning(client, tiny_llm) -> None:
    raw = _raw(tiny_llm, ASK, 8)
    res = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=8)
    assert res.choices[0].message.content == raw
    assert getattr(res.choices[0].message, "reasoning_content", None) is None


def test_include_reasoning_false(client) -> None:
    res = client.chat.completions.create(
        model="tiny", messages=ASK, temperature=0, max_tokens=40,
        extra_body={"structured_outputs": {"regex": THINK_REGEX}, "include_reasoning": False})
    message = res.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert message.content and "<think>" not in message.content and "</think>" not in message.content


def test_tool_call_after_thinking(client, tiny_llm) -> None:
    """The content after </think> is what the tool-call parser reads: the call comes out
    whole, the thinking apart from it."""
    raw = _raw(tiny_llm, ASK, 60, TOOL_REGEX)
    want_reasoning = raw.removeprefix("<think>").partition("</think>")[0]
    kwargs = dict(model="tiny", messages=ASK, temperature=0, max_tokens=60, tools=[WEATHER],
                  extra_body={"structured_outputs": {"regex": TOOL_REGEX}})
    res = client.chat.completions.create(**kwargs)
    choice = res.choices[0]
    assert choice.message.reasoning_content == want_reasoning  # type: ignore[attr-defined]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    reasoning, content, chunks = _streamed(client, **kwargs)
    assert (reasoning, content) == (want_reasoning, "")
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
