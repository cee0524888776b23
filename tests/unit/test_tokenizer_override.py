"""``tokenizer=``: a Hugging Face tokenizer folder used instead of the model's own (vLLM's
``--tokenizer``), on ``LLM``, ``splitserve serve|generate|batch`` and the cluster YAML: for a
GGUF whose tokenizer transformers would rebuild from the file, or a model folder without
tokenizer files. Bad values fail at load naming the folder, before any weight is read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from splitserve import LLM, SamplingParams
from splitserve.errors import ModelLoadError
from splitserve.roles.models import loader
from tests.gguf_files import write_gguf
from tests.utils import count_gguf_tokenizer_builds

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")


def _without_tokenizer(model: Path, out: Path) -> Path:
    """A copy of a model folder with its tokenizer files left out."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    assert not (out / "tokenizer.json").exists() and (out / "config.json").exists()
    return out


def test_a_gguf_takes_the_given_tokenizer_and_never_builds_its_own(
    thinking_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiny model whose folder's tokenizer has ``<think>`` as an added token (49,154 rows),
    written as a GGUF (as llama: ``gguf_files`` maps mixtral there) with SmolLM2's tokenizer
    inside: the GGUF's own tokenizer splits ``<think>`` into several ids; with the folder's
    tokenizer given it is one, and transformers never converted the GGUF's tokenizer (nor
    could a cache have served it: a fresh cache folder)."""
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    gguf_file = write_gguf(thinking_model_dir, tmp_path / "thinking.gguf", "mixtral")
    builds = count_gguf_tokenizer_builds(monkeypatch)
    given = LLM(str(gguf_file), tokenizer=str(thinking_model_dir), num_kv_blocks=32)
    assert builds == []
    assert len(given.get_tokenizer().encode("<think>")) == 1
    own = LLM(str(gguf_file), num_kv_blocks=32)
    assert builds == ["thinking.gguf"]
    assert len(own.get_tokenizer().encode("<think>")) > 1
    # the same ids give the same tokens whichever tokenizer read them (the weights are one)
    ids = given.get_tokenizer().encode("The capital of France is")
    assert ([o.outputs[0].token_ids for o in given.generate([ids], GREEDY)]
            == [o.outputs[0].token_ids for o in own.generate([ids], GREEDY)])
    # the frontend's loader takes it too
    _, _, frontend = loader.load_tokenizer(str(gguf_file), str(thinking_model_dir))
    assert frontend.encode("<think>") == given.get_tokenizer().encode("<think>")


def test_a_model_folder_without_tokenizer_files(tiny_model_dir: Path, tokenizer_dir: Path,
                                                tmp_path: Path) -> None:
    """Without tokenizer files the folder fails at load naming it; with ``tokenizer=`` it
    serves, token for token as the folder with its files."""
    bare = _without_tokenizer(tiny_model_dir, tmp_path / "bare")
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        LLM(str(bare), num_kv_blocks=16)
    llm = LLM(str(bare), tokenizer=str(tokenizer_dir), num_kv_blocks=16)
    ref = LLM(str(tiny_model_dir), num_kv_blocks=16)
    prompts = ["Hello there", "def f(x):"]
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
            == [o.outputs[0].token_ids for o in ref.generate(prompts, GREEDY)])


@pytest.mark.parametrize("case", ["missing", "file", "no tokenizer", "too many tokens"])
def test_bad_tokenizers_fail_at_load_naming_the_folder_before_the_weights(
    case: str, tiny_model_dir: Path, thinking_model_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A path that does not exist, a file, a folder without a tokenizer, and a tokenizer with
    more tokens than the model has embedding rows (SmolLM2's + ``<think>`` / ``</think>`` over
    a 49,152-row model): ``ModelLoadError`` naming the tokenizer folder, raised before the
    weights are read (the reader is replaced by one that fails)."""
    bad = {
        "missing": tmp_path / "nowhere",
        "file": tiny_model_dir / "config.json",
        "no tokenizer": _without_tokenizer(tiny_model_dir, tmp_path / "bare"),
        "too many tokens": thinking_model_dir,
    }[case]
    want = {"missing": "is not a folder", "file": "is not a folder",
            "no tokenizer": "cannot load tokenizer",
            "too many tokens": "49154 tokens, more than the model's vocab_size 49152"}[case]

    def no_weights(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("weights were read before the tokenizer was checked")

    monkeypatch.setattr(loader, "_read_safetensors", no_weights)
    with pytest.raises(ModelLoadError, match=want) as err:
        LLM(str(tiny_model_dir), tokenizer=str(bad), num_kv_blocks=16)
    assert str(bad) in str(err.value) and "tokenizer" in str(err.value)
    with pytest.raises(ModelLoadError, match=want):  # the frontend's loader alike
        loader.load_tokenizer(str(tiny_model_dir), str(bad))


def test_every_entry_point_passes_it_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``serve`` / ``generate`` / ``batch`` flags and the cluster YAML key reach the workers'
    ``EngineConfig`` (``Launcher.engine_config``) and the frontend (``Cluster``'s loader)."""
    import argparse

    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.launcher import Launcher
    from splitserve.cluster.tools import batch, cli

    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--tokenizer", "/tok", "--model", str(tiny_model_dir)])
    config, _ = cli._cluster_config(args)
    assert config.tokenizer == "/tok"
    no_ray = config.model_copy(update={"runtime": "processes"})  # the launcher starts no Ray
    assert Launcher(no_ray).engine_config("decode").tokenizer == "/tok"
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model: {tiny_model_dir}\n")
    args = parser.parse_args(["serve", "--config", str(yaml), "--tokenizer", "/tok"])
    assert cli._cluster_config(args)[0].tokenizer == "/tok"
    assert ClusterConfig.from_dict({"tokenizer": "/t"}, source="test").tokenizer == "/t"
    assert parser.parse_args(["generate", "--prompt", "x", "--tokenizer", "/t"]).tokenizer == "/t"
    bp = argparse.ArgumentParser()
    batch.add_arguments(bp)
    bargs = bp.parse_args(["--input", "i", "--output", "o", "--tokenizer", "/t"])
    assert batch.cluster_config(bargs).tokenizer == "/t"
