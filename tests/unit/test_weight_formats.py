"""Weight formats chosen at load: LLM(quantization=..., dtype=...) on tiny random models, the
loader's GGUF path on a real GGUF file written here, and the bad-input rules of issue [J]."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import ConfigError, ModelLoadError
from splitserve.kernels.quant import QuantizedWeight
from splitserve.roles.engine import precision
from splitserve.roles.models.loader import load_model
from splitserve.roles.models.quantize import WeightFormat, is_projection, quantize_checkpoint

PROMPT = list(range(100, 124))


def _logits(cfg, weights: dict, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Last-position logits of one prefill of ``tokens`` (blocks 0.. of a fresh cache)."""
    from splitserve.kernels.ops import get_ops
    from splitserve.roles.models.blocks import AttentionMetadata
    from splitserve.roles.models.registry import create_model

    model = create_model(cfg, weights, get_ops("cpu"), torch.device("cpu"))
    n, bs = len(tokens), 16
    blocks = (n + bs - 1) // bs
    caches = [torch.zeros(2, blocks, bs, cfg.num_kv_heads, cfg.head_dim)
              for _ in range(cfg.num_layers)]
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), num_decode=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.int32), decode_context_lens=i32([]),
        prefill_block_tables=i32([list(range(blocks))]), prefill_query_start_loc=i32([0, n]),
        prefill_context_lens=i32([n]),
    )
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(tokens), torch.arange(n), caches, meta)
        return model.compute_logits(hidden[-1:])[0]


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_projections_match_their_dequantized_reference(
    tiny_model_dir: Path, quantization: str
) -> None:
    loaded = load_model(tiny_model_dir, torch.float32, WeightFormat(quantization))
    quantized = {k for k, v in loaded.weights.items() if isinstance(v, QuantizedWeight)}
    assert quantized == {k for k in loaded.weights if is_projection(k, tied=False)}
    assert "model.embed_tokens.weight" not in quantized and "lm_head.weight" in quantized
    reference = {  # the same codes, dequantized once: what the packed kernels must compute
        k: v.dequantize() if isinstance(v, QuantizedWeight) else v
        for k, v in loaded.weights.items()
    }
    got = _logits(loaded.config, loaded.weights, PROMPT)
    want = _logits(loaded.config, reference, PROMPT)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def test_llm_options_and_info(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), quantization="int4", int4_group_size=32, num_kv_blocks=16)
    info = llm.engine.info()
    assert info["quantization"] == "int4" and info["dtype"] == "float32"
    assert info["weight_formats"]["int4"] == 2 * 7 + 1  # 7 projections per layer + lm_head
    dense = LLM(str(tiny_model_dir), num_kv_blocks=16).engine.info()
    assert info["weight_bytes"] < 0.65 * dense["weight_bytes"]  # the float embedding stays
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
    # a request alone equals the same request in a batch (same kernels, row-independent)
    batch = llm.generate([PROMPT, PROMPT[:7], PROMPT[3:]],
                         SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert batch[0].outputs[0].token_ids == out[0].outputs[0].token_ids


def test_tied_head_quantizes_the_embedding(tmp_path: Path, tokenizer_dir: Path) -> None:
    from tests.utils import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "tied", tokenizer_dir, tie=True)
    loaded = load_model(folder, torch.float32, WeightFormat("int8"))
    embed = loaded.weights["model.embed_tokens.weight"]
    assert isinstance(embed, QuantizedWeight) and "lm_head.weight" not in loaded.weights
    llm = LLM(str(folder), quantization="int8", num_kv_blocks=16)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_int4_refuses_a_shape_naming_the_layer(tmp_path: Path, tokenizer_dir: Path) -> None:
    from tests.utils import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "odd", tokenizer_dir, hidden=48, heads=4, kv_heads=2,
                             intermediate=96)
    with pytest.raises(ModelLoadError, match=r"layer (lm_head|model\.layers\.\d+\.\S+)\.weight to int4: K=48"):
        LLM(str(folder), quantization="int4", num_kv_blocks=8)
    LLM(str(folder), quantization="int8", num_kv_blocks=8)  # per channel: any shape


