"""Prompt building shared by the HTTP and gRPC frontends: chat messages to token ids.

Owns the rules for message content (plain strings or OpenAI content parts): text parts, and
``image_url`` parts (data URLs) for a multimodal model, each becoming the model's image
placeholder token where it stood; a text-only model refuses images. Must not run requests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from splitserve.errors import InvalidRequestError

_ROLES = ("system", "user", "assistant", "tool", "developer")


MAX_CLIENT_REQUEST_ID_CHARS = 128


def check_client_request_id(value: str, field: str) -> str:
    """A client's request id (HTTP ``X-Request-Id``, gRPC ``request_id``): 1..128 printable
    characters, or InvalidRequestError naming ``field``. It travels with the request to the
    workers and into logs, so it gets the same bound on every frontend."""
    if not 0 < len(value) <= MAX_CLIENT_REQUEST_ID_CHARS or not value.isprintable():
        raise InvalidRequestError(
            f"{field} must be 1..{MAX_CLIENT_REQUEST_ID_CHARS} printable characters", field=field)
    return value


def new_request_id(prefix: str) -> str:
    """A unique request id such as ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_prompt_ids(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
    image_token: str | None = None, *, continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of ``messages`` under the model's chat template; raises InvalidRequestError.

    Images (multimodal models only) stay as their placeholder token; see ``chat_prompt``."""
    return chat_prompt(tokenizer, messages, add_generation_prompt, image_token,
                       continue_final_message=continue_final_message,
                       template_kwargs=template_kwargs)[0]


def chat_prompt(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
    image_token: str | None = None, tools: list[dict[str, Any]] | None = None, *,
    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], list[str]]:
    """(token ids, image data URLs in order). ``image_token``: the multimodal model's
    placeholder (``<image>``), put where each image part stood, as vLLM does; None refuses
    images (a text-only model). ``tools``: OpenAI tool definitions for the template.
    ``continue_final_message`` and ``template_kwargs`` (vLLM's ``chat_template_kwargs``): see
    ``Tokenizer.apply_chat_template``."""
    if not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    images: list[str] = []
    flat = [_flatten_message(i, m, image_token, images) for i, m in enumerate(messages)]
    kwargs: dict[str, Any] = {"tools": tools} if tools else {}
    if continue_final_message:
        kwargs["continue_final_message"] = True
    if template_kwargs:
        kwargs["template_kwargs"] = template_kwargs
    ids = tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
    return list(ids), images


def _flatten_message(
    i: int, message: dict[str, Any], image_token: str | None, images: list[str]
) -> dict[str, Any]:
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"messages[{i}].role must be one of {list(_ROLES)}, got {role!r}",
            field=f"messages[{i}].role",
        )
    content = message.get("content")
    if content is None and role != "assistant":  # only an assistant turn may be calls alone
        raise InvalidRequestError(f"messages[{i}].content is required in a {role} message",
                                  field=f"messages[{i}].content")
    flat: dict[str, Any] = {
        "role": str(role), "content": _content_text(i, content, image_token, images)
    }
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            flat[key] = message[key]
    if message.get("tool_calls"):
        flat["tool_calls"] = _template_tool_calls(i, message["tool_calls"])
    return flat


def _template_tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant turn's calls with ``arguments`` as objects (what templates index into)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequestError(f"{where} must be a list", field=where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(
                f"{where}[{j}] must have function.name", field=f"{where}[{j}].function"
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise InvalidRequestError(
                    f"{where}[{j}].function.arguments is not valid JSON: {e}",
                    field=f"{where}[{j}].function.arguments",
                ) from e
        out.append({**call, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _content_text(i: int, content: Any, image_token: str | None, images: list[str]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{i}].content must be a string or a list of content parts",
            field=f"messages[{i}].content",
        )
    return "".join(
        _part_text(i, j, part, image_token, images) for j, part in enumerate(content)
    )


def _part_text(i: int, j: int, part: Any, image_token: str | None, images: list[str]) -> str:
    where = f"messages[{i}].content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind in ("image_url", "input_image", "image"):
        if image_token is None:
            raise InvalidRequestError(
                f"{where}: image inputs need a multimodal model; the served model is text-only",
                field=where,
            )
        images.append(_image_data_url(part, kind, where))
        return image_token
    raise InvalidRequestError(
        f"{where} must be a content part of type 'text' with a string 'text', or "
        "'image_url'", field=where,
    )


def _image_data_url(part: dict[str, Any], kind: str, where: str) -> str:
    """The part's image as a data URL, checked to decode (a bad image is this part's 400)."""
    from splitserve.roles.models.image import load_image

    value = part.get("image_url", part.get("image"))
    url = value.get("url") if isinstance(value, dict) else value
    field = f"{where}.image_url" if kind != "image" else f"{where}.image"
    if not isinstance(url, str) or not url:
        raise InvalidRequestError(f"{field} must be a data URL string", field=field)
    if url.startswith(("http://", "https://", "file:")):
        raise InvalidRequestError(
            f"{field}: remote and file image URLs are not fetched; send the image inline as a "
            "data:image/...;base64 URL", field=field,
        )
    load_image(url, field=field)  # raises InvalidRequestError naming the field
    return url
