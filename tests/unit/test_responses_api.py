"""The Responses API's pieces that need no server: input items as chat messages, error fields
named as the Responses request spells them, and the store's bounds."""

from __future__ import annotations

import json

import pytest

from splitserve.cluster.frontends.responses_api import (
    ResponseStore,
    input_messages,
    items_as_messages,
    output_items,
    responses_field,
)
from splitserve.errors import InvalidRequestError


def test_input_items_as_chat_messages() -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                     {"type": "input_image", "image_url": "data:x"}]},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": {"ok": True}},
    ]
    assert input_messages(items) == [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": None, "reasoning_content": "hm", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'},
    ]
    assert input_messages("hello") == [{"role": "user", "content": "hello"}]


def test_output_items_round_trip_as_the_next_turns_messages() -> None:
    message = {"content": "It is sunny.", "reasoning_content": "look it up",
               "tool_calls": [{"id": "call_7", "function": {"name": "f", "arguments": "{}"}}]}
    items = output_items(message, "completed")
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    assert items_as_messages(items) == [  # one assistant turn: its thinking, text and calls
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "look it up",
         "tool_calls": [{"id": "call_7", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
    ]
    # an empty answer is an empty message; an empty think block makes no item
    assert [i["type"] for i in output_items({"content": None, "reasoning_content": ""},
                                            "completed")] == ["message"]


@pytest.mark.parametrize(("items", "field"), [
    ([], "input"),
    ([3], "input.0"),
    ([{"type": "item_reference", "id": "x"}], "input.0.type"),
    ([{"role": "robot", "content": "x"}], "input.0.role"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "input.0.content.0"),
    ([{"role": "user"}], "input.0.content"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input.0.call_id"),
])
def test_bad_items_name_their_field(items, field) -> None:
    with pytest.raises(InvalidRequestError) as e:
        input_messages(items)
    assert e.value.field == field


@pytest.mark.parametrize(("chat", "ours"), [
    ("max_completion_tokens", "max_output_tokens"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("tools.3.function.parameters", "tools.3.parameters"),
    ("tool_choice.function.name", "tool_choice.name"),
    ("messages.2.content", "input.2.content"),
    ("temperature", "temperature"),
    (None, None),
])
def test_chat_fields_named_as_responses_fields(chat, ours) -> None:
    assert responses_field(chat) == ours


def test_store_bounds() -> None:
    """The newest within the count and byte budgets; an entry larger than the budget alone
    is refused, not stored by evicting everything."""
    store = ResponseStore(capacity=3, max_bytes=4000)
    for i in range(5):
        assert store.put({"id": f"r{i}"}, [{"role": "user", "content": "x" * 100}])
    assert [r for r in ("r0", "r1", "r2", "r3", "r4") if store.get(r)] == ["r2", "r3", "r4"]
    assert store.put({"id": "big"}, [{"role": "user", "content": "y" * 1500}])
    assert store.put({"id": "big2"}, [{"role": "user", "content": "y" * 1500}])
    assert store.get("r2") is None and store.bytes <= 4000  # evicted for bytes, not count
    assert not store.put({"id": "huge"}, [{"role": "user", "content": "z" * 5000}])
    assert store.get("huge") is None and store.get("big2") is not None
    assert store.delete("big2") and not store.delete("big2")
    kept = [store.get(r) for r in ("r3", "r4", "big")]
    assert store.bytes == sum(len(json.dumps(list(k), separators=(",", ":")))
                              for k in kept if k is not None)
