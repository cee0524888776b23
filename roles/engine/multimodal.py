"""Multimodal inputs of one request: where its images sit in the prompt, and their embeddings.

Owns (1) reading ``multi_modal_data`` in vLLM's form, (2) expanding each image
placeholder token to the image's feature tokens, (3) the extra block-hash keys (a block
that overlaps an image's placeholder range carries that image's content hash, so equal
tokens with different images never share KV), and (4) the embedding rows a step's chunk
needs (a chunk may start or end inside an image's range). Image decoding and the vision
tower are the encoder's (roles/encoder.py); this module only sees embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitserve.errors import InvalidRequestError
from splitserve.hashing import hash_bytes

Tensor = torch.Tensor
FIELD = "multi_modal_data"
_KEYS = frozenset({"image", "image_embeds", "image_hashes"})


@dataclass(frozen=True)
class ImagePlaceholder:
    """Prompt positions [offset, offset + length) hold one image's embeddings."""

    offset: int
    length: int
    content_hash: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultiModalInputs:
    """The images of one request, in prompt order; kept until it finishes (recompute
    after preemption or a failed KV pull needs them again)."""

    placeholders: list[ImagePlaceholder]
    embeds: list[Tensor]  # per image [length, H]

    def block_extra_keys(
        self, first_block: int, num_blocks: int, block_size: int
    ) -> list[list[int]]:
        """Extra hash keys of blocks [first_block, first_block + num_blocks): the content
        hashes of the images that overlap each block."""
        keys: list[list[int]] = []
        for b in range(first_block, first_block + num_blocks):
            lo, hi = b * block_size, (b + 1) * block_size
            keys.append([p.content_hash for p in self.placeholders if p.offset < hi and p.end > lo])
        return keys

    def rows_in(self, start: int, end: int) -> list[tuple[int, Tensor]]:
        """(row offset in the chunk, embedding rows) for the tokens [start, end) that are
        image positions."""
        rows = []
        for p, e in zip(self.placeholders, self.embeds, strict=True):
            lo, hi = max(start, p.offset), min(end, p.end)
            if lo < hi:
                rows.append((lo - start, e[lo - p.offset : hi - p.offset]))
        return rows


# --------------------------------------------------------------------------- intake


def split_prompt(prompt: Any, multi_modal_data: Any) -> tuple[Any, Any]:
    """vLLM's dict prompt ({"prompt" | "prompt_token_ids", "multi_modal_data"}) -> (prompt,
    multi_modal_data); other prompts pass through."""
    if not isinstance(prompt, dict):
        return prompt, multi_modal_data
    if "prompt_token_ids" in prompt:
        inner = prompt["prompt_token_ids"]
    elif "prompt" in prompt:
        inner = prompt["prompt"]
    else:
        raise InvalidRequestError("a dict prompt needs 'prompt' or 'prompt_token_ids'", "prompt")
    data = prompt.get("multi_modal_data")
    if data is not None and multi_modal_data is not None:
        raise InvalidRequestError("multi_modal_data given twice", field=FIELD)
    return inner, data if data is not None else multi_modal_data


def check_data(data: Any) -> tuple[str, list[Any]]:
    """("image" | "image_embeds", the items as a list) after checking the keys."""
    if not isinstance(data, dict):
        raise InvalidRequestError("multi_modal_data must be an object", field=FIELD)
    unknown = set(data) - _KEYS
    if unknown:
        raise InvalidRequestError(
            f"unsupported multi_modal_data keys {sorted(unknown)}; supported: {sorted(_KEYS)}",
            field=FIELD,
        )
    if ("image" in data) == ("image_embeds" in data):
        raise InvalidRequestError(
            "multi_modal_data needs exactly one of 'image' and 'image_embeds'", field=FIELD
        )
    kind = "image" if "image" in data else "image_embeds"
    items = data[kind]
    if kind == "image_embeds" and _ndim(items) in (2, 3):
        items = [items] if _ndim(items) == 2 else list(items)
    elif not isinstance(items, list | tuple):
        items = [items]
    if not items:
        raise InvalidRequestError(f"multi_modal_data.{kind} is empty", field=f"{FIELD}.{kind}")
    return kind, list(items)


def _ndim(x: Any) -> int:
    return x.ndim if isinstance(x, np.ndarray | Tensor) else -1


def check_embeds(items: list[Any], hashes: Any, hidden_size: int) -> tuple[list[Tensor], list[int]]:
    """Precomputed embeddings as float tensors [num_tokens, H], and their content hashes
    (hashed from the embeddings' bytes when the caller sends none)."""
    field = f"{FIELD}.image_embeds"
    embeds = []
    for i, item in enumerate(items):
        try:
            t = torch.as_tensor(np.asarray(item, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"image_embeds[{i}] is not a float array ({e})", field) from e
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != hidden_size:
            raise InvalidRequestError(
                f"image_embeds[{i}] has shape {tuple(t.shape)}; expected [num_tokens, "
                f"{hidden_size}]",
                field,
            )
        embeds.append(t)
    if hashes is None:
        return embeds, [hash_bytes(e.numpy().tobytes()) for e in embeds]
    if (
        not isinstance(hashes, list | tuple)
        or len(hashes) != len(embeds)
        or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes)
    ):
        raise InvalidRequestError(
            f"image_hashes must be {len(embeds)} integers, one per image_embeds entry",
            field=f"{FIELD}.image_hashes",
        )
    return embeds, list(hashes)


def expand_placeholders(
    token_ids: Sequence[int], image_token_id: int, lengths: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(token ids with each image's placeholder expanded to its length, offsets of images).

    One placeholder per image (as users write prompts) is expanded; a prompt that already
    holds every image's full run (a replayed or forwarded request) is kept as it is.
    """
    positions = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(positions) == len(lengths):
        out: list[int] = []
        offsets = []
        prev = 0
        for pos, n in zip(positions, lengths, strict=True):
            out.extend(token_ids[prev:pos])
            offsets.append(len(out))
            out.extend([image_token_id] * n)
            prev = pos + 1
        out.extend(token_ids[prev:])
        return out, offsets
    if len(positions) == sum(lengths):
        offsets, k = [], 0
        for n in lengths:
            run = positions[k : k + n]
            if run[-1] - run[0] != n - 1:
                break
            offsets.append(run[0])
            k += n
        else:
            return list(token_ids), offsets
    raise InvalidRequestError(
        f"the prompt has {len(positions)} image placeholder tokens (id {image_token_id}) but "
        f"multi_modal_data has {len(lengths)} images; put one placeholder per image",
        field=FIELD,
    )
