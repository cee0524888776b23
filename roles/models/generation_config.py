"""A model folder's ``generation_config.json``: the sampling defaults its authors chose and the
end-of-sequence ids it adds, read as vLLM reads them (``--generation-config auto``).

Qwen3's file, for one, asks for temperature 0.6, top_p 0.95 and top_k 20, and Llama 3.1
Instruct's lists three end ids where ``config.json`` may name one. vLLM applies the sampling
values to every request field the client left unset (``get_diff_sampling_param``) and stops on
the extra end ids; serving the same folder here without them would sample differently and run
past the end of an answer.

``resolve`` picks the source as vLLM's flag does: ``auto`` (the model folder's file), ``vllm``
(none: the OpenAI / vLLM neutral defaults; the end ids still apply, as vLLM's) or a folder
holding a ``generation_config.json``. Torch-free; the loader reads it beside the tokenizer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.errors import ConfigError, InvalidRequestError, ModelLoadError

FILE = "generation_config.json"
SAMPLING_KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature",
                 "top_k", "top_p", "min_p", "max_new_tokens")
"""The keys vLLM takes from the file (``max_new_tokens`` as ``max_tokens``); ``do_sample`` and
the beam-search keys are not among them, as in vLLM."""
SOURCES = ("auto", "vllm")


@dataclass(frozen=True)
class GenerationConfig:
    """What one ``generation_config.json`` sets."""

    sampling: dict[str, Any] = field(default_factory=dict)
    """SamplingParams field -> default for requests that leave it unset."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids the file lists (the tokenizer stops on them beside its own)."""
    source: str | None = None
    """The file read (None: none)."""


EMPTY = GenerationConfig()


def read(folder: str | Path) -> GenerationConfig:
    """The folder's ``generation_config.json`` (``EMPTY`` when it has none); a file that is not
    JSON, or holds a value no request could take, is a ModelLoadError naming it."""
    path = Path(folder) / FILE
    if not path.is_file():
        return EMPTY
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read ({e})", path=str(path)) from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: not a JSON object", path=str(path))
    sampling: dict[str, Any] = {}
    for key in SAMPLING_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        integral = key in ("top_k", "max_new_tokens")
        ok = (isinstance(value, int) if integral else isinstance(value, int | float)) \
            and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise ModelLoadError(f"{path}: {key} must be a {'whole ' if integral else ''}number, "
                                 f"got {value!r}", path=str(path))
        sampling["max_tokens" if key == "max_new_tokens" else key] = value
    _check(sampling, path)
    return GenerationConfig(sampling, _eos_ids(raw.get("eos_token_id"), path), str(path))


def resolve(setting: str, folder: str | Path | None) -> GenerationConfig:
    """The defaults ``--generation-config setting`` gives for a model in ``folder`` (None: a
    GGUF file or no folder, which carries no generation config)."""
    if setting == "vllm":
        return EMPTY
    if setting == "auto":
        return read(folder) if folder is not None and Path(folder).is_dir() else EMPTY
    if not Path(setting).is_dir() or not (Path(setting) / FILE).is_file():
        raise ConfigError(f"generation_config must be 'auto', 'vllm' or a folder holding "
                          f"{FILE}; got {setting!r}")
    return read(setting)


def defaults_for(setting: str, tokenizer: Any) -> dict[str, Any]:
    """The sampling defaults a frontend applies under ``setting``: ``auto``, the loaded
    model's (``tokenizer.generation_config``, read with its tokenizer); else ``resolve``'s."""
    if setting == "auto":
        return dict(getattr(tokenizer, "generation_config", EMPTY).sampling)
    return dict(resolve(setting, None).sampling)


def _check(sampling: dict[str, Any], path: Path) -> None:
    """The values as SamplingParams would take them, or a ModelLoadError naming the key."""
    from splitserve.sampling_params import SamplingParams

    try:
        SamplingParams(**sampling)
    except InvalidRequestError as e:
        key = "max_new_tokens" if e.field == "max_tokens" else e.field
        raise ModelLoadError(f"{path}: {key}: {e}", path=str(path)) from e


def _eos_ids(value: Any, path: Path) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelLoadError(f"{path}: eos_token_id must be a token id or a list of them, got "
                             f"{value!r}", path=str(path))
    return tuple(ids)
