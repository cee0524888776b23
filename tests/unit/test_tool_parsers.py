"""Tool calling without a model: the tool-choice grammar's schema, the parsers, the streaming
hold-back, and the protocol's translation (constraints, tools, errors naming the field)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from splitserve.cluster.frontends.openai_protocol import ChatCompletionRequest, CompletionRequest
from splitserve.cluster.frontends.tool_parsers import (
    GraniteParser,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    PythonicParser,
    ToolStream,
    parse_forced,
    tool_choice_schema,
)
from splitserve.errors import InvalidRequestError

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]},
}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
USER = [{"role": "user", "content": "hi"}]


def test_required_schema_accepts_calls_of_the_tools_only() -> None:
    schema = tool_choice_schema([WEATHER, TIME], "required", parallel=True)
    good = [{"name": "get_time", "parameters": {"zone": "UTC"}},
            {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_time", "parameters": {}}],
                [{"name": "nope", "parameters": {"zone": "x"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = tool_choice_schema([WEATHER, TIME], "required", parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)
    named = tool_choice_schema([WEATHER, TIME], {"function": {"name": "get_time"}}, True)
    assert named == TIME["function"]["parameters"]


def test_parse_forced_output() -> None:
    calls = parse_forced('[{"name": "get_time", "parameters": {"zone": "UTC"}}]', "required")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    named = parse_forced('{"zone": "UTC"}', {"type": "function", "function": {"name": "get_time"}})
    assert named[0].name == "get_time" and json.loads(named[0].arguments) == {"zone": "UTC"}
    assert parse_forced('[{"name": "get_ti', "required") == []  # cut short by max_tokens
    assert len({c.id for c in parse_forced('[{"name":"a","parameters":{}},'
                                           '{"name":"b","parameters":{}}]', "required")}) == 2


HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
               '"unit": "c"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": '
               '{"zone": "CET"}}</tool_call>')
LLAMA_TEXT = ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}; '
              '{"name": "get_time", "parameters": {"zone": "CET"}}')
PYTHONIC_TEXT = '[get_weather(city="Oslo", unit=\'c\'), get_time(zone="CET")]'
MISTRAL_LIST = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]')
MISTRAL_V11 = ('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "unit": "c"}'
               '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"zone": "CET"}')
GRANITE_TEXT = ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]')


@pytest.mark.parametrize(("parser", "text", "content"), [
    (HermesParser(), HERMES_TEXT, "Let me check."),
    (Llama3JsonParser(), LLAMA_TEXT, None),
    (Llama3JsonParser(), "<|python_tag|>" + LLAMA_TEXT, None),
    (PythonicParser(), PYTHONIC_TEXT, None),
    (PythonicParser(), "<|python_start|>" + PYTHONIC_TEXT + "<|python_end|>", None),
    (GraniteParser(), GRANITE_TEXT, None),
    (MistralParser(), MISTRAL_LIST, None),
    (MistralParser(), MISTRAL_V11, "Checking."),
    (GraniteParser(), GRANITE_TEXT.removeprefix("<|tool_call|>"), None),  # the tag skipped
    (GraniteParser(), "<tool_call>" + GRANITE_TEXT.removeprefix("<|tool_call|>"), None),
])
def test_parsers_extract_calls(parser, text: str, content: str | None) -> None:
    got_content, calls = parser.extract(text)
    assert got_content == content
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo", "unit": "c"}


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser(), PythonicParser(),
                                    GraniteParser(), MistralParser()])
def test_plain_and_malformed_text_stay_content(parser) -> None:
    assert parser.extract("Just words.") == ("Just words.", [])
    broken = {"hermes": "<tool_call>{not json</tool_call>", "llama3_json": '{"name": 3}',
              "pythonic": "[get_weather(Oslo)]", "granite": '[{"name": "f"}, 3]',
              "mistral": '[TOOL_CALLS]f[ARGS]{"a": 1} and then some'}[parser.name]
    assert parser.extract(broken) == (broken, [])


@pytest.mark.parametrize("text", [
    "[1, 2, 3]", "[f(**kw)]", "[f(x=open('/etc/passwd'))]", "[f(x={1, 2})]", "[obj.method(a=1)]",
    "[f(x=1)] and more", "[" * 5000 + "]" * 5000, "[f(x=__import__('os'))]",
])
def test_pythonic_takes_literals_only(text: str) -> None:
    """Only keyword calls of plain names with literal values are calls; nothing is evaluated
    (a call or a name in a value, a set, ** and deep nesting all stay content)."""
    assert PythonicParser().extract(text) == (text, [])


def test_pythonic_values() -> None:
    _, (call,) = PythonicParser().extract(
        "[f(a=-1.5, b=[1, 'x', None], c={'k': (True, false)}, d=null, e='é')]")
    assert json.loads(call.arguments) == {"a": -1.5, "b": [1, "x", None],
                                          "c": {"k": [True, False]}, "d": None, "e": "é"}


@pytest.mark.parametrize(("parser", "text"), [(HermesParser(), HERMES_TEXT),
                                              (Llama3JsonParser(), LLAMA_TEXT),
                                              (HermesParser(), "No calls here <tool"),
                                              (PythonicParser(), PYTHONIC_TEXT),
                                              (PythonicParser(), "Plain [text] <|python"),
                                              (GraniteParser(), GRANITE_TEXT),
                                              (MistralParser(), MISTRAL_V11),
                                              (MistralParser(), MISTRAL_LIST),
                                              (MistralParser(), "Not a call [TOOL_"),
                                              (GraniteParser(), "No <|tool_call|> here")])
def test_streaming_equals_whole_at_every_split(parser, text: str) -> None:
    """Fed one character at a time: markup never leaks into content, calls equal extract's."""
    whole_content, whole_calls = parser.extract(text)
    stream = ToolStream(parser, None)
    sent = "".join(stream.feed(ch) for ch in text)
    assert ("<tool" not in sent and "[TOOL" not in sent) or not whole_calls
    rest, calls = stream.finish()
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    if not whole_calls:
        assert sent + rest == text
    else:
        assert (sent + rest).strip() == (whole_content or "")


