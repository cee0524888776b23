"""Shared test set-up: quiet environment, tiny random models, the embedded model (once)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("UCX_TLS", "tcp,self")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.utils import smollm_tokenizer_dir

    return smollm_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama (GQA 4:2) on disk as a Hugging Face folder."""
    from tests.utils import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer_dir)


@pytest.fixture(scope="session")
def thinking_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The tiny random Llama over SmolLM2's vocabulary plus ``<think>`` and ``</think>`` as
    single added tokens (as Qwen3's and DeepSeek R1's tokenizers have them)."""
    from transformers import AutoTokenizer

    from tests.utils import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["<think>", "</think>"])
    root = tmp_path_factory.mktemp("thinking")
    tok.save_pretrained(str(root / "tokenizer"))
    return make_tiny_llama(root / "model", root / "tokenizer", vocab=len(tok))


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct engine as served by default (``quantization="auto"``:
    the GGUF's Q4_1 codes), loaded once per test session: what a default cluster equals."""
    from splitserve import LLM

    llm = LLM(kv_cache_memory_bytes=1 << 30)
    formats = llm.engine.info()["weight_formats"]
    assert formats.get("int4:Q4_1") == 7 * 30, formats  # the default keeps the file's codes
    return llm


@pytest.fixture(scope="session")
def smollm_reference():
    """The embedded SmolLM2 dequantized to fp32 (``quantization="none"``): the reference that
    equals Hugging Face transformers token for token."""
    from splitserve import LLM

    llm = LLM(kv_cache_memory_bytes=1 << 30, quantization="none")
    formats = llm.engine.info()["weight_formats"]
    assert set(formats) == {"float32"}, formats
    return llm


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    """An ``LLM`` over the tiny random Llama (256 KV blocks), one per test module."""
    from splitserve import LLM

    return LLM(str(tiny_model_dir), num_kv_blocks=256)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    """The tiny random Llama in Hugging Face transformers (float32): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