@pytest.mark.parametrize("quantization", ["int4", "w4a8", "int8"])
def test_a_vocabulary_not_a_multiple_of_16_is_quantized_too(
    tmp_path: Path, tokenizer_dir: Path, quantization: str
) -> None:
    """49,153 tokens (a LLaVA's added image token; GPT-2 has 50,257): the head is served
    quantized (packed with zero rows to whole blocks of 16, the padding's logits never
    stored), not refused, and its logits are the dequantized weights' (vLLM pads its
    vocabulary so)."""
    from tests.utils import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "odd-vocab", tokenizer_dir, vocab=49153)
    fmt = WeightFormat(quantization)
    loaded = load_model(folder, torch.float32, fmt)
    head = loaded.weights["lm_head.weight"]
    assert isinstance(head, QuantizedWeight) and tuple(head.shape) == (49153, 64)
    reference = {k: v.dequantize() if isinstance(v, QuantizedWeight) else v
                 for k, v in loaded.weights.items()}
    got = _logits(loaded.config, loaded.weights, PROMPT)
    want = _logits(loaded.config, reference, PROMPT)
    assert got.shape == (49153,)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999
    llm = LLM(str(folder), quantization=quantization, num_kv_blocks=16)
    formats = llm.engine.info()["weight_formats"]
    assert formats.get("int4:a8" if quantization == "w4a8" else quantization) == 2 * 7 + 1
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                logprobs=2))
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="quantization must be one of .*w4a8.*int3"):
        LLM(quantization="int3")
    with pytest.raises(ConfigError, match="int4_group_size"):
        LLM(quantization="int4", int4_group_size=48)
    with pytest.raises(ConfigError, match="dtype"):
        LLM(dtype="float64")


def test_dtype_auto_follows_native_bf16(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    support = precision.bf16_support()
    choice = precision.resolve_dtype("auto")
    assert choice.dtype == (torch.bfloat16 if support.native else torch.float32)
    assert choice.reason.startswith("native bf16" if support.native else "no native bf16")
    # a processor without native bf16 (cannot be produced for real here): auto picks float32,
    # an explicit bfloat16 warns and says so in the engine's info
    fake = precision.bf16_support.__wrapped__  # type: ignore[attr-defined]
    no_bf16 = type(support)((), support.fp32_gflops, support.fp32_gflops / 500)
    monkeypatch.setattr(precision, "bf16_support", lambda: no_bf16)
    assert fake is not None and precision.resolve_dtype("auto").dtype == torch.float32
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(tiny_model_dir), dtype="bfloat16", num_kv_blocks=8)
    assert "slow" in caplog.text
    info = llm.engine.info()
    assert info["dtype"] == "bfloat16" and "slow" in info["dtype_warning"]


def test_bf16_engine_with_int4_weights(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), dtype="bfloat16", quantization="int4", num_kv_blocks=16)
    assert llm.engine.runner.kv_caches[0].dtype == torch.bfloat16
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


