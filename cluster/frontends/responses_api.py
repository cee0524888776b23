"""OpenAI's Responses API (``POST /v1/responses``) over the chat machinery.

A Responses request is turned into a chat request (``http_server._responses_chat``): ``instructions`` become the
system message, ``input`` (a string, or messages, ``function_call`` and
``function_call_output`` items) the conversation, ``text.format`` the response format, flat
function ``tools`` chat's. The answer comes back as output items: a ``reasoning`` item (with a
server's ``--reasoning-parser``), a ``message`` with one ``output_text`` part, and
``function_call`` items; streamed as Responses' typed events (``Events``).

``store`` (default true, as OpenAI's) keeps a response, and the conversation that led to it,
in a bounded in-memory store (``ResponseStore``): ``GET`` / ``DELETE /v1/responses/{id}`` and
``previous_response_id`` (the earlier turns are put before ``input``; ``instructions`` are not
carried over, as OpenAI's) read it. The store is the HTTP server's own: it does not survive a
restart and is not shared by replicas.

``include: ["message.output_text.logprobs"]`` puts the answer's log-probabilities (with
``top_logprobs`` alternatives each) on its ``output_text`` part and on each streamed text
delta. ``truncation: "auto"`` drops the conversation's oldest turns until the prompt fits the
context (``fit_turns``).

Refused with a 400 naming the field: built-in tools (``web_search``, ``file_search``, ...),
``background``, ``conversation``, an unknown ``include`` value, item references and an unknown
or evicted ``previous_response_id``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from splitserve.cluster.frontends.prompts import new_request_id
from splitserve.errors import InvalidRequestError

STORE_MAX_RESPONSES = 256
"""Responses kept for ``previous_response_id`` and ``GET``; the oldest go first."""
STORE_MAX_BYTES = 64 << 20
"""And at most this much of them (their JSON): conversations with images run to megabytes."""
SAMPLING_EXTRAS = ("top_k", "min_p", "repetition_penalty", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty",
                   "logit_bias", "bad_words", "cache_salt", "skip_special_tokens",
                   "structured_outputs", "chat_template_kwargs", "include_reasoning",
                   "allowed_token_ids")
"""vLLM's sampling fields a Responses request may add (``extra_body``), passed to chat as is."""
INCLUDE_LOGPROBS = "message.output_text.logprobs"
INCLUDABLE = (INCLUDE_LOGPROBS, "reasoning.encrypted_content", "message.input_image.image_url",
              "code_interpreter_call.outputs", "computer_call_output.output.image_url",
              "file_search_call.results", "web_search_call.action.sources",
              "web_search_call.results")
