"""Tool calling for chat completions: the grammar that enforces a tool choice, and parsers that
turn the model's tool-call text into OpenAI ``tool_calls`` (whole, or as streamed deltas).

Owns: ``tool_choice_schema`` (``required`` -> a JSON array of ``{"name", "parameters"}`` calls
over the tools' schemas; a named function -> that function's parameter schema), the parsers
selected by ``--tool-call-parser`` (``hermes`` for Hermes/Qwen ``<tool_call>{...}</tool_call>``,
``llama3_json`` for Llama 3's bare ``{"name": ..., "parameters": ...}``, ``qwen3_coder`` for
Qwen3-Coder's XML, ``pythonic`` for Llama 3.2 / 4's ``[f(a=1)]``, ``granite`` for Granite
3.x's JSON list, ``mistral`` for ``[TOOL_CALLS]``), and ``ToolStream``,
which holds back text that may be a tool call while streaming so content never leaks tool-call
markup. Must not run requests or know about HTTP.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from splitserve.errors import InvalidRequestError


@dataclass
class ToolCall:
    """One parsed call: OpenAI's ``{"id", "type": "function", "function": {name, arguments}}``."""

    name: str
    arguments: str
    """The arguments as JSON text."""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def to_delta(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.to_openai()}


def _call_from_obj(obj: Any) -> ToolCall | None:
    """A call from ``{"name": ..., "arguments" | "parameters": {...}}``, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


# ---------------------------------------------------------------------- tool choice -> grammar


def function_names(tools: list[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def named_tool(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The tool named by ``tool_choice``; 400 naming ``tool_choice`` when it is not in tools."""
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    raise InvalidRequestError(
        f"tool_choice names function {name!r}, which is not in tools "
        f"({function_names(tools)})", field="tool_choice.function.name",
    )


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if params else {"type": "object", "properties": {}}


