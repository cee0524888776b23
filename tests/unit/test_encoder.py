"""The encode role: embedding cache (LRU by bytes, hits and misses), the vision-only encoder,
and E/P/D over one process (encode worker -> prefill engine -> decode engine over the
loopback transport) equal to the monolithic multimodal engine token for token."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.kvtransfer.loopback import LoopbackTransport
from splitserve.roles.encoder import EmbeddingCache, ImageEncoder
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine
from splitserve.roles.workers import EncodeWorker
from tests.utils import make_tiny_llava

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_llava(tmp_path_factory.mktemp("llava-enc") / "tiny-llava", tokenizer_dir)


@pytest.fixture(scope="module")
def image_token(llava_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llava_dir)).convert_tokens_to_ids("<image>")


# ------------------------------------------------------------------ thread count


def test_image_rows_do_not_depend_on_the_thread_count(llava_dir) -> None:
    """An encode worker of a local cluster runs 1 thread, a single engine all the cores: the
    image rows must be the same bits (torch's fused SDPA gave other bits at 1 and 2 threads,
    so a sampled token of an image request differed between a cluster and one engine)."""
    before = torch.get_num_threads()
    rows = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            encoder = ImageEncoder.from_folder(llava_dir)  # its own cache: encoded again
            rows += [torch.cat([e for _, e in encoder.encode([_image(s) for s in range(4)])])]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(rows[0], rows[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_real_sized_tower_layer_does_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    """The same at CLIP ViT-L/14-336's widths (1,024 wide, 4,096 MLP, 16 heads, 577 patches),
    where torch picks its large-shape GEMM, convolution and norm kernels: every op of the
    tower (patch convolution, layer norms, projections, attention matmuls, softmax, GELU)
    gives the same bits at 1 and 2 threads, in float32 and bfloat16."""
    from splitserve.roles.models.config import VisionConfig
    from splitserve.roles.models.vision import ClipVisionTower

    d, inter = 1024, 4096
    cfg = VisionConfig(hidden_size=d, intermediate_size=inter, num_layers=1, num_heads=16,
                       image_size=336, patch_size=14, hidden_act="quick_gelu")
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 0.03) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    w = {"embeddings.patch_embedding.weight": rand(d, 3, 14, 14, scale=0.02),
         "embeddings.class_embedding": rand(d, scale=1.0),
         "embeddings.position_embedding.weight": rand(577, d, scale=0.02),
         "pre_layrnorm.weight": 1 + rand(d, scale=0.1), "pre_layrnorm.bias": rand(d, scale=0.1)}
    p = "encoder.layers.0."
    for name, shape in (("layer_norm1", (d,)), ("layer_norm2", (d,)),
                        ("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)),
                        ("self_attn.v_proj", (d, d)), ("self_attn.out_proj", (d, d)),
                        ("mlp.fc1", (inter, d)), ("mlp.fc2", (d, inter))):
        w[f"{p}{name}.weight"] = 1 + rand(d, scale=0.1) if len(shape) == 1 else rand(*shape)
        w[f"{p}{name}.bias"] = rand(shape[0], scale=0.05)
    tower = ClipVisionTower(cfg, w)
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(tower.forward(pixels, (0, 1)))
    finally:
        torch.set_num_threads(before)
    assert outs[0].shape == (1, 577, 2 * d) and torch.isfinite(outs[0].float()).all()
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ cache


def test_embedding_cache_lru_by_bytes() -> None:
    cache = EmbeddingCache(max_bytes=3 * 64)
    entry = lambda v: torch.full((4, 4), float(v))  # noqa: E731 - 64 bytes each
    for h in (1, 2, 3):
        cache.put(h, entry(h))
    assert cache.num_bytes == 192 and len(cache) == 3
    assert cache.get(1) is not None  # 1 is now the most recently used
    cache.put(4, entry(4))  # over budget: 2, the least recently used, leaves
    assert 2 not in cache and all(h in cache for h in (1, 3, 4))
    assert cache.get(2) is None
    assert (cache.num_hits, cache.num_misses) == (1, 1)
    cache.put(5, torch.zeros(100))  # 400 bytes: larger than the whole budget, not kept
    assert 5 not in cache and cache.num_bytes == 192


def test_same_image_in_any_form_is_one_entry(llava_dir) -> None:
    encoder = ImageEncoder.from_folder(llava_dir)
    img = _image(1)
    png = _png(img)
    ((h1, e1),) = encoder.encode([png])
    assert encoder.stats()["encoder_cache_misses"] == 1
    forms = [
        img,
        base64.b64encode(png).decode(),
        "data:image/png;base64," + base64.b64encode(png).decode(),
    ]
    again = encoder.encode(forms)
    assert [h for h, _ in again] == [h1] * 3
    assert all(torch.equal(e, e1) for _, e in again)
    stats = encoder.stats()
    assert (stats["encoder_cache_hits"], stats["encoder_cache_misses"]) == (
        1,
        1,
    )  # one lookup per distinct image
    ((h2, e2),) = encoder.encode([_image(2)])
    assert h2 != h1 and not torch.equal(e2, e1)
    assert encoder.stats()["encoder_cache_entries"] == 2


def test_encoder_loads_only_the_vision_side(llava_dir) -> None:
    from splitserve.roles.models.loader import load_vision_weights

    config, weights = load_vision_weights(llava_dir, torch.float32)
    assert weights and all(
        k.startswith(("vision_tower.", "multi_modal_projector.")) for k in weights
    )
    assert config.llava is not None and config.llava.num_image_tokens == 16


def test_encode_worker_counts_hits_and_refuses_bad_images(llava_dir) -> None:
    worker = EncodeWorker("encode-0", EngineConfig(model=str(llava_dir)))
    png = _png(_image(3))
    first = asyncio.run(worker.encode([png]))
    second = asyncio.run(worker.encode([png]))
    assert first[0]["hash"] == second[0]["hash"]
    np.testing.assert_array_equal(first[0]["embeds"], second[0]["embeds"])
    stats = asyncio.run(worker.stats())
    assert (stats["encoder_cache_hits"], stats["encoder_cache_misses"]) == (1, 1)
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(worker.encode([png, b"GIF89a-truncated"]))
    assert err.value.field == "multi_modal_data.image" and "image 1" in str(err.value)
    assert len(asyncio.run(worker.encode([_image(4)]))) == 1  # still serving
    info = asyncio.run(worker.info())
    assert (info["role"], info["num_image_tokens"], info["hidden_size"]) == ("encode", 16, 64)


# ------------------------------------------------------------------ E/P/D


def _epd(llava_dir, prompts: list[dict]) -> tuple[dict[str, list[int]], LLMEngine, LLMEngine]:
    """Encode on the encode worker, prefill (first token, lease) then decode (pull, continue)."""
    worker = EncodeWorker("encode-0", EngineConfig(model=str(llava_dir)))
    prefill = LLMEngine(EngineConfig(model=str(llava_dir), num_kv_blocks=64))
    decode = LLMEngine(EngineConfig(model=str(llava_dir), num_kv_blocks=64))
    prefill.attach_kv_connector(LoopbackTransport(), "prefill-0", lease_ttl_s=5.0)
    decode.attach_kv_connector(LoopbackTransport(), "decode-0", lease_ttl_s=5.0)
    handed: dict[str, tuple[dict, list[int]]] = {}
    mm: dict[str, dict] = {}
    for i, p in enumerate(prompts):
        encoded = asyncio.run(worker.encode(p["multi_modal_data"]["image"]))
        mm[f"r{i}"] = {
            "image_embeds": [e["embeds"] for e in encoded],
            "image_hashes": [e["hash"] for e in encoded],
        }
        prefill.add_request(
            f"r{i}",
            p["prompt_token_ids"],
            GREEDY,
            kv_transfer_params={"do_remote_decode": True},
            multi_modal_data=mm[f"r{i}"],
        )
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            handed[out.request_id] = (out.kv_transfer_params, out.outputs[0].token_ids)
    tokens = {rid: list(first) for rid, (_, first) in handed.items()}
    for rid, (params, first) in handed.items():
        decode.add_request(
            rid,
            {
                "prompt_token_ids": prompts[int(rid[1:])]["prompt_token_ids"],
                "multi_modal_data": mm[rid],
            },
            GREEDY,
            kv_transfer_params=params,
            resume_token_ids=first,
        )
    for _ in range(1000):
        if not (
            decode.has_unfinished_requests()
            or prefill.has_pending_transfers()
            or decode.has_pending_transfers()
        ):
            break
        for out in decode.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        prefill.step()
    return tokens, prefill, decode


def test_epd_equals_monolithic_engine(llava_dir, image_token) -> None:
    a, b, c = _image(10), _image(11, (30, 70)), _image(12, (64, 64))
    prompts = [
        {
            "prompt_token_ids": [1, 40, image_token, 41, 42],
            "multi_modal_data": {"image": [_png(a)]},
        },
        {
            "prompt_token_ids": list(range(600, 620)) + [image_token, 9, image_token, 8],
            "multi_modal_data": {"image": [b, _png(c)]},
        },
    ]
    tokens, prefill, decode = _epd(llava_dir, prompts)
    single = LLM(str(llava_dir), num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY)]
    assert [tokens["r0"], tokens["r1"]] == want
    assert decode.stats()["num_remote_fallbacks"] == 0
    assert decode.kv.pool.num_free_blocks == decode.num_blocks
    assert prefill.kv.pool.num_free_blocks == prefill.num_blocks


@pytest.mark.ray
def test_encode_worker_as_ray_actor(llava_dir) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = (
            ray.remote(EncodeWorker)
            .options(num_cpus=0)
            .remote("encode-ray", EngineConfig(model=str(llava_dir)))
        )
        png = _png(_image(20))
        out = ray.get(actor.encode.remote([png]))
        ray.get(actor.encode.remote([base64.b64encode(png).decode()]))
        assert out[0]["embeds"].shape == (16, 64)
        stats = ray.get(actor.stats.remote())
        assert (stats["encoder_cache_hits"], stats["encoder_cache_misses"]) == (1, 1)
        with pytest.raises(InvalidRequestError):
            ray.get(actor.encode.remote(["data:image/png;base64,@@@"]))
        assert ray.get(actor.ping.remote())
        ray.get(actor.shutdown.remote())
        ray.kill(actor)
    finally:
        if started:
            ray.shutdown()


def test_encode_worker_loads_and_encodes_on_one_thread(llava_dir, monkeypatch) -> None:
    """One thread runs the tower's torch ops (a second would keep a second OpenMP team)."""
    import threading

    seen: list[tuple[str, int]] = []
    cls = ImageEncoder
    load, encode = cls.from_folder.__func__, cls.encode

    def recording_load(klass, *args, **kwargs):
        seen.append(("load", threading.get_ident()))
        return load(klass, *args, **kwargs)

    def recording_encode(self, *args, **kwargs):
        seen.append(("encode", threading.get_ident()))
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(cls, "from_folder", classmethod(recording_load))
    monkeypatch.setattr(cls, "encode", recording_encode)
    worker = EncodeWorker("encode-0", EngineConfig(model=str(llava_dir)))
    for seed in (1, 2):
        assert len(asyncio.run(worker.encode([_png(_image(seed))]))) == 1
    assert [kind for kind, _ in seen] == ["load", "encode", "encode"]
    assert len({ident for _, ident in seen}) == 1
    assert seen[0][1] != threading.get_ident()
