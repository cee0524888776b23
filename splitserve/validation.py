"""The one set of request checks that the cluster (before placement) and the engine (on intake)
both run, so that they can never disagree: a prompt as text or token ids, its length against
the context, the number of samples ``n``, and the token ids a request's sampling parameters
name (``logit_bias``, ``allowed_token_ids``).

Each check raises InvalidRequestError naming the field (HTTP 400 / gRPC INVALID_ARGUMENT).
Imports nothing heavy (no torch, no Ray); it owns no state and tokenizes only through the
callable it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from splitserve.errors import InvalidRequestError


def prompt_token_ids(
    prompt: str | Sequence[Any], encode: Callable[[str], Sequence[int]], vocab_size: int
) -> list[int]:
    """Token ids of a text prompt (``encode``d) or a token-id prompt, checked: not empty, every
    id a plain ``int`` (``bool`` is not one) in ``[0, vocab_size)``."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        encoded = list(encode(prompt))
        if not encoded:  # e.g. only control characters the tokenizer drops
            raise InvalidRequestError(
                f"prompt {prompt[:40]!r} encodes to no tokens", field="prompt"
            )
        return encoded
    if isinstance(prompt, bytes | bytearray) or not isinstance(prompt, Sequence):
        raise InvalidRequestError(
            f"prompt must be text or a list of token ids, got {type(prompt).__name__}",
            field="prompt",
        )
    token_ids = list(prompt)
    if not token_ids:
        raise InvalidRequestError("prompt must not be empty", field="prompt")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
           for t in token_ids):
        raise InvalidRequestError(
            f"prompt token ids must be integers in [0, {vocab_size})", field="prompt_token_ids"
        )
    return token_ids


def truncate_prompt(token_ids: list[int], params: Any, max_model_len: int,
                    has_images: bool = False) -> list[int]:
    """The prompt's last ``params.truncate_prompt_tokens`` ids (-1: the last
    ``max_model_len``), as vLLM truncates; the ids unchanged when it is unset. A prompt with
    images is refused (a cut could split an image's placeholders)."""
    k = getattr(params, "truncate_prompt_tokens", None)
    if k is None:
        return token_ids
    if has_images:
        raise InvalidRequestError("truncate_prompt_tokens cannot cut a prompt with images",
                                  field="truncate_prompt_tokens")
    if k > max_model_len:
        raise InvalidRequestError(
            f"truncate_prompt_tokens ({k}) is above the model's context length "
            f"(max_model_len {max_model_len})", field="truncate_prompt_tokens")
    k = max_model_len if k == -1 else k
    return token_ids[-k:]


def check_prompt_length(num_tokens: int, max_model_len: int) -> None:
    """A prompt must leave room for at least one generated token."""
    if num_tokens >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {num_tokens} tokens; the model's context length (max_model_len) is "
            f"{max_model_len}, which leaves no room to generate",
            field="prompt",
        )


def check_priority(priority: int, scheduling_policy: str, who: str) -> None:
    """A non-zero ``priority`` needs priority scheduling (as vLLM refuses it under fcfs);
    ``who``: what refuses it (this engine, this cluster)."""
    if priority != 0 and scheduling_policy != "priority":
        raise InvalidRequestError(
            f"priority {priority} needs priority scheduling (scheduling_policy priority, serve "
            f"--scheduling-policy priority); {who} serves fcfs", field="priority")


def check_n(n: int, max_n: int) -> None:
    """At most ``max_n`` samples per request (each is a sequence the scheduler must run)."""
    if n > max_n:
        raise InvalidRequestError(
            f"n={n} is above this server's limit of {max_n} samples per request (max_n)",
            field="n",
        )


def check_token_ids(params: Any, vocab_size: int) -> None:
    """Every token id a request's ``logit_bias`` and ``allowed_token_ids`` name is in
    ``[0, vocab_size)`` (SamplingParams checked their types and ranges)."""
    for name in ("logit_bias", "allowed_token_ids"):
        bad = sorted(t for t in getattr(params, name) or () if t >= vocab_size)
        if bad:
            raise InvalidRequestError(
                f"{name} names token id {bad[0]}, outside the vocabulary [0, {vocab_size})",
                field=name,
            )
