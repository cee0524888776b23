"""A model folder's tokenizer class is chosen by ``AutoTokenizer`` once, then read by that class
directly (``tokenizer_cache.folder_tokenizer``): the same tokenizer, without transformers'
config imports in every worker process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from splitserve.roles.models import tokenizer_cache
from splitserve.roles.models.loader import load_tokenizer

TEXTS = [
    "What is the capital of France?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "ünïcödé, emoji 🙂, 中文, العربية",
    "<|im_start|>user\nhi<|im_end|>",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPLITSERVE_TOKENIZER_CACHE", raising=False)
    return tmp_path / "cache" / "tokenizer-classes"


def _count_auto(monkeypatch) -> list[str]:
    """Records each folder ``AutoTokenizer.from_pretrained`` reads."""
    from transformers import AutoTokenizer

    calls: list[str] = []
    original = AutoTokenizer.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(from_pretrained))
    return calls


def _folder(tmp_path: Path, tokenizer_dir: Path, model_type: str,
            tokenizer_class: str | None = None) -> Path:
    """The SmolLM2 tokenizer files with a model config of ``model_type`` (and the tokenizer
    class the tokenizer config declares): what AutoTokenizer chooses from."""
    folder = tmp_path / f"{model_type}-{tokenizer_class}"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    if tokenizer_class is not None:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["tokenizer_class"] = tokenizer_class
        path.write_text(json.dumps(config))
    return folder


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    assert a.get_vocab() == b.get_vocab()
    assert (a.special_tokens_map, a.all_special_ids) == (b.special_tokens_map, b.all_special_ids)
    assert a.chat_template == b.chat_template
    for text in TEXTS:
        ids = a.encode(text)
        assert ids == b.encode(text)
        assert a.decode(ids, skip_special_tokens=True) == b.decode(ids, skip_special_tokens=True)
    assert (a.apply_chat_template(MESSAGES, tokenize=False)
            == b.apply_chat_template(MESSAGES, tokenize=False))


@pytest.mark.parametrize(("model_type", "declared"), [
    ("gemma2", None),  # the class the tokenizer config declares (TokenizersBackend)
    ("llama", "LlamaTokenizerFast"),  # declared Llama, ByteLevel files: transformers corrects it
    ("gpt2", "GPT2Tokenizer"),  # a model-specific class, as declared
    ("qwen2", "PreTrainedTokenizerFast"),  # chosen from the model type: Qwen2Tokenizer
])
def test_the_recorded_class_reads_what_autotokenizer_reads(
        tmp_path, tokenizer_dir, cache, monkeypatch, model_type, declared) -> None:
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, tokenizer_dir, model_type, declared)
    reference = AutoTokenizer.from_pretrained(str(folder))
    calls = _count_auto(monkeypatch)
    first = tokenizer_cache.folder_tokenizer(folder)
    assert calls == [str(folder)]  # chosen by AutoTokenizer, then recorded
    (entry,) = cache.iterdir()
    assert json.loads(entry.read_text())["name"] == type(reference).__name__
    second = tokenizer_cache.folder_tokenizer(folder)
    assert calls == [str(folder)]  # read by the recorded class: AutoTokenizer not called
    _same(reference, first)
    _same(reference, second)


def test_a_changed_folder_is_chosen_again_and_a_bad_entry_is_dropped(
        tmp_path, tokenizer_dir, cache, monkeypatch, caplog) -> None:
    folder = _folder(tmp_path, tokenizer_dir, "llama")
    calls = _count_auto(monkeypatch)
    tokenizer_cache.folder_tokenizer(folder)
    tokenizer_cache.folder_tokenizer(folder)
    assert len(calls) == 1
    # another chat template: another key, chosen again, and the new template is read
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]"
                                                "{% endfor %}")
    changed = tokenizer_cache.folder_tokenizer(folder)
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2
    assert changed.apply_chat_template(MESSAGES, tokenize=False) == "[Be brief.][Hello!]"
    # an entry naming a class outside transformers, or unreadable, is not used, and replaced
    entry = cache / f"{tokenizer_cache.folder_key(folder)}.json"
    for bad in ('{"module": "os", "name": "system"}', "{ not json"):
        entry.write_text(bad)
        again = tokenizer_cache.folder_tokenizer(folder)
        assert "unusable" in caplog.text
        assert again.apply_chat_template(MESSAGES, tokenize=False) == "[Be brief.][Hello!]"
        assert json.loads(entry.read_text())["module"].startswith("transformers.")
    assert len(calls) == 4


def test_cache_off_records_nothing(tmp_path, tokenizer_dir, cache, monkeypatch) -> None:
    monkeypatch.setenv("SPLITSERVE_TOKENIZER_CACHE", "0")
    folder = _folder(tmp_path, tokenizer_dir, "llama")
    calls = _count_auto(monkeypatch)
    tokenizer_cache.folder_tokenizer(folder)
    tokenizer_cache.folder_tokenizer(folder)
    assert len(calls) == 2 and not cache.exists()


def test_a_warm_process_skips_transformers_config_imports(tmp_path, tiny_model_dir, cache) -> None:
    """The mechanism: with the class recorded, a fresh process loads the model's tokenizer
    without importing transformers' Llama config (AutoTokenizer does: checked in the same
    process after, so the assertion can fail)."""
    _, _, ours = load_tokenizer(str(tiny_model_dir))  # records the class in this cache
    script = (
        "import sys, json\n"
        "from splitserve.roles.models.loader import load_tokenizer\n"
        f"tok = load_tokenizer({str(tiny_model_dir)!r})[2]\n"
        "config_module = 'transformers.models.llama.configuration_llama'\n"
        "skipped = config_module not in sys.modules\n"
        "from transformers import AutoTokenizer\n"
        f"ref = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})\n"
        "texts = ['hello world', 'ünïcödé 🙂']\n"
        "print(json.dumps({'skipped': skipped, 'imported_by_auto': config_module in sys.modules,"
        " 'ours': [tok.encode(t) for t in texts], 'ref': [ref.encode(t) for t in texts]}))\n"
    )
    env = {**os.environ, "SPLITSERVE_CACHE_DIR": str(cache.parent)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["skipped"] and result["imported_by_auto"], result
    assert result["ours"] == result["ref"] == [ours.encode(t) for t in ("hello world",
                                                                         "ünïcödé 🙂")]
