"""Bad input gets a clear error naming the field or file, and the engine stays usable."""

from __future__ import annotations

import shutil

import pytest

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError, KVCacheCapacityError, ModelLoadError


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=512)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_sampling_params_validation(kwargs, field) -> None:
    with pytest.raises(InvalidRequestError, match=field) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def _still_works(llm: LLM) -> None:
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_empty_prompt(llm: LLM) -> None:
    for bad in ("", []):
        with pytest.raises(InvalidRequestError, match="empty") as err:
            llm.generate([bad])
        assert err.value.field == "prompt"
    _still_works(llm)


def test_prompt_over_context(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="max_model_len") as err:
        llm.generate([[5] * 600])
    assert err.value.field == "prompt"
    _still_works(llm)


def test_bad_token_ids(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="token ids") as err:
        llm.generate([[1, 2, 10**9]])
    assert err.value.field == "prompt_token_ids"
    _still_works(llm)


def test_request_that_can_never_fit_kv(tiny_model_dir) -> None:
    small = LLM(str(tiny_model_dir), num_kv_blocks=4)  # 64 tokens of KV
    with pytest.raises(KVCacheCapacityError, match="kv_cache_memory_bytes") as err:
        small.generate([[5] * 30], SamplingParams(max_tokens=40))
    assert err.value.field == "max_tokens"
    with pytest.raises(KVCacheCapacityError) as err:
        small.generate([[5] * 70], SamplingParams(max_tokens=1))
    assert err.value.field == "prompt"
    _still_works(small)


def test_bad_prompt_in_batch_leaves_nothing_queued(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine prompt", ""])
    _still_works(llm)


def test_unknown_model_path(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))


def test_truncated_gguf(tmp_path) -> None:
    from splitserve.roles.models.loader import default_model_path

    data = default_model_path().read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        LLM(str(bad))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        LLM(str(garbage))


def test_corrupt_safetensors(tmp_path, tiny_model_dir) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(folder))


def test_folder_without_config(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path / "empty"))