# ---------------------------------------------------------------------- protocol


def _chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=USER, **kw)


def test_response_format_and_structured_outputs_become_constraints() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    so = _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}).to_sampling_params().structured_outputs
    assert so is not None and so.schema == schema
    so = _chat(response_format={"type": "json_object"}).to_sampling_params().structured_outputs
    assert so is not None and so.json_object
    assert _chat(response_format={"type": "text"}).to_sampling_params().structured_outputs is None
    cmpl = CompletionRequest(prompt="x", structured_outputs={"choice": ["a", "b"]})
    assert cmpl.to_sampling_params().structured_outputs.choice == ("a", "b")


def test_tool_choice_builds_the_grammar() -> None:
    req = _chat(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                    "function": {"name": "get_time"}})
    assert req.to_sampling_params().structured_outputs.schema == TIME["function"]["parameters"]
    req = _chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert req.to_sampling_params().structured_outputs.schema["maxItems"] == 1
    assert _chat(tools=[WEATHER]).effective_tool_choice() == "auto"
    assert _chat(tools=[WEATHER], tool_choice="none").to_sampling_params().structured_outputs is None


@pytest.mark.parametrize(("body", "field"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "object"}, "choice": ["a"]}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
])
def test_bad_input_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        _chat(**body).to_sampling_params()
    assert e.value.field == field


# ---------------------------------------------------------------------- qwen3_coder (XML calls)

XML_TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "properties": {
        "command": {"type": "string"}, "timeout": {"type": "integer"},
        "ratio": {"type": "number"}, "dry": {"type": "boolean"},
        "env": {"type": "object"}, "args": {"type": "array"},
        "note": {"type": ["string", "null"]}}}}}]


def _xml_call(name: str, params: dict[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def test_qwen3_coder_types_values_by_the_tools_schema() -> None:
    from splitserve.cluster.frontends.tool_parsers import create_parser

    parser = create_parser("qwen3_coder").bind(XML_TOOLS)
    text = "Running it.\n" + _xml_call("run", {
        "command": 'grep -r "a\\b" .\nwc -l', "timeout": "30", "ratio": "0.5", "dry": "True",
        "env": '{"A": 1}', "args": '["-x", 2]', "note": "null", "extra": "42",
    }) + "\n" + _xml_call("run", {"command": "ls", "timeout": "soon"})
    content, calls = parser.extract(text)
    assert content == "Running it."
    assert [c.name for c in calls] == ["run", "run"]
    assert json.loads(calls[0].arguments) == {
        "command": 'grep -r "a\\b" .\nwc -l',  # raw text: no JSON escaping, inner newline kept
        "timeout": 30, "ratio": 0.5, "dry": True, "env": {"A": 1}, "args": ["-x", 2],
        "note": "null",  # the string the schema allows first: text
        "extra": "42",  # not in the schema: text
    }
    # a value that does not parse as its type stays text
    assert json.loads(calls[1].arguments) == {"command": "ls", "timeout": "soon"}
    # unbound (no tools): every value is text
    _, (call, *_) = create_parser("qwen3_xml").extract(text)
    assert json.loads(call.arguments)["timeout"] == "30"
    # no call: all content; a cut-short call is no call
    assert parser.extract("plain answer") == ("plain answer", [])
    assert parser.extract("x <tool_call>\n<function=run>\n<parameter=comm") == (
        "x <tool_call>\n<function=run>\n<parameter=comm", [])


def test_qwen3_coder_streams_content_and_holds_the_call() -> None:
    from splitserve.cluster.frontends.tool_parsers import ToolStream, create_parser

    text = "Sure." + _xml_call("run", {"command": "ls", "timeout": "5"})
    stream = ToolStream(create_parser("qwen3_coder").bind(XML_TOOLS), None)
    sent = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, calls = stream.finish()
    assert sent + rest == "Sure." and "<" not in sent
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("run", {"command": "ls", "timeout": 5})]
