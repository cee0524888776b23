"""Embeddings (``LLM.embed``, ``SamplingParams.pooling``): the prompt's final hidden states
pooled, against Hugging Face transformers' base model on the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from splitserve import LLM, PoolingParams, SamplingParams
from splitserve.errors import ConfigError, InvalidRequestError
from tests.utils import make_tiny_embedding_model, random_prompts

PROMPTS = ["Hello world, this is a sentence to embed.", "x " * 150, "Short."]


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    # a 64-token step budget: the 151-token prompt is computed in three chunks
    return LLM(str(tiny_model_dir), num_kv_blocks=256, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def hf_base(tiny_model_dir: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


def _reference(hf_base, ids: list[int], kind: str, normalize: bool = True,
               dims: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        h = hf_base(torch.tensor([ids])).last_hidden_state[0]
    vec = {"LAST": h[-1], "MEAN": h.mean(0), "CLS": h[0]}[kind]
    vec = vec[:dims] if dims else vec
    return torch.nn.functional.normalize(vec, dim=0) if normalize else vec


def _all_free(llm: LLM) -> bool:
    stats = llm.engine.stats()
    return stats["num_free_blocks"] == stats["num_blocks"] and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kind", ["LAST", "MEAN", "CLS"])
def test_embeddings_equal_transformers_hidden_states_pooled(llm: LLM, hf_base, kind: str) -> None:
    outs = llm.embed(PROMPTS, PoolingParams(pooling_type=kind))
    assert len(outs) == len(PROMPTS)
    for out in outs:
        got = torch.tensor(out.outputs.embedding)
        assert got.shape == (64,) and out.finished
        want = _reference(hf_base, out.prompt_token_ids, kind)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    assert _all_free(llm)


def test_dimensions_cut_before_normalizing_and_normalize_off(llm: LLM, hf_base) -> None:
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    (cut,) = llm.embed([ids], PoolingParams(dimensions=16))
    torch.testing.assert_close(torch.tensor(cut.outputs.embedding),
                               _reference(hf_base, ids, "LAST", dims=16), atol=2e-6, rtol=0)
    (raw,) = llm.embed([ids], PoolingParams(normalize=False, pooling_type="mean"))
    got = torch.tensor(raw.outputs.embedding)
    assert abs(got.norm().item() - 1.0) > 0.1  # not a unit vector
    torch.testing.assert_close(got, _reference(hf_base, ids, "MEAN", normalize=False),
                               atol=2e-6, rtol=0)


def test_an_embedding_does_not_depend_on_its_batch_or_chunking(tiny_model_dir: Path,
                                                               llm: LLM) -> None:
    """The same prompt alone, in a batch with generations, and with other chunk boundaries
    (another step budget) gives the same bits (MEAN sums chunks in float64)."""
    prompt = random_prompts(1, seed=5, lo=150, hi=151)[0]
    others = random_prompts(6, seed=6, lo=20, hi=90)
    for kind in ("MEAN", "LAST"):
        pool = PoolingParams(pooling_type=kind)
        alone = llm.embed([prompt], pool)[0].outputs.embedding
        ids = [f"g{i}" for i in range(len(others))]
        for rid, p in zip(ids, others, strict=True):
            llm.engine.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=5))
        batched = llm.embed([prompt], pool)[0].outputs.embedding
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        assert batched == alone
    wide = LLM(str(tiny_model_dir), num_kv_blocks=256, max_num_batched_tokens=2048)
    assert wide.embed([prompt], PoolingParams(pooling_type="MEAN"))[0].outputs.embedding == \
        llm.embed([prompt], PoolingParams(pooling_type="MEAN"))[0].outputs.embedding
    assert _all_free(llm)


def test_mean_reads_no_prefix_cache_and_last_does(llm: LLM) -> None:
    """MEAN needs every position's row: it neither looks up nor takes cached blocks; LAST takes
    them (a cached prompt still computes its last position) and gives the same vector."""
    prompt = random_prompts(1, seed=9, lo=80, hi=81)[0]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))  # now cached
    kv = llm.engine.kv
    hits = kv.num_prefix_hits
    mean = llm.embed([prompt], PoolingParams(pooling_type="MEAN"))[0].outputs.embedding
    assert kv.num_prefix_hits == hits
    assert llm.embed([prompt], PoolingParams(pooling_type="MEAN"))[0].outputs.embedding == mean
    cold = LLM(str(llm.engine.config.model), num_kv_blocks=256, max_num_batched_tokens=64,
               enable_prefix_caching=False)
    want = cold.embed([prompt])[0].outputs.embedding
    hits = kv.num_prefix_hits
    assert llm.embed([prompt])[0].outputs.embedding == want
    assert kv.num_prefix_hits > hits


def test_a_sentence_transformers_folder_sets_the_pooler(tmp_path: Path, tiny_model_dir: Path,
                                                        hf_base) -> None:
    folder = tmp_path / "st"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": False}))
    st = LLM(str(folder), num_kv_blocks=64)
    assert (st.engine.pooler.pooling_type, st.engine.pooler.normalize) == ("MEAN", False)
    ids = st.get_tokenizer().encode(PROMPTS[0])
    torch.testing.assert_close(torch.tensor(st.embed([ids])[0].outputs.embedding),
                               _reference(hf_base, ids, "MEAN", normalize=False), atol=2e-6, rtol=0)
    over = LLM(str(folder), num_kv_blocks=64, pooler_config={"pooling_type": "cls"})
    assert (over.engine.pooler.pooling_type, over.engine.pooler.normalize) == ("CLS", False)
    plain = LLM(str(tiny_model_dir), num_kv_blocks=64)
    assert (plain.engine.pooler.pooling_type, plain.engine.pooler.normalize) == ("LAST", True)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"pooling_type": "MAX"}, "pooling_type"),
    ({"normalize": "yes"}, "normalize"),
    ({"dimensions": 0}, "dimensions"),
    ({"dimensions": 2.5}, "dimensions"),
])
def test_bad_pooling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        PoolingParams(**kwargs)
    assert e.value.field == field


def test_bad_requests_are_refused_before_anything_runs(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError) as e:
        llm.embed(["hi"], PoolingParams(dimensions=65))  # the tiny model is 64 wide
    assert e.value.field == "dimensions"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(max_tokens=2, pooling=PoolingParams())
    assert e.value.field == "pooling"
    with pytest.raises(InvalidRequestError) as e:
        llm.embed(["a", "b"], [PoolingParams()])
    assert e.value.field == "pooling_params"
    for bad in ({"pooling_type": "MAX"}, {"normalize": 1}, {"dims": 3}, "MEAN"):
        with pytest.raises(ConfigError, match="pooler_config"):
            LLM(str(llm.engine.config.model), num_kv_blocks=8, pooler_config=bad)
    assert _all_free(llm)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_base_model_checkpoint_serves_embeddings_only(tmp_path: Path, tokenizer_dir: Path,
                                                        family: str) -> None:
    from safetensors import safe_open
    from transformers import AutoModel

    folder = make_tiny_embedding_model(tmp_path, tokenizer_dir, family)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "embed_tokens.weight" in names and not any(n.startswith(("model.", "lm_head")) for n in names)
    llm = LLM(str(folder), num_kv_blocks=64)
    assert llm.engine.model_config.embedding_only
    assert (llm.engine.pooler.pooling_type, llm.engine.pooler.normalize) == ("LAST", True)
    hf = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    for out in llm.embed(PROMPTS):
        with torch.no_grad():
            h = hf(torch.tensor([out.prompt_token_ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(out.outputs.embedding),
                                   torch.nn.functional.normalize(h, dim=0), atol=2e-6, rtol=0)
    with pytest.raises(InvalidRequestError, match="serves embeddings only") as e:
        llm.generate(["hello"], SamplingParams(max_tokens=4))
    assert e.value.field == "model"
    assert _all_free(llm)


def test_a_preempted_embedding_restarts_its_pooling(tiny_model_dir: Path, llm: LLM,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Squeezed out of a 16-block cache by generations, the embedding's prompt is computed from
    position 0 again (more than once); its partial result restarts with it, so the vector
    equals the one computed with room (a MEAN summing the dropped chunks twice would not)."""
    from splitserve.roles.engine import pooling

    prompt = random_prompts(1, seed=5, lo=150, hi=151)[0]
    starts: list[int] = []
    combine = pooling.combine

    def record(pool, acc, part, start):  # type: ignore[no-untyped-def]
        starts.append(start)
        return combine(pool, acc, part, start)

    for kind in ("MEAN", "CLS", "LAST"):
        want = llm.embed([prompt], PoolingParams(pooling_type=kind))[0].outputs.embedding
        tight = LLM(str(tiny_model_dir), num_kv_blocks=16, max_num_batched_tokens=48,
                    enable_prefix_caching=False)
        for i, p in enumerate(random_prompts(3, seed=7, lo=30, hi=40)):
            tight.engine.add_request(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=60,
                                                                ignore_eos=True))
        tight.engine.step()
        starts.clear()
        monkeypatch.setattr(pooling, "combine", record)
        got = tight.embed([prompt], PoolingParams(pooling_type=kind))[0].outputs.embedding
        monkeypatch.setattr(pooling, "combine", combine)
        if kind == "MEAN":
            assert starts.count(0) > 1 and max(starts) > 0, starts  # restarted mid-prompt
        assert tight.engine.stats()["num_preemptions"] > 0
        assert got == want
        while tight.engine.has_unfinished_requests():
            tight.engine.step()
        assert _all_free(tight)
