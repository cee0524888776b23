"""The whole engine on the Triton kernels (interpreted on CPU) equals the torch path."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams


@pytest.mark.parametrize("dtype, kv_cache_dtype", [("float32", "auto"), ("float32", "fp8")])
def test_engine_triton_equals_torch(tiny_model_dir, monkeypatch, dtype: str,
                                    kv_cache_dtype: str) -> None:
    prompts = [[5, 17, 923, 44, 81, 12, 7], list(range(200, 237)), [3000 + i for i in range(20)]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    kwargs = dict(num_kv_blocks=32, dtype=dtype, max_num_batched_tokens=32,  # chunked prefill too
                  kv_cache_dtype=kv_cache_dtype)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "torch")
    torch_llm = LLM(str(tiny_model_dir), **kwargs)
    assert torch_llm.engine.runner.ops.__name__.endswith("reference")
    expected = [o.outputs[0].token_ids for o in torch_llm.generate(prompts, params)]
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    triton_llm = LLM(str(tiny_model_dir), **kwargs)
    assert triton_llm.engine.runner.ops.__name__.endswith("triton_ops")
    got = [o.outputs[0].token_ids for o in triton_llm.generate(prompts, params)]
    assert got == expected
    # a shared prefix goes through the cached-prefix path of the prefill kernel
    again = triton_llm.generate([prompts[1] + [9, 9]], params)[0]
    assert again.num_cached_tokens == 32
    ref = torch_llm.generate([prompts[1] + [9, 9]], params)[0]
    assert again.outputs[0].token_ids == ref.outputs[0].token_ids


@pytest.mark.parametrize("family", ["gemma2", "qwen3_moe"])
def test_families_on_triton_equal_torch(tmp_path, tokenizer_dir, monkeypatch, family: str) -> None:
    """Windows + soft-caps + GeGLU (Gemma 2) and the fused-MoE kernel (Qwen3-MoE) inside the
    engine: the Triton path (interpreted here) gives the torch path's tokens, chunked prefill
    across the window included."""
    from tests.families import make_family_model

    folder = make_family_model(family, tmp_path / family, tokenizer_dir)
    prompts = [[5, 17, 923, 44, 81, 12, 7], list(range(200, 237))]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    kwargs = dict(num_kv_blocks=32, max_num_batched_tokens=16)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "torch")
    expected = [o.outputs[0].token_ids for o in LLM(str(folder), **kwargs).generate(prompts, params)]
    monkeypatch.setenv("SPLITSERVE_KERNELS", "triton")
    triton_llm = LLM(str(folder), **kwargs)
    layer = triton_llm.engine.runner.model.layers[0]
    assert layer.mlp.fused if family == "qwen3_moe" else layer.attn.window is not None
    assert [o.outputs[0].token_ids for o in triton_llm.generate(prompts, params)] == expected
