"""A disk cache of the Hugging Face tokenizers that transformers builds from GGUF files.

transformers turns a GGUF's ``tokenizer.*`` metadata into a fast tokenizer by parsing the
whole file's metadata again and converting the vocabulary and merges: about 8 s for the
embedded SmolLM2 on a 2-core machine, in every process that loads the model (each worker, the
frontend, every replacement of a dead worker), against 0.2 s to read the same tokenizer back
from its ``tokenizer.json``. The first load saves what transformers built; later loads read it.

An entry is keyed by the SHA-256 of exactly what the conversion reads: the raw bytes of the
file's ``tokenizer.*`` and ``general.architecture`` metadata fields, plus the transformers
version and this module's format version. A different vocabulary, chat template or special
token, or another transformers, is another entry; a re-quantized file of the same model
shares one. Entries are written to a temporary folder and renamed into place, so concurrent
loaders (a cluster's workers start together) never read half an entry. An entry that fails to
load is logged and rebuilt; a cache folder that cannot be written is skipped quietly.

Location: ``SPLITSERVE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/splitserve``, else
``~/.cache/splitserve``), under ``gguf-tokenizers/``. ``SPLITSERVE_TOKENIZER_CACHE=0`` turns
it off. It must not load weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitserve import env

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when what an entry holds, or how it is keyed, changes."""
_KEY_FIELDS_PREFIX = "tokenizer."
_KEY_FIELDS = ("general.architecture",)


def cache_root() -> Path | None:
    """The cache's folder, or None when the cache is turned off."""
    if os.environ.get("SPLITSERVE_TOKENIZER_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = env.cache_dir()
    if root is None:  # no home directory to be found: no cache
        return None
    return root / "gguf-tokenizers"


def tokenizer_key(reader: Any) -> str:
    """SHA-256 (hex) of the metadata a GGUF tokenizer is built from, read from ``reader``
    (a ``gguf.GGUFReader``): each keyed field's name and raw bytes, in file order."""
    import transformers

    fields = list(reader.fields.values())
    # A field's bytes run to the next field's start; the last one's are its parts (what
    # follows it is the tensor descriptions or the data's alignment padding).
    ends = [f.offset for f in fields[1:]]
    if fields:
        ends.append(fields[-1].offset + sum(int(p.nbytes) for p in fields[-1].parts))
    digest = hashlib.sha256(f"splitserve-gguf-tokenizer/{FORMAT_VERSION}/"
                            f"transformers-{transformers.__version__}".encode())
    for field, end in zip(fields, ends, strict=True):
        if field.name.startswith(_KEY_FIELDS_PREFIX) or field.name in _KEY_FIELDS:
            digest.update(field.name.encode())
            digest.update(bytes(reader.data[field.offset : end]))
    return digest.hexdigest()


def cached_tokenizer(key: str | None, build: Callable[[], Any]) -> Any:
    """The Hugging Face tokenizer stored under ``key``, else ``build()``'s (then stored).
    ``key`` None (or the cache off) builds without storing."""
    root = cache_root()
    if key is None or root is None:
        return build()
    entry = root / key
    if (entry / "tokenizer.json").is_file():
        try:
            return _read(entry)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt
            logger.warning("GGUF tokenizer cache entry %s is unreadable (%r): rebuilding it",
                           entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    tokenizer = build()
    _store(tokenizer, root, entry)
    return tokenizer


def _read(entry: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(entry))


def _store(tokenizer: Any, root: Path, entry: Path) -> None:
    """Save into a temporary folder beside the entry, then rename it into place (a
    concurrent loader that got there first wins; ours is dropped)."""
    tmp: str | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=root)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, entry)
        tmp = None
        logger.info("GGUF tokenizer cached in %s", entry)
    except OSError as e:
        logger.debug("GGUF tokenizer not cached in %s: %r", root, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
