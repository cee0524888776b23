"""Loading a GGUF fast: our reader reads what the ``gguf`` package's reader reads, and the
tokenizer transformers builds from a GGUF is built once, then read from the disk cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from splitserve.roles.models import loader, tokenizer_cache
from splitserve.roles.models.loader import default_model_path, load_tokenizer
from tests.utils import count_gguf_tokenizer_builds

TEXTS = [
    "What is the capital of France?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "ünïcödé, emoji 🙂, 中文, العربية",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nhi<|im_end|>",
]
NO_EXTRA_EOS: Any = SimpleNamespace(eos_token_ids=())
"""What ``_hf_tokenizer`` reads of a model config."""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


def _same_reading(fast: Any, package: Any) -> None:
    assert list(fast.fields) == list(package.fields)
    for name, field in package.fields.items():
        ours = fast.fields[name]
        assert (ours.offset, ours.types, ours.data) == (field.offset, field.types, field.data), name
        assert len(ours.parts) == len(field.parts), name
        if len(field.data) < 100:
            assert ours.contents() == field.contents(), name
        else:  # a vocabulary: every 97th value (the package reader takes seconds for all)
            for i in field.data[::97]:
                assert bytes(ours.parts[i]) == bytes(field.parts[i]), (name, i)
    assert fast.data_offset == package.data_offset
    assert len(fast.tensors) == len(package.tensors)
    for ours, theirs in zip(fast.tensors, package.tensors, strict=True):
        assert (ours.name, ours.tensor_type, ours.data_offset, ours.n_bytes) == (
            theirs.name, theirs.tensor_type, theirs.data_offset, theirs.n_bytes)
        assert ours.shape.tolist() == theirs.shape.tolist()
        assert (ours.data.dtype, ours.data.shape) == (theirs.data.dtype, theirs.data.shape)
        assert np.array_equal(ours.data, theirs.data), ours.name


def test_fast_reader_reads_what_the_package_reader_reads() -> None:
    from gguf import GGUFReader

    path = default_model_path()  # Q4_1, Q8_0 and F32 tensors, a 49k-token vocabulary
    fast = loader._open_gguf(path)
    assert type(fast) is not GGUFReader  # the subclass, not the fallback
    _same_reading(fast, GGUFReader(str(path)))


def _metadata_only_gguf(path: Path, chat_template: str, name: str = "m", block_count: int = 2) -> Path:
    """A GGUF with a tiny tokenizer's metadata and no tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(block_count)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<s>", "</s>"])
    writer.add_token_types([1, 1, 1, 3, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(4)
    writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_key_covers_the_tokenizer_metadata_and_nothing_else(tmp_path) -> None:
    def key(path: Path) -> str:
        return tokenizer_cache.tokenizer_key(loader._open_gguf(path))

    base = key(_metadata_only_gguf(tmp_path / "a.gguf", "{{ messages }}"))
    # another chat template is another tokenizer
    assert key(_metadata_only_gguf(tmp_path / "b.gguf", "{{ messages[0] }}")) != base
    # other model metadata (name, layer count) builds the same tokenizer
    assert key(_metadata_only_gguf(tmp_path / "c.gguf", "{{ messages }}", "other", 8)) == base
    # so does the embedded model's tokenizer in every file that carries it; not this one
    assert key(default_model_path()) != base


def _same_tokenizer(a: Any, b: Any) -> None:
    assert (a.eos_token_id, a.bos_token_id, a.vocab_size, a.eos_token_ids) == (
        b.eos_token_id, b.bos_token_id, b.vocab_size, b.eos_token_ids)
    for text in TEXTS:
        ids = a.encode(text)
        assert ids == b.encode(text)
        assert a.decode(ids) == b.decode(ids)
        assert a.decode(ids, skip_special_tokens=False) == b.decode(ids, skip_special_tokens=False)
    assert a.apply_chat_template(MESSAGES) == b.apply_chat_template(MESSAGES)
    sample = list(range(0, a.vocab_size, 37))
    assert a.decode(sample, skip_special_tokens=False) == b.decode(sample, skip_special_tokens=False)
    assert a.hf.all_special_ids == b.hf.all_special_ids


def test_the_embedded_gguf_tokenizer_is_built_once_then_read_back_equal(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    builds = count_gguf_tokenizer_builds(monkeypatch)
    _, _, built = load_tokenizer(None)
    assert len(builds) == 1
    root = tmp_path / "cache" / "gguf-tokenizers"
    key = tokenizer_cache.tokenizer_key(loader._open_gguf(default_model_path()))
    assert [e.name for e in root.iterdir()] == [key]  # one entry, no temporary folder left
    _, _, cached = load_tokenizer(None)
    assert len(builds) == 1  # read from the cache: transformers did not convert the GGUF again
    _same_tokenizer(built, cached)


def test_an_unreadable_entry_is_rebuilt_and_a_lost_race_keeps_the_first(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = _metadata_only_gguf(tmp_path / "t.gguf", template)
    builds = count_gguf_tokenizer_builds(monkeypatch)
    def load() -> Any:
        return loader._hf_tokenizer(tmp_path, NO_EXTRA_EOS, gguf_file=path.name,
                                    gguf_reader=loader._open_gguf(path))

    built = load()
    root = tmp_path / "cache" / "gguf-tokenizers"
    (entry,) = root.iterdir()
    (entry / "tokenizer.json").write_text("{ not json")
    rebuilt = load()
    assert len(builds) == 2
    assert rebuilt.encode("ab ba") == built.encode("ab ba") == [2, 1, 0]
    again = load()
    assert len(builds) == 2  # the replaced entry reads back
    assert again.apply_chat_template(MESSAGES) == built.apply_chat_template(MESSAGES)
    # A second store of the same entry (a worker that lost the race) keeps the first
    before = (entry / "tokenizer.json").read_bytes()
    tokenizer_cache._store(built.hf, root, entry)
    assert [e.name for e in root.iterdir()] == [entry.name]
    assert (entry / "tokenizer.json").read_bytes() == before


def test_no_cache_when_off_or_unwritable(tmp_path, monkeypatch) -> None:
    path = _metadata_only_gguf(tmp_path / "t.gguf", "{{ messages }}")
    reader = loader._open_gguf(path)
    key = tokenizer_cache.tokenizer_key(reader)
    calls: list[int] = []

    def build() -> str:
        calls.append(1)
        return "tokenizer"

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(blocker))  # a file: nothing can be made under it
    assert tokenizer_cache.cached_tokenizer(key, build) == "tokenizer"
    assert blocker.read_text() == ""

    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPLITSERVE_TOKENIZER_CACHE", "0")
    assert tokenizer_cache.cache_root() is None
    assert tokenizer_cache.cached_tokenizer(key, build) == "tokenizer"
    assert not (tmp_path / "cache").exists()
    assert len(calls) == 2


def test_a_gguf_without_a_tokenizer_fails_naming_the_file_and_caches_nothing(tmp_path, monkeypatch) -> None:
    import gguf

    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "no-tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = loader._open_gguf(path)
    with pytest.raises(loader.ModelLoadError, match="no-tokenizer.gguf"):
        loader._hf_tokenizer(tmp_path, NO_EXTRA_EOS, gguf_file=path.name, gguf_reader=reader)
    root = tmp_path / "cache" / "gguf-tokenizers"
    assert not root.exists() or not any(root.iterdir())
