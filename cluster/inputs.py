"""Prompt intake on the cluster's side: tokenize and validate a prompt, check and hash its
images and expand their placeholders, all before anything is placed.

Owns `PreparedInput` and `InputPreparer`; the checks themselves are the engine's
(``splitserve/validation.py``), so both refuse the same prompts. It must not place requests,
call workers or keep state between prompts: a prompt that fails here has touched nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.errors import InvalidRequestError
from splitserve.roles.engine.multimodal import (
    ImagePlaceholder,
    MultiModalInputs,
    check_data,
    expand_placeholders,
    split_prompt,
)
from splitserve.roles.models.image import image_hash, load_image
from splitserve.sampling_params import SamplingParams
from splitserve.validation import (
    check_n,
    check_priority,
    check_prompt_length,
    check_token_ids,
    prompt_token_ids,
    truncate_prompt,
)


@dataclasses.dataclass
class PreparedInput:
    """A validated prompt: token ids (image placeholders expanded) and its images."""

    ids: list[int]
    images: list[Any] = dataclasses.field(default_factory=list)
    """The images as given (bytes, base64, data URL, PIL); the encode worker decodes them."""
    image_hashes: list[int] = dataclasses.field(default_factory=list)
    """Content hashes (of the decoded pixels, as the engines compute them)."""
    extra_keys: list[list[int]] | None = None
    """Per full block, the image hashes mixed into its block hash (routing = engines' hashes)."""


@dataclasses.dataclass(frozen=True)
class InputPreparer:
    """Turns a prompt (text, token ids, or a dict with ``multi_modal_data``) into a
    `PreparedInput` the way an engine would check it."""

    model_id: str
    model_config: Any
    tokenizer: Any
    max_model_len: int
    block_size: int
    max_n: int = 16
    """Most samples per request (``ClusterConfig.max_n``)."""
    scheduling_policy: str = "fcfs"
    """The workers' (``ClusterConfig.scheduling_policy``): a priority needs ``priority``."""

    def prepare(self, prompt: Any, params: SamplingParams | None = None) -> PreparedInput:
        """Tokenize and check a prompt (cut to ``params.truncate_prompt_tokens``, as the
        engines would); raises InvalidRequestError naming the field."""
        data = None
        if isinstance(prompt, dict):
            prompt, data = split_prompt(prompt, None)
        ids = prompt_token_ids(prompt, self.tokenizer.encode, self.model_config.vocab_size)
        ids = truncate_prompt(ids, params, self.max_model_len, data is not None)
        inp = PreparedInput(ids) if data is None else self._with_images(ids, data)
        check_prompt_length(len(inp.ids), self.max_model_len)
        return inp

    def check_params(self, params: SamplingParams) -> None:
        """Sampling checks the engines would make too (``n`` within ``max_n``, ``logit_bias``
        and ``allowed_token_ids`` within the vocabulary), made here."""
        check_n(params.n, self.max_n)
        check_token_ids(params, self.model_config.vocab_size)
        check_priority(params.priority, self.scheduling_policy, "this cluster")

    def _with_images(self, ids: list[int], data: Any) -> PreparedInput:
        """Check and hash a multimodal prompt's images on the frontend (a malformed image
        fails here, before anything is placed) and expand its placeholders."""
        llava = self.model_config.llava
        if llava is None:
            raise InvalidRequestError(
                f"the model {self.model_id!r} is text-only; it takes no images",
                field="multi_modal_data",
            )
        kind, items = check_data(data)
        if kind != "image":
            raise InvalidRequestError(
                "the cluster takes images; its encode workers compute the embeddings",
                field="multi_modal_data.image_embeds",
            )
        hashes = [image_hash(load_image(x)) for x in items]
        n = llava.num_image_tokens
        ids, offsets = expand_placeholders(ids, llava.image_token_id, [n] * len(items))
        places = [ImagePlaceholder(o, n, h) for o, h in zip(offsets, hashes, strict=True)]
        bs = self.block_size
        extra = MultiModalInputs(places, []).block_extra_keys(0, len(ids) // bs, bs)
        return PreparedInput(ids, list(items), hashes, extra)
