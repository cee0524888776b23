"""A model folder's generation_config.json, read as vLLM reads it: its sampling values become
the defaults of unset fields (LLM with no SamplingParams here; the HTTP and gRPC frontends in
tests/integration/test_generation_config_serve.py), its end ids stop generation, bad files
are load errors naming the key, and ``vllm`` turns the defaults off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from splitserve import LLM, SamplingParams
from splitserve.errors import ConfigError, ModelLoadError
from splitserve.roles.models import generation_config as gen_config
from splitserve.roles.models.loader import load_tokenizer


def _folder(tmp_path: Path, model_dir: Path, body: object) -> Path:
    """A copy of the tiny model whose generation_config.json is ``body`` (a dict as JSON,
    a string as it is)."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    text = body if isinstance(body, str) else json.dumps(body)
    (folder / gen_config.FILE).write_text(text)
    return folder


def test_read_takes_vllms_keys(tmp_path: Path) -> None:
    (tmp_path / gen_config.FILE).write_text(json.dumps({
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64, "min_p": 0,
        "repetition_penalty": 1.05, "do_sample": True, "num_beams": 1, "bos_token_id": 1,
        "eos_token_id": [2, 7], "presence_penalty": None}))
    got = gen_config.read(tmp_path)
    assert got.sampling == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 64,
                            "min_p": 0, "repetition_penalty": 1.05}
    assert got.eos_token_ids == (2, 7) and got.source == str(tmp_path / gen_config.FILE)
    assert gen_config.read(tmp_path / "nowhere") == gen_config.EMPTY
    assert gen_config.resolve("vllm", tmp_path) == gen_config.EMPTY
    assert gen_config.resolve("auto", tmp_path) == got == gen_config.resolve(str(tmp_path), None)
    with pytest.raises(ConfigError, match="generation_config"):
        gen_config.resolve(str(tmp_path / "nowhere"), None)


@pytest.mark.parametrize(("body", "named"), [
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": True}, "temperature"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ("{not json", "cannot read"),
    ("[1, 2]", "not a JSON object"),
])
def test_a_bad_file_is_a_load_error_naming_it(tmp_path: Path, body, named) -> None:
    (tmp_path / gen_config.FILE).write_text(body if isinstance(body, str) else json.dumps(body))
    with pytest.raises(ModelLoadError, match=named) as e:
        gen_config.read(tmp_path)
    assert gen_config.FILE in str(e.value)


def test_llm_defaults_and_end_ids(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The file's max_new_tokens / temperature are LLM's defaults when no SamplingParams is
    given (vllm: none); an id its eos_token_id lists ends generation where greedy decoding
    reaches it."""
    prompt = list(range(900, 910))
    greedy = LLM(str(tiny_model_dir), num_kv_blocks=64).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    stop = greedy.token_ids[4]
    folder = _folder(tmp_path, tiny_model_dir,
                     {"temperature": 0.0, "max_new_tokens": 6, "eos_token_id": [stop]})
    ends = load_tokenizer(str(folder))[2].eos_token_ids
    assert stop in ends and stop not in load_tokenizer(str(tiny_model_dir))[2].eos_token_ids
    first = next(i for i, t in enumerate(greedy.token_ids) if t in ends)
    llm = LLM(str(folder), num_kv_blocks=64)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=6)
    out = llm.generate([prompt])[0].outputs[0]
    assert out.token_ids == greedy.token_ids[:first + 1] and out.finish_reason == "stop"
    # given params win; ignore_eos runs past the listed id
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                ignore_eos=True))[0].outputs[0]
    assert out.token_ids == greedy.token_ids
    plain = LLM(str(folder), num_kv_blocks=64, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