def tool_choice_schema(
    tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool
) -> dict[str, Any]:
    """The JSON schema the output must follow for ``required`` or a named function."""
    if isinstance(choice, dict):
        return parameters_schema(named_tool(tools, choice["function"]["name"]))
    one_of = [
        {"type": "object",
         "properties": {"name": {"const": t["function"]["name"]},
                        "parameters": parameters_schema(t)},
         "required": ["name", "parameters"], "additionalProperties": False}
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": one_of[0] if len(one_of) == 1 else {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_forced(text: str, choice: str | dict[str, Any]) -> list[ToolCall]:
    """Calls from grammar-enforced output (named: the arguments; required: an array)."""
    if isinstance(choice, dict):
        return [ToolCall(choice["function"]["name"], text.strip())]
    try:
        items = json.loads(text)
    except ValueError:
        return []  # cut short (max_tokens): nothing complete to report
    calls = [_call_from_obj(item) for item in items] if isinstance(items, list) else []
    return [c for c in calls if c is not None]


# ---------------------------------------------------------------------- parsers of free text


class ToolParser(ABC):
    """Finds tool calls in a model's free text (``tool_choice`` auto)."""

    name: str
    keeps_special_tokens = False
    """The calls' markers are special tokens: requests with tools (``auto``) decode with
    ``skip_special_tokens`` false, else the markers would be gone from the text."""

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content outside the calls or None, calls). Malformed calls stay in the content."""

    @abstractmethod
    def safe_prefix(self, text: str) -> int:
        """While streaming: how many leading characters of ``text`` are surely content."""

    def bind(self, tools: list[dict[str, Any]]) -> ToolParser:
        """This parser for one request's ``tools`` (a parser whose calls depend on the tools'
        schemas returns a copy that knows them)."""
        return self


class HermesParser(ToolParser):
    """Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.START not in text:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text):
            try:
                call = _call_from_obj(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = text[: text.index(self.START)].strip()
        return content or None, calls

    def safe_prefix(self, text: str) -> int:
        at = text.find(self.START)
        if at >= 0:
            return at
        return len(text) - partial_suffix(text, self.START)


class Llama3JsonParser(ToolParser):
    """Llama 3: the whole message is ``{"name": ..., "parameters": {...}}`` (several joined by
    ``;``), optionally after ``<|python_tag|>``."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        at = 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except ValueError:
                return text, []
            call = _call_from_obj(obj)
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \n\t;":
                at += 1
        return None, calls

    def safe_prefix(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("{", self.TAG)) or self.TAG.startswith(stripped):
            return 0  # may be a call: hold it all
        return len(text)


class Qwen3CoderParser(HermesParser):
    """Qwen3-Coder and Qwen3.5: XML calls, ``<tool_call><function=NAME><parameter=KEY>VALUE
    </parameter>...</function></tool_call>``. Values are raw text (code needs no JSON
    escaping), typed by the request's tool schema: ``string`` stays text, ``integer`` /
    ``number`` / ``boolean`` / ``null`` are parsed as such, anything else (objects, arrays) as
    JSON; a value that does not parse as its type, or a parameter the schema does not name,
    stays text. One newline around a value is the format's, not the value's."""

    name = "qwen3_coder"  # its calls open with hermes' tag: hermes' safe_prefix
    _CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*(?:</tool_call>|$)",
                       re.S)
    _PARAM = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self._types: dict[str, dict[str, Any]] = {}
        for tool in tools or []:
            fn = tool.get("function", tool)
            props = (fn.get("parameters") or {}).get("properties") or {}
            if isinstance(props, dict):
                self._types[fn.get("name", "")] = {
                    k: v.get("type") for k, v in props.items() if isinstance(v, dict)}

    def bind(self, tools: list[dict[str, Any]]) -> ToolParser:
        return Qwen3CoderParser(tools)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.START not in text:
            return text, []
        calls = []
        for name, body in self._CALL.findall(text):
            types = self._types.get(name.strip(), {})
            args = {key.strip(): self._typed(value, types.get(key.strip()))
                    for key, value in self._PARAM.findall(body)}
            calls.append(ToolCall(name.strip(), json.dumps(args, ensure_ascii=False)))
        if not calls:
            return text, []
        content = text[: text.index(self.START)].strip()
        return content or None, calls

    @staticmethod
    def _typed(value: str, kind: Any) -> Any:
        value = value.removeprefix("\n").removesuffix("\n")
        kinds = kind if isinstance(kind, list) else [kind]
        if value.strip() == "null" and "string" not in kinds:
            return None
        for k in kinds:
            if k in ("string", None):
                continue
            try:
                if k == "integer":
                    return int(value.strip())
                if k == "number":
                    number = float(value.strip())
                    return int(number) if number.is_integer() and "." not in value else number
                if k == "boolean" and value.strip().lower() in ("true", "false"):
                    return value.strip().lower() == "true"
                if k not in ("boolean", "null"):
                    return json.loads(value)
            except ValueError:
                continue
        return value


class PythonicParser(ToolParser):
    """Llama 3.2 / Llama 4 and models prompted the same way: the whole message is a Python
    list of calls with keyword arguments, ``[get_weather(city="Oslo"), get_time(zone="CET")]``
    (Llama 4 may wrap it in ``<|python_start|>`` ... ``<|python_end|>``). Arguments are Python
    literals (strings, numbers, lists, dicts, True / False / None, and JSON's true / false /
    null); parsed with ``ast``, never evaluated. Anything else is content, as vLLM's."""

    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"
    _WORDS = {"true": True, "false": False, "null": None}

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.START).removesuffix(self.END).strip()
        if not (body.startswith("[") and body.endswith("]")):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = [self._call(node) for node in tree.elts]
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return text, []
        return None, calls

    def _call(self, node: ast.expr) -> ToolCall:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("not a call with keyword arguments")
        args = {}
        for kw in node.keywords:
            if kw.arg is None:  # **kwargs
                raise ValueError("no ** arguments")
            args[kw.arg] = self._value(kw.value)
        return ToolCall(node.func.id, json.dumps(args, ensure_ascii=False))

    def _value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name) and node.id in self._WORDS:
            return self._WORDS[node.id]
        if isinstance(node, ast.List | ast.Tuple):
            return [self._value(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise ValueError("no ** in a dict")
            return {self._value(k): self._value(v)  # type: ignore[arg-type]
                    for k, v in zip(node.keys, node.values, strict=True)}
        value = ast.literal_eval(node)
        if not isinstance(value, str | int | float | bool | type(None)):
            raise ValueError(f"not a JSON value: {type(value).__name__}")
        return value

    def safe_prefix(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("[", self.START)) or \
                self.START.startswith(stripped):
            return 0  # may be a call: hold it all
        return len(text)


class GraniteParser(ToolParser):
    """IBM Granite 3.x: the message is ``<|tool_call|>`` (3.0; ``<tool_call>`` in 3.1) and a
    JSON list of ``{"name": ..., "arguments": {...}}``; the tag is a special token, so it is
    usually gone from the text and the list stands alone, as vLLM's parser takes it."""

    name = "granite"
    TAGS = ("<|tool_call|>", "<tool_call>")

    def _body(self, text: str) -> str:
        body = text.strip()
        for tag in self.TAGS:
            if body.startswith(tag):
                return body[len(tag):].lstrip()
        return body

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if not body.startswith("["):
            return text, []
        try:
            items = json.loads(body)
        except ValueError:
            return text, []
        calls = [_call_from_obj(item) for item in items] if isinstance(items, list) else []
        if not calls or any(c is None for c in calls):
            return text, []
        return None, [c for c in calls if c is not None]

    def safe_prefix(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or self._body(stripped).startswith("[") or any(
                tag.startswith(stripped) or stripped.startswith(tag) for tag in self.TAGS):
            return 0  # may be a call: hold it all
        return len(text)


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS]`` (a special token, so kept in the text for requests with
    tools) then the calls: a JSON list of ``{"name", "arguments"}`` (Mistral 7B v0.3, Nemo,
    Small 3) or, from the v11 tokenizer on (Mistral Small 3.2, Magistral, Devstral),
    ``NAME[ARGS]{...}`` after each ``[TOOL_CALLS]`` (a ``[CALL_ID]...`` after the name is
    dropped). Text before the first marker is content; a call that does not parse leaves it
    all content."""

    name = "mistral"
    TAG, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    keeps_special_tokens = True

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.TAG not in text:
            return text, []
        calls: list[ToolCall] = []
        for part in text.split(self.TAG)[1:]:
            got = self._calls(part.strip())
            if not got:
                return text, []
            calls += got
        content = text[: text.index(self.TAG)].strip()
        return content or None, calls

    def _calls(self, part: str) -> list[ToolCall]:
        decoder = json.JSONDecoder()
        try:
            if part.startswith("["):  # a JSON list of calls
                items, end = decoder.raw_decode(part)
                calls = [_call_from_obj(i) for i in items] if isinstance(items, list) else []
            else:  # NAME[ARGS]{...}
                name, sep, args = part.partition(self.ARGS)
                name = name.split(self.CALL_ID)[0].strip()
                args = args.strip()
                obj, end = decoder.raw_decode(args)
                calls = [ToolCall(name, args[:end])] if sep and name and \
                    isinstance(obj, dict) else []
                part = args
        except ValueError:
            return []
        if part[end:].strip() or not calls or any(c is None for c in calls):
            return []  # more than the calls after the marker
        return [c for c in calls if c is not None]

    def safe_prefix(self, text: str) -> int:
        at = text.find(self.TAG)
        if at >= 0:
            return at
        return len(text) - partial_suffix(text, self.TAG)


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "qwen3_coder": Qwen3CoderParser,
    "qwen3_xml": Qwen3CoderParser,
    "pythonic": PythonicParser,
    "granite": GraniteParser,
    "mistral": MistralParser,
}


def create_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {sorted(PARSERS)}") from None


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


# ---------------------------------------------------------------------- streaming


class ToolStream:
    """One choice's stream: content deltas pass through, tool calls come out whole.

    ``forced`` (``required`` or a named function) holds all text and reports the calls at the
    end; otherwise the parser decides what is surely content.
    """

    def __init__(self, parser: ToolParser | None, forced: str | dict[str, Any] | None) -> None:
        self.parser, self.forced = parser, forced
        self.text = ""
        self._sent = 0

    def feed(self, delta: str) -> str:
        """Add text; returns the content that can be sent now."""
        self.text += delta
        if self.forced is not None or self.parser is None:
            return "" if self.forced is not None else self._take(len(self.text))
        return self._take(self.parser.safe_prefix(self.text))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, calls) at the end of the choice."""
        content, calls = self.result()
        if not calls:
            return self._take(len(self.text)), []
        rest = (content or "")[self._sent :] if content else ""
        return rest, calls

    def result(self) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of the whole text, as a non-streaming response reports them."""
        if self.forced is not None:
            return None, parse_forced(self.text, self.forced)
        if self.parser is None:
            return self.text, []
        return self.parser.extract(self.text)

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        out = self.text[self._sent : end]
        self._sent = end
        return out
