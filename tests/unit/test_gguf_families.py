"""Every family the ``gguf`` package maps loads from GGUF and equals transformers token for token.

For Qwen3, Qwen3-MoE, Phi-3, Gemma 2, Gemma 3 text and Mixtral: transformers saves a tiny
random model, the test converts it to GGUF as llama.cpp's converter would
(``tests/gguf_files.py``: the ``gguf`` package's writer and tensor-name map), and splitserve
loads the file. One file per family holds all three tensor types (Q8_0 matrices, F16 where
Q8_0's 32-column blocks do not fit, F32 norms); the pure F32 and F16 files run under
``slow``. The loaded config must be the folder's (windows, soft-caps, experts, rotary tables,
attention scale), the weights the folder's as the file's types round them, and 8 prompts x
32 greedy tokens must equal transformers run on those same rounded weights. A divergence
passes only at a true near-tie (top-2 gap < 1e-3), counted. transformers' own GGUF loader
(5.24) is not the reference: its config mapping drops a field of every one of these families
(Qwen3's explicit ``head_dim``, Qwen3-MoE's ``expert_feed_forward_length``, Gemma's
``query_pre_attn_scalar`` and window pattern, Phi-3's LongRoPE factors, Mixtral's experts),
so it builds a different model from the same file.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import ModelLoadError
from splitserve.kernels.quant import QuantizedWeight
from splitserve.roles.models import loader
from splitserve.roles.models.quantize import GGUF_NATIVE, WeightFormat
from tests.families import FAMILIES, VOCAB, count_near_ties, hf_greedy, make_family_model
from tests.gguf_files import (
    GGUF_OVERRIDES,
    per_expert,
    read_hf_folder,
    rounded,
    rounded_folder,
    tensor_type,
    write_gguf,
)

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
_rng = random.Random(1)
PROMPTS = [[_rng.randrange(3, VOCAB) for _ in range(n)] for n in (6, 19, 31, 44, 60, 75, 27, 90)]
_CONFIG_FIELDS = (
    "architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "tie_word_embeddings", "hidden_act", "rope_theta", "rope_local_theta",
    "partial_rotary_factor", "attn_logit_softcap", "final_logit_softcap", "num_experts",
    "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "max_position_embeddings",
    "kv_layer_windows", "bos_token_id", "eos_token_ids", "rope_layers", "embedding_multiplier",
    "residual_multiplier", "logits_scaling",
)
DEFAULT_SUITE = {"qwen3", "gemma2"}
"""Families checked in the default suite (q/k norm + explicit head_dim; soft-caps, windows and
the norm shift); the others run under ``-m slow`` (each costs ~30 s, mostly the tokenizer)."""


@pytest.fixture(scope="module", params=[
    f if f in DEFAULT_SUITE else pytest.param(f, marks=pytest.mark.slow)
    for f in sorted(FAMILIES)
])
def folder(request, tmp_path_factory, tokenizer_dir) -> tuple[str, Path]:
    name = request.param
    path = tmp_path_factory.mktemp(name) / name
    return name, make_family_model(name, path, tokenizer_dir, overrides=GGUF_OVERRIDES.get(name))


def _reference(folder: Path, qtype: str, tmp_path: Path) -> list:
    """transformers' greedy tokens on the folder's model with the weights the file holds."""
    from transformers import AutoModelForCausalLM

    ref = rounded_folder(folder, qtype, tmp_path / f"rounded-{qtype}")
    hf = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()
    with torch.inference_mode():
        return [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]


def _rope_tables(cfg) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[2, positions, rotary_dim]: the global and the windowed layers' rotary tables."""
    from splitserve.kernels.reference import rope_cos_sin_cache

    local = cfg.rope_local_theta or cfg.rope_theta
    return torch.stack([
        rope_cos_sin_cache(cfg.head_dim, 1024, cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim),
        rope_cos_sin_cache(cfg.head_dim, 1024, local, None, cfg.rotary_dim),
    ])


def _check_loaded(name: str, folder: Path, gguf_file: Path, qtype: str):  # type: ignore[no-untyped-def]
    """The file's config and float weights are the folder's (as the file's types round
    them); under ``auto`` its quantized matrices stay codes (stacked experts too, split per
    expert)."""
    want = loader.load_model(str(folder), torch.float32).config
    reader = loader._open_gguf(gguf_file)
    cfg = loader._gguf_config(reader, gguf_file)
    for field in _CONFIG_FIELDS:
        got, expected = getattr(cfg, field), getattr(want, field)
        if isinstance(expected, float):  # a GGUF holds float32 (what float32 math uses too)
            got, expected = np.float32(got), np.float32(expected)
        assert got == expected, field
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_layers)] == [
        want.is_moe_layer(i) for i in range(want.num_layers)]
    assert torch.allclose(_rope_tables(cfg), _rope_tables(want), atol=1e-6)
    assert abs(cfg.attention_scale - want.attention_scale) < 1e-6
    weights = loader._gguf_weights(reader, cfg, gguf_file, torch.float32, WeightFormat("none"))
    original = per_expert(read_hf_folder(folder)[1])  # Granite MoE's stacks: the file's names
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(weights) == set(original) - tied
    for key, tensor in weights.items():
        expected = torch.from_numpy(rounded(original[key], qtype))
        assert torch.allclose(tensor, expected, atol=1e-6, rtol=0), key
    codes = loader._gguf_weights(reader, cfg, gguf_file, torch.float32, WeightFormat("auto"))
    for key, tensor in codes.items():
        stored = tensor_type(original[key], qtype)
        kept = stored in GGUF_NATIVE  # stacked experts too: one weight per expert
        assert isinstance(tensor, QuantizedWeight) == kept, key
        assert not kept or tensor.source == stored, key  # type: ignore[union-attr]


