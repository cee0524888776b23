"""Embeddings: a prompt's final hidden states pooled into one vector (``SamplingParams.pooling``).

Owns: the engine's pooler (type and normalization: the model folder's sentence-transformers
config, ``EngineConfig.pooler_config`` over it), a request's resolved ``Pool``, the runner's
per-chunk partial results and the final vector. Must not: schedule (a pooled request is an
ordinary one-token request to the scheduler) or touch HTTP.

A chunked prompt's pieces arrive step by step: MEAN adds each chunk's rows in float64 (so the
float32 result does not depend on where the chunks were cut, that is on the batch), CLS keeps
position 0's row, LAST the last prompt position's. MEAN and CLS need every position computed
here, so such a request reads nothing from the prefix cache (as prompt logprobs); LAST needs
only the last position, which a fully cached prompt recomputes anyway.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splitserve.errors import InvalidRequestError
from splitserve.sampling_params import PoolingParams

logger = logging.getLogger(__name__)

_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
             "pooling_mode_cls_token": "CLS"}


@dataclass(frozen=True)
class Pooler:
    """The engine's defaults for requests that leave a field out."""

    pooling_type: str = "LAST"
    normalize: bool = True
    source: str = "default"
    """Where the values came from (the folder's config, ``pooler_config``, the default)."""


@dataclass(frozen=True)
class Pool:
    """One request's resolved pooling."""

    kind: str
    normalize: bool
    dimensions: int | None

    @property
    def whole_prompt(self) -> bool:
        """Every prompt position must be computed by this engine (no prefix cache reads)."""
        return self.kind != "LAST"


def model_pooler(path: str | Path, override: dict[str, Any] | None = None) -> Pooler:
    """The pooler of the model at ``path``: a sentence-transformers folder's Pooling module
    (``modules.json`` -> its ``config.json``: last token, mean or CLS) and Normalize module,
    else LAST with normalization (vLLM's default for a decoder); ``override`` over both."""
    kind, normalize, source = "LAST", True, "default"
    folder = Path(path)
    modules_file = folder / "modules.json" if folder.is_dir() else None
    if modules_file is not None and modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text())
            types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
            if "Pooling" in types:
                cfg = json.loads((folder / types["Pooling"]["path"] / "config.json").read_text())
                modes = [mode for key, mode in _ST_MODES.items() if cfg.get(key)]
                others = [k for k, v in cfg.items()
                          if k.startswith("pooling_mode_") and v and k not in _ST_MODES]
                if len(modes) == 1 and not others:
                    kind = modes[0]
                else:
                    logger.warning("%s: pooling %s is not served; embeddings pool the last "
                                   "token instead", folder, modes + others)
            normalize = "Normalize" in types
            source = str(modules_file)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("%s: unreadable sentence-transformers config (%s); embeddings "
                           "pool the last token, normalized", modules_file, e)
    if override:
        kind = override.get("pooling_type", kind)
        normalize = override.get("normalize", normalize)
        source = "pooler_config"
    return Pooler(kind, normalize, source)


def resolve(params: PoolingParams, pooler: Pooler, hidden_size: int) -> Pool:
    """A request's pooling with the engine's defaults filled in; refuses ``dimensions``
    above the hidden size."""
    dims = params.dimensions
    if dims is not None and dims > hidden_size:
        raise InvalidRequestError(
            f"dimensions must be at most the model's hidden size {hidden_size}, got {dims}",
            field="dimensions")
    return Pool(params.pooling_type or pooler.pooling_type,
                pooler.normalize if params.normalize is None else params.normalize, dims)


def chunk_part(pool: Pool, rows: Tensor, start: int, num_prompt: int) -> Tensor | None:
    """What a chunk of prompt rows ``[start, start + len(rows))`` adds (None: nothing)."""
    if pool.kind == "MEAN":
        return rows.to(torch.float64).sum(0)
    if pool.kind == "CLS":
        return rows[0].float() if start == 0 else None
    return rows[-1].float() if start + rows.shape[0] == num_prompt else None


def combine(pool: Pool, acc: Tensor | None, part: Tensor, start: int) -> Tensor:
    """The running result after a chunk's part (a chunk at position 0 restarts it: the
    prompt was recomputed after a preemption)."""
    if pool.kind == "MEAN" and acc is not None and start > 0:
        return acc + part
    return part


def finish(pool: Pool, acc: Tensor, num_prompt: int) -> list[float]:
    """The embedding: the mean's division, the cut to ``dimensions``, the normalization."""
    vec = (acc / num_prompt).float() if pool.kind == "MEAN" else acc.float()
    if pool.dimensions is not None:
        vec = vec[: pool.dimensions]
    if pool.normalize:
        vec = torch.nn.functional.normalize(vec, dim=0)
    return [float(x) for x in vec.tolist()]