"""OpenAI's ``include`` values. Only the logprobs change an answer here: the others name
built-in tools (refused), encrypted reasoning (reasoning comes as text) or input images
(inputs are not echoed), so they are accepted and add nothing, as vLLM's."""


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """Body of ``POST /v1/responses``."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(...)
    """A user message, or items: messages, ``function_call``, ``function_call_output``."""
    instructions: str | None = None
    """The system message (not carried to later turns)."""
    previous_response_id: str | None = None
    """A stored response whose conversation this one continues."""
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    stream: StrictBool = False
    store: StrictBool = True
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    """Accepted; a model thinks or not by its template (``chat_template_kwargs``)."""
    background: StrictBool = False
    truncation: Literal["auto", "disabled"] | None = None
    """``auto``: the oldest turns are dropped until the prompt fits the context."""
    include: list[str] | None = None
    """``message.output_text.logprobs``: the answer's log-probabilities."""
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    """Alternatives per token with ``include``'s logprobs."""
    conversation: Any = None

    @property
    def logprobs(self) -> bool:
        return INCLUDE_LOGPROBS in (self.include or [])

    def refuse_unsupported(self) -> None:
        if self.background:
            raise InvalidRequestError("background responses are not supported", field="background")
        if self.conversation is not None:
            raise InvalidRequestError("conversations are not supported; use "
                                      "previous_response_id", field="conversation")
        for i, value in enumerate(self.include or []):
            if value not in INCLUDABLE:
                raise InvalidRequestError(f"unknown include value {value!r}; one of "
                                          f"{', '.join(INCLUDABLE)}", field=f"include.{i}")
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") != "function":
                raise InvalidRequestError(f"only function tools are supported, got "
                                          f"{tool.get('type')!r}", field=f"tools.{i}.type")
            if not isinstance(tool.get("name"), str):
                raise InvalidRequestError("a function tool needs a name", field=f"tools.{i}.name")

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """Responses' flat function tools as chat's ``{"type", "function": {...}}``."""
        if not self.tools:
            return None
        keys = ("name", "description", "parameters", "strict")
        return [{"type": "function", "function": {k: t[k] for k in keys if t.get(k) is not None}}
                for t in self.tools]

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise InvalidRequestError("tool_choice is none, auto, required or "
                                          '{"type": "function", "name": ...}', field="tool_choice")
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "json_object"}
        if fmt.schema_ is None:
            raise InvalidRequestError("text.format of type json_schema needs a schema",
                                      field="text.format.schema")
        return {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses ``input`` as chat messages (function calls as assistant ``tool_calls``,
    their outputs as ``tool`` messages, a reasoning item as the next assistant turn's
    ``reasoning_content``)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise InvalidRequestError("input must not be empty", field="input")
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequestError("an input item is an object", field=f"input.{i}")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"unknown role {role!r}", field=f"input.{i}.role")
            msg: dict[str, Any] = {"role": role,
                                   "content": _content(item.get("content"), f"input.{i}.content")}
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            messages.append(msg)
        elif kind == "function_call":
            call = {"id": _text(item, "call_id", i), "type": "function", "function": {
                "name": _text(item, "name", i), "arguments": _text(item, "arguments", i)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn's calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    messages[-1]["reasoning_content"], reasoning = reasoning, None
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": _text(item, "call_id", i),
                             "content": output})
        elif kind == "reasoning":
            parts = item.get("content") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise InvalidRequestError(f"input items of type {kind!r} are not supported",
                                      field=f"input.{i}.type")
    return messages


def turn_starts(conversation: list[dict[str, Any]]) -> list[int]:
    """Where each turn begins (a user message); what comes before the first (system or
    developer messages of the input) is never dropped."""
    return [i for i, m in enumerate(conversation) if m.get("role") == "user"]


def fit_turns(conversation: list[dict[str, Any]], fits: Any) -> list[dict[str, Any]]:
    """``truncation: auto``: the conversation without its oldest turns, as few dropped as make
    ``fits(messages)`` true (a binary search: dropping more never lengthens the prompt), the
    messages before the first turn kept. The last turn stays even when it alone does not fit
    (the context error then names the input)."""
    starts = turn_starts(conversation)
    if len(starts) < 2 or fits(conversation):
        return conversation
    head = conversation[:starts[0]]
    lo, hi = 1, len(starts) - 1  # the answer: the fewest dropped turns k with a fit
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(head + conversation[starts[mid]:]):
            hi = mid
        else:
            lo = mid + 1
    return head + conversation[starts[lo]:]