def _equal_to_transformers(folder_and_name, tmp_path: Path, qtype: str,
                           quantization: str = "none") -> dict[str, int]:
    """The file's greedy tokens are transformers' on the weights it holds; its weight formats
    as the engine serves them (``/version``'s ``weight_formats``)."""
    name, folder = folder_and_name
    gguf_file = write_gguf(folder, tmp_path / f"{name}-{qtype}.gguf", name, qtype)
    _check_loaded(name, folder, gguf_file, qtype)
    llm = LLM(str(gguf_file), num_kv_blocks=256, quantization=quantization)
    assert llm.engine.model_config.architecture == loader._gguf_config(
        loader._open_gguf(gguf_file), gguf_file).architecture
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    ties = count_near_ties(got, _reference(folder, qtype, tmp_path))
    print(f"{name} {qtype}: {ties} near-tie divergences accepted of {len(PROMPTS)} prompts")
    return dict(llm.engine.weights_info["formats"])


def test_gguf_equals_transformers(folder, tmp_path) -> None:
    _equal_to_transformers(folder, tmp_path, "mixed")


@pytest.mark.parametrize("hidden", [64, 256])
def test_k_quant_files_equal_transformers(hidden: int, tmp_path: Path, tokenizer_dir: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A file as llama.cpp's K-quant presets write one: Q6_K (Q4_K_M's and Q5_K_M's other
    type) where rows are whole 256-value blocks, Q5_1 elsewhere; served from their codes by
    the native kernel (int8 with a scale per 16 values; int8 with zeros), greedy tokens
    transformers' on the weights the file holds."""
    from splitserve.kernels import native

    overrides = {**GGUF_OVERRIDES["qwen3"], "hidden_size": hidden, "intermediate_size": 2 * hidden}
    folder = make_family_model("qwen3", tmp_path / "qwen3", tokenizer_dir, overrides=overrides)
    formats = _equal_to_transformers(("qwen3", folder), tmp_path, "Q6_K", "auto")
    assert native.status().available, native.status().reason
    q6 = sum(n for f, n in formats.items() if f.startswith("int8:Q6_K"))
    q5 = sum(n for f, n in formats.items() if f.startswith("int8:Q5_1"))
    if hidden == 256:  # K of 256 or 512: Q6_K; o_proj's K is 4 heads x 32 = 128: Q5_1
        assert q6 >= 4 * 6 and q5 == 4, formats
    else:  # K = 64 / 128: no whole super-block, Q5_1 throughout
        assert q6 == 0 and q5 >= 4 * 7, formats
    # quantization="none" (the float reference) dequantizes them, and says what "auto" would do
    gguf_file = tmp_path / "qwen3-Q6_K.gguf"
    reader = loader._open_gguf(gguf_file)
    cfg = loader._gguf_config(reader, gguf_file)
    with caplog.at_level(logging.INFO, logger="splitserve.roles.models.loader"):
        loader._gguf_weights(reader, cfg, gguf_file, torch.float32, WeightFormat("none"))
    assert f"{q6 + q5} quantized tensors dequantized to float32" in caplog.text


def test_moe_experts_stay_codes(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A MoE file's stacked experts ([E, rows, K] Q8_0 blocks) are split per expert into
    quantized weights, not dequantized (a Qwen3-30B-A3B's experts are most of its bytes):
    the engine serves them through the native kernel, greedy tokens transformers'."""
    from splitserve.kernels import native

    folder = make_family_model("qwen3_moe", tmp_path / "qwen3_moe", tokenizer_dir,
                               overrides=GGUF_OVERRIDES["qwen3_moe"])
    formats = _equal_to_transformers(("qwen3_moe", folder), tmp_path, "mixed", "auto")
    assert native.status().available, native.status().reason
    cfg = loader.load_model(str(folder), torch.float32).config
    experts = cfg.num_layers * FAMILIES["qwen3_moe"][1]["num_experts"]
    # per expert a gate|up and a down projection (dequantized experts left 22 here: the
    # attention projections, the router, the embedding and the head)
    assert formats.get("int8:Q8_0", 0) >= 2 * experts, formats


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_gguf_float_files_equal_transformers(folder, tmp_path, qtype) -> None:
    _equal_to_transformers(folder, tmp_path, qtype)


def test_unknown_gguf_architecture_lists_the_supported(tmp_path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "bert.gguf"
    writer = GGUFWriter(str(path), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF architecture 'bert'.*gemma3"):
        loader.load_model(str(path), torch.float32)
