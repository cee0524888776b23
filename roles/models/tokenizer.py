"""Tokenizer: a thin wrapper over a Hugging Face fast tokenizer (from a folder or a GGUF)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jinja2.exceptions import TemplateError

from splitserve.errors import ConfigError, InvalidRequestError
from splitserve.roles.models import generation_config as gen_config


class Tokenizer:
    """Encode, decode and chat templates, with the special tokens the engine needs."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Sequence[int] = (),
                 generation_config: gen_config.GenerationConfig = gen_config.EMPTY) -> None:
        self.hf = hf_tokenizer
        eos = {hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = frozenset(eos | set(extra_eos_ids)
                                       | set(generation_config.eos_token_ids))
        self.generation_config = generation_config
        """The model folder's ``generation_config.json`` (its end ids are in ``eos_token_ids``;
        its sampling defaults apply where a frontend or ``LLM`` says so)."""
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.vocab_size = len(hf_tokenizer)
        # the Rust tokenizer's own decode, when transformers' wrapper would add nothing to it
        # (no clean-up of spaces): the detokenizer decodes twice per token, and the wrapper's
        # argument handling cost ~5x the decode itself
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        self._backend_decode = (
            backend.decode
            if backend is not None and hasattr(backend, "decode")
            and not getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)
            else None
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(list(token_ids), skip_special_tokens=skip_special_tokens)  # type: ignore[no-any-return]
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.hf.convert_ids_to_tokens(token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def set_chat_template(self, template: str, name: str = "chat_template") -> None:
        """Use ``template`` (Jinja text, e.g. from ``load_chat_template``) instead of the
        model's chat template (vLLM's ``--chat-template``). It must render a one-message
        conversation first: a template that cannot is refused naming ``name``
        (ConfigError), and the model's stays."""
        try:
            self.hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True, chat_template=template)
        except Exception as e:  # noqa: BLE001 - jinja2 and transformers raise many types
            raise ConfigError(f"{name}: the template does not render a one-message "
                              f"conversation ({type(e).__name__}: {e})") from e
        self.hf.chat_template = template

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None, *, continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (``tools``: OpenAI
        tool definitions, for templates that render them; others ignore them).
        ``continue_final_message``: end inside the last (assistant) message, for the model to
        go on with it (vLLM's extra; not with ``add_generation_prompt``).
        ``template_kwargs``: more variables for the template (vLLM's ``chat_template_kwargs``,
        e.g. Qwen3's ``enable_thinking``); the renderer's own argument names are refused.
        ``chat_template``: Jinja text rendered instead of the model's (``LLM.chat``'s, as
        vLLM's; the HTTP API refuses a request's own)."""
        if chat_template is None and not self.has_chat_template:
            raise InvalidRequestError("this model has no chat template", field="messages")
        _check_messages(messages)
        extra = check_template_kwargs(template_kwargs)
        if continue_final_message:
            if add_generation_prompt:
                raise InvalidRequestError(
                    "continue_final_message cannot be combined with add_generation_prompt "
                    "(set add_generation_prompt to false)", field="continue_final_message")
            if messages[-1].get("role") != "assistant":
                raise InvalidRequestError(
                    "continue_final_message needs the last message to be the assistant's",
                    field="continue_final_message")
        try:
            ids = self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                tools=tools or None, continue_final_message=continue_final_message,
                chat_template=chat_template, **extra,
            )
        except TemplateError as e:  # the template's own refusal (roles must alternate...)
            raise InvalidRequestError(f"the chat template refused the messages: {e}",
                                      field="messages") from e
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        return self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )


def load_chat_template(value: str, name: str = "--chat-template") -> str:
    """The template ``value`` names, as vLLM's ``--chat-template`` reads it: a file's text,
    or ``value`` itself when it is Jinja (holds ``{{`` or ``{%``). Anything else is refused
    naming ``name`` (a path that does not exist is the usual mistake)."""
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}: cannot read {value!r} ({e})") from e
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"{name}: {value!r} is neither a file nor a Jinja template")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content'", field="messages"
            )


TEMPLATE_RESERVED = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "return_tensors", "padding",
    "truncation", "max_length", "chat_template", "tokenizer_kwargs",
    "return_assistant_tokens_mask",
})
"""Arguments of the template renderer itself: not template variables a request may set."""

MAX_TEMPLATE_KWARGS = 64


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """A request's ``chat_template_kwargs``, checked: a mapping of at most 64 names, none of
    them one of the renderer's own arguments."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InvalidRequestError("chat_template_kwargs must be an object",
                                  field="chat_template_kwargs")
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise InvalidRequestError(
            f"chat_template_kwargs has {len(kwargs)} names; at most {MAX_TEMPLATE_KWARGS}",
            field="chat_template_kwargs")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier() or key in TEMPLATE_RESERVED:
            raise InvalidRequestError(
                f"chat_template_kwargs cannot set {key!r} (not a template variable name, or "
                "an argument of the renderer: use the request's own field)",
                field=f"chat_template_kwargs.{key}")
    return dict(kwargs)
