"""The embedded SmolLM2 Q4_1 GGUF served from its codes (quantization="auto").

The codes kept in memory must stand for exactly the values the gguf package dequantizes
(the fp32 reference of the same file), with llama.cpp's Q/K row order undone; the engine
built on them must answer like the reference.
"""

from __future__ import annotations

import torch

from splitserve import LLM, SamplingParams
from splitserve.kernels.quant import QuantizedWeight
from splitserve.roles.models.loader import load_model
from splitserve.roles.models.quantize import WeightFormat


def test_native_codes_equal_the_dequantized_file() -> None:
    native = load_model(None, torch.float32, WeightFormat("auto")).weights
    dense = load_model(None, torch.float32, WeightFormat("none")).weights
    assert native.keys() == dense.keys()
    kept = {k: v for k, v in native.items() if isinstance(v, QuantizedWeight)}
    sources = {v.source for v in kept.values()}
    assert sources == {"Q4_1", "Q8_0"}  # every projection Q4_1, the tied embedding Q8_0
    assert isinstance(native["model.embed_tokens.weight"], QuantizedWeight)
    assert len(kept) == 30 * 7 + 1
    for name, qw in kept.items():
        torch.testing.assert_close(qw.dequantize(), dense[name], rtol=1e-6, atol=1e-7, msg=name)
    quantized_bytes = sum(v.nbytes for v in kept.values())
    dense_bytes = sum(dense[k].numel() * 4 for k in kept)
    assert quantized_bytes < dense_bytes / 4  # ~4.5-8.5 bits per weight instead of 32


def test_auto_quantized_engine_answers_like_the_reference() -> None:
    llm = LLM(quantization="auto", kv_cache_memory_bytes=64 << 20)
    info = llm.engine.info()
    assert info["weight_formats"]["int4:Q4_1"] == 210 and info["weight_formats"]["int8:Q8_0"] == 1
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text
