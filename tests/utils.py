"""Helpers for tests: tiny random Llama models on disk and reference generation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

_TOKENIZER_DIR: Path | None = None


def smollm_tokenizer_dir(tmp_root: Path) -> Path:
    """A Hugging Face tokenizer folder made from the embedded SmolLM2 GGUF (cached per session;
    made again when the folder it was made in is gone, e.g. the soak's temporary one)."""
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None or not _TOKENIZER_DIR.is_dir():
        from splitserve.roles.models.loader import load_tokenizer

        # the loader's tokenizer: transformers' GGUF conversion, read from the disk cache
        # after its first build (tests/unit/test_gguf_loading.py checks the two are equal)
        out = tmp_root / "smollm2-tokenizer"
        load_tokenizer(None)[2].hf.save_pretrained(str(out))
        _TOKENIZER_DIR = out
    return _TOKENIZER_DIR


def hf_model_from_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """transformers' own model from a GGUF file (the reference), its parse sped up.

    transformers reads the file twice with ``gguf.GGUFReader`` and builds a tensor-name map
    per tensor (397 for SmolLM2): 20 s of a test's fixture. Here the reader is the loader's
    subclass (the same fields and tensors as the package's reader, checked by
    ``test_gguf_loading.py``) and ``gguf.get_tensor_name_map`` is memoized (a pure function
    of architecture and layer count, only read). Name mapping, dequantization and the model
    stay transformers' own, so the reference remains independent of our loader's code."""
    import gguf
    from transformers import AutoModelForCausalLM

    with _fast_gguf_parse(gguf):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def _fast_gguf_parse(gguf: Any) -> Iterator[None]:
    from splitserve.roles.models import loader

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = loader._fast_gguf_reader()
    gguf.get_tensor_name_map = functools.cache(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def count_gguf_tokenizer_builds(monkeypatch: Any) -> list[str]:
    """Records each tokenizer transformers builds from a GGUF file (``AutoTokenizer`` called
    with ``gguf_file``), from now until ``monkeypatch`` undoes it."""
    from transformers import AutoTokenizer

    builds: list[str] = []
    original = AutoTokenizer.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("gguf_file"):
            builds.append(kwargs["gguf_file"])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(from_pretrained))
    return builds


@contextlib.contextmanager
def tiny_server(model_dir: Path, num_kv_blocks: int = 256, engine: dict[str, Any] | None = None,
                **options: Any) -> Iterator[Any]:
    """``serve`` over one engine of a tiny model (served as ``tiny``, context 512), with
    ``ServeOptions`` ``options`` (parsers, ports) and more ``EngineConfig`` fields ``engine``."""
    from splitserve.cluster.frontends.backend import EngineBackend
    from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions

    backend = EngineBackend.from_config(model=str(model_dir), num_kv_blocks=num_kv_blocks,
                                        max_model_len=512, **(engine or {}))
    with BackgroundServer(backend, ServeOptions(port=0, served_model_name="tiny",
                                                **options)) as srv:
        yield srv


def make_tiny_llama(
    path: Path,
    tokenizer_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 49152,
    max_pos: int = 2048,
    seed: int = 0,
    rope_scaling: dict | None = None,
    tie: bool = False,
) -> Path:
    """Write a random Llama (config.json, model.safetensors, tokenizer files) to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rnd(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    width = (64 / hidden) ** 0.5  # keeps activations in range as the model widens

    w: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rnd(vocab, hidden, std=1.0),
        "model.norm.weight": 1 + rnd(hidden, std=0.1),
    }
    if not tie:
        w["lm_head.weight"] = rnd(vocab, hidden, std=0.5)
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rnd(hidden, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(hidden, std=0.1)
        w[p + "self_attn.q_proj.weight"] = width * rnd(heads * head_dim, hidden, std=0.3)
        w[p + "self_attn.k_proj.weight"] = width * rnd(kv_heads * head_dim, hidden, std=0.3)
        w[p + "self_attn.v_proj.weight"] = width * rnd(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = width * rnd(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = width * rnd(intermediate, hidden)
        w[p + "mlp.up_proj.weight"] = width * rnd(intermediate, hidden)
        w[p + "mlp.down_proj.weight"] = width * rnd(hidden, intermediate)
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def make_tiny_llava(
    path: Path,
    tokenizer_dir: Path,
    *,
    image_size: int = 32,
    patch: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    hidden: int = 64,
    layers: int = 2,
    feature_layer: int | list[int] = -2,
    strategy: str = "default",
    seed: int = 0,
) -> Path:
    """Write a random LLaVA (CLIP vision tower + projector + Llama) as transformers saves it.

    The tokenizer gets an ``<image>`` special token (id 49152 after SmolLM2's 49152 tokens,
    inside the text vocabulary), as llava-hf folders have. Weights are redrawn with wider
    scales than transformers' init so that images move the logits and greedy margins are
    wide (a reference check must not hinge on float noise).
    """
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
        patch_size=patch, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_tiny_init(name, p, g))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(path))
    return path


def _tiny_init(name: str, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(p.shape, generator=g)
    if "norm" in name and name.endswith("weight"):
        return 1 + 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if "embed_tokens" in name:
        return noise
    if "lm_head" in name:
        return 0.5 * noise
    if p.ndim == 1 or "position_embedding" in name:
        return 0.5 * noise  # class / position embeddings
    # a matrix's (or a conv's) inputs per output; a stacked [experts, out, in] tensor's: in
    fan_in = p.shape[-1] if p.ndim == 3 else p[0].numel()
    return noise / fan_in**0.5


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait until ``condition()`` holds (polled every few ms); fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.005)


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = 60.0, poll_s: float = 0.02
) -> None:
    """Block until ``condition()`` holds; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def assert_workers_intact(workers: Iterable[Any], timeout_s: float = 60.0) -> None:
    """Teardown check for integration tests: every worker's ``check_integrity()`` (block pool,
    KV manager, scheduler, leases and loads) is clean. ``workers``: Ray actor handles or
    process workers, or objects with an ``actor`` attribute (``WorkerHandle``); dead workers
    are skipped."""
    import ray

    from splitserve.cluster import process_workers
    from splitserve.integrity import IntegrityReport

    actors = [getattr(w, "actor", w) for w in workers]
    refs = [(isinstance(a, process_workers.ProcessActor), a.check_integrity.remote())
            for a in actors]
    failed = []
    for is_process, ref in refs:
        try:
            report = (process_workers.get(ref, timeout_s) if is_process
                      else ray.get(ref, timeout=timeout_s))
        except (ray.exceptions.RayActorError, process_workers.WorkerProcessLost):
            continue  # killed by the test: nothing left to leak
        if not report["ok"]:
            failed.append(IntegrityReport(report["problems"], report["leaked_blocks"],
                                          report["stranded_leases"]))
    merged = IntegrityReport()
    for report in failed:
        merged.merge(report)
    merged.raise_if_bad("worker integrity check")


def random_prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    """``n`` prompts of random token ids (3..48999), each ``lo``..``hi`` tokens, from ``seed``."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def record_tokenizer_threads(monkeypatch: pytest.MonkeyPatch, tok: Any) -> dict[str, set[str]]:
    """Wrap the tokenizer's calls to note which threads make them."""
    seen: dict[str, set[str]] = {"encode": set(), "apply_chat_template": set(), "decode": set()}
    for name in seen:
        inner = getattr(tok, name)

        def wrapped(*a: Any, _name: str = name, _inner: Any = inner, **k: Any) -> Any:
            seen[_name].add(threading.current_thread().name)
            return _inner(*a, **k)

        monkeypatch.setattr(tok, name, wrapped)
    return seen


def make_tiny_embedding_model(root: Path, tokenizer_dir: Path, family: str = "qwen3") -> Path:
    """A sentence-transformers-style embedding model as transformers saves its base model
    (``Qwen3Model`` / ``LlamaModel``: no head, tensors without ``model.``), last-token pooled
    and normalized (modules.json + 1_Pooling, as Qwen3-Embedding ships)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel, Qwen3Config, Qwen3Model

    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 tie_word_embeddings=False)
    torch.manual_seed(3)
    model = (Qwen3Model(Qwen3Config(head_dim=16, **shape)) if family == "qwen3"
             else LlamaModel(LlamaConfig(**shape)))
    folder = root / family
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True,
         "pooling_mode_mean_tokens": False, "include_prompt": True}))
    return folder