def _text(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{key} must be a string", field=f"input.{i}.{key}")
    return value


def _content(content: Any, field: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or parts (``input_text`` / ``output_text`` /
    ``input_image``) as chat's parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError("content is a string or a list of parts", field=field)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise InvalidRequestError(f"unsupported content part {kind!r}", field=f"{field}.{j}")
    return parts


CHAT_TO_RESPONSES_FIELDS = (
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("prompt_token_ids", "input"),
    ("prompt", "input"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("tool_choice.function.name", "tool_choice.name"),
    ("messages", "input"),
)


def responses_field(field: str | None) -> str | None:
    """A chat field an error named, as the Responses request spells it."""
    if field is None:
        return None
    if field.startswith("tools.") and ".function." in field:
        return field.replace(".function.", ".", 1)
    for chat, ours in CHAT_TO_RESPONSES_FIELDS:
        if field == chat or field.startswith(chat + "."):
            return ours + field[len(chat):]
    return field


def output_items(message: dict[str, Any], status: str,
                 logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A chat answer's message as Responses output items (``logprobs``: the answer's, on its
    text part)."""
    items: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if reasoning:  # as streamed: an empty think block makes no item
        answered = message.get("content") is not None or bool(message.get("tool_calls"))
        items.append({"id": new_request_id("rs"), "type": "reasoning", "summary": [],
                      "content": [{"type": "reasoning_text", "text": reasoning}],
                      "status": "completed" if answered else status})
    if message.get("content") is not None or not message.get("tool_calls"):
        items.append(message_item(message.get("content") or "", status, logprobs=logprobs))
    for call in message.get("tool_calls") or []:
        items.append(function_call_item(call["id"], call["function"]["name"],
                                        call["function"]["arguments"]))
    return items


def message_item(text: str, status: str, item_id: str | None = None,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": item_id or new_request_id("msg"), "type": "message", "role": "assistant",
            "status": status, "content": [text_part(text, logprobs)]}


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def function_call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": "fc_" + call_id.removeprefix("call_"), "type": "function_call",
            "call_id": call_id, "name": name, "arguments": arguments, "status": "completed"}


def items_as_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items as the chat messages a later turn puts before its input."""
    as_input = []
    for item in items:
        if item["type"] == "message":
            as_input.append({"type": "message", "role": "assistant",
                             "content": item["content"][0]["text"]})
        else:
            as_input.append(item)
    return input_messages(as_input) if as_input else []


def usage(acc_usage: dict[str, Any], reasoning_tokens: int) -> dict[str, Any]:
    prompt, completion = acc_usage["prompt_tokens"], acc_usage["completion_tokens"]
    cached = acc_usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached,
                                     "cache_write_tokens": prompt - cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt + completion}


def response_object(rid: str, created: float, model: str, body: ResponsesRequest,
                    status: str, output: list[dict[str, Any]],
                    usage_: dict[str, Any] | None) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": rid, "object": "response", "created_at": created, "model": model,
        "status": status, "output": output, "error": None, "incomplete_details": incomplete,
        "instructions": body.instructions, "metadata": body.metadata,
        "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "temperature": body.temperature, "top_p": body.top_p,
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": body.tools or [], "text": {"format": {"type": "text"}} if body.text is None
        else body.text.model_dump(by_alias=True, exclude_none=True),
        "store": body.store, "usage": usage_, "user": body.user,
        "completed_at": time.time() if status != "in_progress" else None,
    }


class Events:
    """Responses' streaming events from chat deltas: items open and close in order (reasoning,
    then the message, then function calls), every event numbered."""

    def __init__(self) -> None:
        self.seq = 0
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""
        self._pending: list[dict[str, Any]] = []
        """Logprobs of tokens not yet on a text delta (thinking, held tool-call text)."""
        self._logprobs: list[dict[str, Any]] = []
        """The open message's logprobs so far."""

    def logprobs(self, entries: list[dict[str, Any]]) -> None:
        """A delta's token logprobs: they go out with the next text delta (every token's, as
        vLLM's message carries them all: the thinking's and the calls' too)."""
        self._pending.extend(entries)

    def event(self, type_: str, **fields: Any) -> str:
        payload = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def reasoning(self, delta: str) -> list[str]:
        out = self._switch("reasoning")
        assert self._open is not None
        self._text += delta
        out.append(self.event("response.reasoning_text.delta", item_id=self._open["id"],
                              output_index=len(self.items), content_index=0, delta=delta))
        return out

    def content(self, delta: str) -> list[str]:
        out = self._switch("message")
        assert self._open is not None
        self._text += delta
        logprobs, self._pending = self._pending, []
        self._logprobs.extend(logprobs)
        out.append(self.event("response.output_text.delta", item_id=self._open["id"],
                              output_index=len(self.items), content_index=0, delta=delta,
                              logprobs=logprobs))
        return out

    def function_call(self, call_id: str, name: str, arguments: str) -> list[str]:
        out = self.close("completed")
        item = function_call_item(call_id, name, arguments)
        index = len(self.items)
        out.append(self.event("response.output_item.added", output_index=index,
                              item={**item, "arguments": "", "status": "in_progress"}))
        out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                              output_index=index, delta=arguments))
        out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                              output_index=index, arguments=arguments, name=name))
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out

    def _switch(self, kind: str) -> list[str]:
        if self._open is not None and self._open["type"] == kind:
            return []
        out = self.close("completed")
        index = len(self.items)
        if kind == "reasoning":
            self._open = {"id": new_request_id("rs"), "type": "reasoning", "summary": [],
                          "content": [], "status": "in_progress"}
            out.append(self.event("response.output_item.added", output_index=index,
                                  item=self._open))
            out.append(self.event("response.content_part.added", item_id=self._open["id"],
                                  output_index=index, content_index=0,
                                  part={"type": "reasoning_text", "text": ""}))
        else:
            self._open = {**message_item("", "in_progress"), "content": []}
            out.append(self.event("response.output_item.added", output_index=index,
                                  item=self._open))
            out.append(self.event("response.content_part.added", item_id=self._open["id"],
                                  output_index=index, content_index=0, part=text_part("")))
        self._text = ""
        self._logprobs = []
        return out

    def close(self, status: str) -> list[str]:
        """Close the open item (its done events); the next item starts after it."""
        item, self._open = self._open, None
        if item is None:
            return []
        index, text = len(self.items), self._text
        if item["type"] == "reasoning":
            done = {**item, "content": [{"type": "reasoning_text", "text": text}],
                    "status": status}
            out = [self.event("response.reasoning_text.done", item_id=item["id"],
                              output_index=index, content_index=0, text=text),
                   self.event("response.content_part.done", item_id=item["id"],
                              output_index=index, content_index=0,
                              part={"type": "reasoning_text", "text": text})]
        else:
            out = []
            if self._pending:  # the last tokens' logprobs, on a delta of no text
                self._open = item
                out += self.content("")
                self._open = None
            logprobs = self._logprobs
            done = message_item(text, status, item["id"], logprobs)
            out += [self.event("response.output_text.done", item_id=item["id"],
                               output_index=index, content_index=0, text=text,
                               logprobs=logprobs),
                    self.event("response.content_part.done", item_id=item["id"],
                               output_index=index, content_index=0,
                               part=text_part(text, logprobs))]
        out.append(self.event("response.output_item.done", output_index=index, item=done))
        self.items.append(done)
        return out


class ResponseStore:
    """Stored responses (``store: true``) and each one's conversation: the most recent
    ``capacity`` within ``max_bytes`` (an entry larger than that alone is not kept);
    thread-safe."""

    def __init__(self, capacity: int = STORE_MAX_RESPONSES,
                 max_bytes: int = STORE_MAX_BYTES) -> None:
        self.capacity, self.max_bytes = capacity, max_bytes
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = \
            OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        """Keep it (evicting the oldest as needed); False when it alone is too large."""
        size = len(json.dumps([response, conversation], separators=(",", ":")))
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(response["id"], None)
            if old is not None:
                self.bytes -= old[2]
            self._items[response["id"]] = (response, conversation, size)
            self.bytes += size
            while len(self._items) > self.capacity or self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][2]
        return True

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        with self._lock:
            got = self._items.get(rid)
        return None if got is None else (got[0], got[1])

    def delete(self, rid: str) -> bool:
        with self._lock:
            got = self._items.pop(rid, None)
            if got is not None:
                self.bytes -= got[2]
        return got is not None

    def __len__(self) -> int:
        return len(self._items)
