"""The whole engine on the Triton kernels (interpreted on CPU) equals the torch path."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams


@pytest.mark.parametrize("dtype", ["float32"])
def test_engine_triton_equals_torch(tiny_model_dir, monkeypatch, dtype: str) -> None:
    prompts = [[5, 17, 923, 44, 81, 12, 7], list(range(200, 237)), [3000 + i for i in range(20)]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    kwargs = dict(num_kv_blocks=32, dtype=dtype, max_num_batched_tokens=32)  # chunked prefill too
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
