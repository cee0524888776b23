"""Prompt building shared by the HTTP and gRPC frontends: chat messages to token ids.

Owns the rules for message content (plain strings or OpenAI content parts) and the refusal of
inputs the backend cannot serve yet (images, until a multimodal model is served). Must not run
requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from splitserve.errors import InvalidRequestError

_ROLES = ("system", "user", "assistant", "tool", "developer")


def new_request_id(prefix: str) -> str:
    """A unique request id such as ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_prompt_ids(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of ``messages`` under the model's chat template; raises InvalidRequestError."""
    if not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    flat = [_flatten_message(i, m) for i, m in enumerate(messages)]
    return list(tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt))


def _flatten_message(i: int, message: dict[str, Any]) -> dict[str, str]:
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"messages[{i}].role must be one of {list(_ROLES)}, got {role!r}",
            field=f"messages[{i}].role",
        )
    content = message.get("content")
    return {"role": str(role), "content": _content_text(i, content)}


def _content_text(i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{i}].content must be a string or a list of content parts",
            field=f"messages[{i}].content",
        )
    return "".join(_part_text(i, j, part) for j, part in enumerate(content))


def _part_text(i: int, j: int, part: Any) -> str:
    where = f"messages[{i}].content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind in ("image_url", "input_image", "image"):
        raise InvalidRequestError(
            f"{where}: image inputs need a multimodal model; the served model is text-only",
            field=where,
        )
    raise InvalidRequestError(
        f"{where} must be a content part of type 'text' with a string 'text'", field=where
    )
