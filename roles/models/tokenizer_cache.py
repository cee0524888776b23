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

A model folder's tokenizer is not rebuilt, but choosing its class costs more than reading it:
``AutoTokenizer`` loads the folder's model configuration through transformers' config classes,
whose imports (activations, kernels, ``torch.distributed.tensor``...) took ~1.9 s of a 2.5-s
load in each fresh process (~0.9 s for the chosen class alone). ``folder_tokenizer`` records
the class ``AutoTokenizer`` chose for a folder and later processes call that class directly
(``AutoTokenizer`` ends by calling it the same way: the tokenizer is read from the tokenizer
files alone). That entry is keyed by the folder's path and each file's name, size and
modification time (what the choice reads), with the transformers version: any change to the
folder chooses again.

Location: ``SPLITSERVE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/splitserve``, else
``~/.cache/splitserve``), under ``gguf-tokenizers/`` and ``tokenizer-classes/``.
``SPLITSERVE_TOKENIZER_CACHE=0`` turns both off. It must not load weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
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


def cache_root(kind: str = "gguf-tokenizers") -> Path | None:
    """The cache's folder for ``kind`` (``gguf-tokenizers`` or ``tokenizer-classes``), or
    None when the cache is turned off."""
    if not env.SPLITSERVE_TOKENIZER_CACHE.get():
        return None
    root = env.cache_dir()
    if root is None:  # no home directory to be found: no cache
        return None
    return root / kind


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
    return folder_tokenizer(entry)


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


# --------------------------------------------------------------------------- model folders

def folder_key(folder: Path) -> str | None:
    """SHA-256 (hex) of what ``AutoTokenizer`` reads to choose ``folder``'s tokenizer class:
    the folder's absolute path and each file's name, size and modification time (the config,
    the tokenizer files, the files whose presence it checks), with the transformers version;
    None where the folder cannot be listed."""
    import transformers

    digest = hashlib.sha256(f"splitserve-tokenizer-class/{FORMAT_VERSION}/"
                            f"transformers-{transformers.__version__}/"
                            f"{folder.resolve()}".encode())
    try:
        for item in sorted(os.scandir(folder), key=lambda e: e.name):
            stat = item.stat()
            digest.update(f"\0{item.name}\0{item.is_dir()}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}".encode())
    except OSError:
        return None
    return digest.hexdigest()


def folder_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``: the same tokenizer, read by the class
    ``AutoTokenizer`` chose for this folder where a process recorded it (``tokenizer-classes``),
    else through ``AutoTokenizer`` (then recorded)."""
    root = cache_root("tokenizer-classes")
    key = folder_key(folder) if root is not None else None
    entry = root / f"{key}.json" if root is not None and key is not None else None
    if entry is not None and entry.is_file():
        try:
            return _read_class(entry)(str(folder))
        except Exception as e:  # noqa: BLE001 - any unusable entry is chosen again
            logger.warning("tokenizer class cache entry %s is unusable (%r): choosing again",
                           entry, e)
            entry.unlink(missing_ok=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if entry is not None:
        _record_class(tokenizer, folder, entry)
    return tokenizer


def _read_class(entry: Path) -> Callable[[str], Any]:
    record = json.loads(entry.read_text())
    module, name = record["module"], record["name"]
    if not module.startswith("transformers."):
        raise ValueError(f"not a transformers class: {module}.{name}")
    cls = getattr(importlib.import_module(module), name)
    # as AutoTokenizer calls the class it chose (a local folder has no revision to resolve)
    return lambda folder: cls.from_pretrained(folder, _from_auto=True)


def _record_class(tokenizer: Any, folder: Path, entry: Path) -> None:
    """Record ``type(tokenizer)``, the class AutoTokenizer called (``from_pretrained`` builds
    ``cls(...)`` from the tokenizer files alone), for ``folder``. A class from elsewhere (remote
    code) is not recorded."""
    cls = type(tokenizer)
    if not cls.__module__.startswith("transformers."):
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.stem[:16]}-", dir=entry.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"module": cls.__module__, "name": cls.__qualname__,
                       "folder": str(folder.resolve())}, f)
        os.replace(tmp, entry)
    except OSError as e:  # not recording is a slower next start, no more
        logger.debug("tokenizer class for %s not recorded: %r", folder, e)
