"""Tokenizer: a thin wrapper over a Hugging Face fast tokenizer (from a folder or a GGUF)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from splitserve.errors import InvalidRequestError


class Tokenizer:
    """Encode, decode and chat templates, with the special tokens the engine needs."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Sequence[int] = ()) -> None:
        self.hf = hf_tokenizer
        eos = {hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = frozenset(eos | set(extra_eos_ids))
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

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (``tools``: OpenAI
        tool definitions, for templates that render them; others ignore them)."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model has no chat template", field="messages")
        _check_messages(messages)
        ids = self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True,
            tools=tools or None,
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        return self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content'", field="messages"
            )