# --------------------------------------------------------------------------- GGUF


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    from gguf import GGUFWriter
    from gguf.constants import GGMLQuantizationType

    writer = GGUFWriter(str(path), "llama")
    for name, (raw, type_name) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[type_name])  # byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_native_types_kept_others_dequantized_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from splitserve.roles.models import loader
    from tests.kernels.test_quant import _random_blocks

    rng = np.random.default_rng(0)
    n, k = 32, 256
    iq_block, iq_size = GGML_QUANT_SIZES[GGMLQuantizationType.IQ3_XXS]
    iq = rng.integers(0, 256, size=(n, k // iq_block, iq_size), dtype=np.uint8)
    iq[..., :2] = np.array([0.01], dtype=np.float16).view(np.uint8)  # d comes first
    path = _write_gguf(tmp_path / "mixed.gguf", {
        "blk.0.ffn_up.weight": (_random_blocks("Q4_1", n, k), "Q4_1"),
        "blk.0.ffn_gate.weight": (_random_blocks("Q8_0", n, k), "Q8_0"),
        "blk.0.ffn_down.weight": (_random_blocks("Q6_K", n, k), "Q6_K"),
        "blk.0.attn_output.weight": (_random_blocks("Q5_K", n, k), "Q5_K"),
        "blk.0.attn_v.weight": (iq.reshape(n, -1), "IQ3_XXS"),
    })
    reader = GGUFReader(str(path))
    cfg = type("Cfg", (), {"architecture": "LlamaForCausalLM"})()
    by_name = {t.name: t for t in reader.tensors}
    with caplog.at_level(logging.WARNING):
        got = {
            name: loader._gguf_quantized(t, loader._hf_name(name), cfg, torch.float32,
                                         WeightFormat("auto"))
            for name, t in by_name.items()
        }
    assert isinstance(got["blk.0.ffn_up.weight"], QuantizedWeight)
    assert got["blk.0.ffn_up.weight"].source == "Q4_1"
    assert got["blk.0.ffn_gate.weight"].kind == "int8"  # type: ignore[union-attr]
    q6 = got["blk.0.ffn_down.weight"]  # Q4_K_M's other type: int8, a scale per 16 values
    assert isinstance(q6, QuantizedWeight) and q6.kind == "int8" and q6.group_size == 16
    q5 = got["blk.0.attn_output.weight"]  # Q5_K_M's: int8 with a zero per 32
    assert isinstance(q5, QuantizedWeight) and q5.group_size == 32 and q5.zeros is not None
    assert got["blk.0.attn_v.weight"] is None  # dequantized by the caller
    assert "blk.0.attn_v.weight" in caplog.text and "IQ3_XXS" in caplog.text
    assert "ffn_down" not in caplog.text and "attn_output" not in caplog.text
    none = loader._gguf_quantized(by_name["blk.0.ffn_up.weight"], "x", cfg, torch.float32,
                                  WeightFormat("none"))
    assert none is None
    # w4a8: the codes auto keeps, each marked for 8-bit activations (Q8_0 as llama.cpp's Q8 x Q8)
    fmt = WeightFormat("w4a8")
    kept = {name: loader._gguf_quantized(t, loader._hf_name(name), cfg, torch.float32, fmt)
            for name, t in by_name.items()}
    assert kept["blk.0.attn_v.weight"] is None
    weights = {k: v for k, v in kept.items() if v is not None}
    weights["model.layers.0.mlp.extra.weight"] = torch.randn(16, 64)  # float stays float
    quantize_checkpoint(weights, fmt, torch.float32, tied=False)
    assert weights["blk.0.ffn_up.weight"].act_bits == 8  # type: ignore[union-attr]
    assert weights["blk.0.ffn_gate.weight"].act_bits == 8  # type: ignore[union-attr]
    assert isinstance(weights["model.layers.0.mlp.extra.weight"], torch.Tensor)
    assert precision.weight_format(weights["blk.0.ffn_up.weight"]) == "int4:Q4_1:a8"
    assert precision.weight_format(weights["blk.0.ffn_gate.weight"]) == "int8:Q8_0:a8"
    assert precision.weight_format(weights["blk.0.ffn_down.weight"]) == "int8:Q6_K:a8"
    from splitserve.kernels import native
    from splitserve.kernels.linear import Linear

    head = Linear(weights["blk.0.ffn_gate.weight"])
    if native.status().available:  # the Q8_0 codes meet 8-bit rows in the native kernel
        assert head.format == "int8:Q8_0:a8" and head._native.bits == 8 | native.ACT8
        before = native.calls["int8_matmul_a8"]
        head(torch.randn(3, k))
        assert native.calls["int8_matmul_a8"] == before + 1


def test_version_reports_formats(tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from splitserve.cluster.frontends.backend import EngineBackend
    from splitserve.cluster.frontends.http_server import build_app

    backend = EngineBackend.from_config(model=str(tiny_model_dir), dtype="auto",
                                        quantization="int8", num_kv_blocks=8)
    try:
        body = TestClient(build_app(backend)).get("/version").json()
    finally:
        import asyncio

        asyncio.run(backend.close())
    want = "bfloat16" if precision.bf16_support().native else "float32"
    assert body["dtype"] == want and body["dtype_requested"] == "auto"
    assert body["quantization"] == "int8" and body["weight_formats"]["int8"] == 2 * 7 + 1
    assert "version" in body and body["dtype_reason"]


def test_w4a8_serves_int4_weights_with_8_bit_activations(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``quantization="w4a8"``: int4's weights, each marked for 8-bit activations, served by
    the native kernel's ``ACT8`` path (counted); a row's tokens do not depend on its batch;
    the logits stay near the dequantized reference; without the native kernels torch's int4
    kernel serves the weights with bf16 activations, after a warning."""
    from splitserve.kernels import native

    loaded = load_model(tiny_model_dir, torch.float32, WeightFormat("w4a8"))
    quantized = [v for v in loaded.weights.values() if isinstance(v, QuantizedWeight)]
    assert len(quantized) == 2 * 7 + 1 and all(
        q.kind == "int4" and q.act_bits == 8 for q in quantized)
    reference = {k: v.dequantize() if isinstance(v, QuantizedWeight) else v
                 for k, v in loaded.weights.items()}
    got = _logits(loaded.config, loaded.weights, PROMPT)
    want = _logits(loaded.config, reference, PROMPT)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99

    llm = LLM(str(tiny_model_dir), quantization="w4a8", num_kv_blocks=16)
    info = llm.engine.info()
    assert info["quantization"] == "w4a8" and info["weight_formats"]["int4:a8"] == 15, info
    layer = llm.engine.runner.model.layers[0]  # type: ignore[attr-defined]
    assert layer.attn.qkv.format == "int4:a8" and layer.attn.qkv._native.bits == 4 | native.ACT8
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = native.calls["int4_matmul_a8"] + native.calls["decode_layer"]
    alone = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    assert native.calls["int4_matmul_a8"] + native.calls["decode_layer"] > before
    batch = llm.generate([PROMPT[:7], PROMPT, PROMPT[3:]], params)
    assert batch[1].outputs[0].token_ids == alone

    monkeypatch.setenv("SPLITSERVE_CPU_INT4", "torch")
    monkeypatch.setattr("splitserve.kernels.linear._warned_act", [])
    with caplog.at_level(logging.WARNING):
        fallback = LLM(str(tiny_model_dir), quantization="w4a8", num_kv_blocks=16)
    assert fallback.engine.runner.model.layers[0].attn.qkv.format == "int4"  # type: ignore[attr-defined]
    assert "8-bit activations need the native CPU kernels" in caplog.text


def test_the_default_serves_a_ggufs_codes_and_a_folders_floats(tiny_model_dir: Path) -> None:
    """``quantization`` defaults to ``auto`` everywhere a user sets it (``LLM`` /
    ``EngineConfig``, the cluster YAML, ``splitserve serve|generate``), as vLLM and llama.cpp
    serve a GGUF from its codes; a Hugging Face folder stays float under it. (The embedded
    GGUF's default engine, the ``smollm`` fixture, asserts its 210 Q4_1 projections.)"""
    from splitserve.cluster.config import ClusterConfig
    from splitserve.cluster.tools.cli import build_parser
    from splitserve.roles.engine.config import EngineConfig

    parser = build_parser()
    assert EngineConfig().quantization == ClusterConfig().quantization == "auto"
    assert parser.parse_args(["serve"]).quantization == "auto"
    assert parser.parse_args(["generate", "--prompt", "hi"]).quantization == "auto"
    info = LLM(str(tiny_model_dir), num_kv_blocks=8).engine.info()
    assert info["quantization"] == "auto" and set(info["weight_formats"]) == {"float32"}, info
