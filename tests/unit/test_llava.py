"""A tiny random LLaVA: preprocessing, vision features and greedy tokens equal transformers;
image placeholders under chunked prefill and prefix caching; image hashes in block hashes;
bad multimodal input is refused with the field named and the engine keeps serving."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.roles.encoder import ImageEncoder
from splitserve.roles.models.image import ImageProcessor, load_image
from tests.utils import make_tiny_llava

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
NUM_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches, CLS dropped


def _image(seed: int, size: tuple[int, int] = (50, 40), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava", tokenizer_dir)


@pytest.fixture(scope="module")
def hf_llava(llava_dir):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=torch.float32)
    return model.eval(), AutoImageProcessor.from_pretrained(str(llava_dir))


@pytest.fixture(scope="module")
def llm(llava_dir):
    return LLM(str(llava_dir), num_kv_blocks=64)


@pytest.fixture(scope="module")
def image_token(hf_llava) -> int:
    return hf_llava[0].config.image_token_id


def _hf_greedy(hf_llava, ids: list[int], images: list[Image.Image], n: int) -> list[int]:
    model, processor = hf_llava
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    x = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(input_ids=x, pixel_values=pixels).logits[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0, len(ids) :].tolist()


def _expanded(ids: list[int], image_token: int) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.extend([t] * NUM_IMAGE_TOKENS if t == image_token else [t])
    return out


# ------------------------------------------------------------------ model


def test_preprocessing_equals_clip_image_processor(llava_dir, hf_llava) -> None:
    from transformers import CLIPImageProcessorPil

    images = [_image(1), _image(2, (23, 61)), _image(3, (32, 32), "RGBA"), _image(4, (40, 41), "L")]
    rgb = [load_image(im) for im in images]
    vision = ImageEncoder.from_folder(llava_dir).model.cfg.vision
    ours = ImageProcessor.for_model(llava_dir, vision)
    assert torch.equal(ours(rgb), hf_llava[1](images, return_tensors="pt")["pixel_values"])
    # without preprocessor_config.json: CLIP's defaults at the tower's image size
    defaults = ImageProcessor.for_model(None, vision)
    ref = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    assert torch.equal(defaults(rgb), ref(images, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize(("layer", "strategy"), [(-2, "default"), ([-3, -1], "full")])
def test_image_features_equal_transformers(tmp_path, tokenizer_dir, layer, strategy) -> None:
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    folder = make_tiny_llava(tmp_path / "m", tokenizer_dir, feature_layer=layer, strategy=strategy)
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    images = [_image(5), _image(6, (64, 48))]
    pixels = AutoImageProcessor.from_pretrained(str(folder))(images, return_tensors="pt")
    with torch.inference_mode():
        ref = hf.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    encoder = ImageEncoder.from_folder(folder)
    ours = encoder.encode(images)
    assert encoder.num_image_tokens == NUM_IMAGE_TOKENS + (strategy == "full")
    for (_, got), want in zip(ours, ref, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ engine


def test_greedy_equals_transformers_one_and_two_images(llm, hf_llava, image_token) -> None:
    a, b = _image(10), _image(11, (36, 70))
    one = [1, 510, 3000, image_token, 700, 9000, 42]
    two = [1, 88, image_token, 300, 301, 302, image_token, 17, 4000]
    outs = llm.generate(
        [
            {"prompt_token_ids": one, "multi_modal_data": {"image": a}},
            {"prompt_token_ids": two, "multi_modal_data": {"image": [_png(a), b]}},
        ],
        GREEDY,
    )
    assert outs[0].prompt_token_ids == _expanded(one, image_token)
    assert outs[1].prompt_token_ids == _expanded(two, image_token)
    assert outs[0].outputs[0].token_ids == _hf_greedy(hf_llava, _expanded(one, image_token), [a], 6)
    assert outs[1].outputs[0].token_ids == _hf_greedy(
        hf_llava, _expanded(two, image_token), [a, b], 6
    )
    # the image matters: another image gives other tokens
    other = llm.generate({"prompt_token_ids": one, "multi_modal_data": {"image": b}}, GREEDY)
    assert other[0].outputs[0].token_ids != outs[0].outputs[0].token_ids


def test_text_prompt_with_image_placeholder(llm, image_token) -> None:
    img = _image(12)
    text = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    ids = llm.get_tokenizer().encode(text)
    assert ids.count(image_token) == 1
    by_text = llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, GREEDY)[0]
    by_ids = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}}, GREEDY)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt == text


def test_chunk_boundaries_inside_image_span(llava_dir, hf_llava, image_token) -> None:
    a, b = _image(20), _image(21)
    ids = [1, 5, 6, 7, 8, image_token, 9, 10, image_token, 11]  # images at [5, 21) and [23, 39)
    chunked = LLM(str(llava_dir), num_kv_blocks=64, max_num_batched_tokens=7)
    out = chunked.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [a, b]}}, GREEDY)
    # chunks [0, 7), [7, 14), [14, 21), [21, 28)...: boundaries fall inside both images
    assert out[0].outputs[0].token_ids == _hf_greedy(
        hf_llava, _expanded(ids, image_token), [a, b], 6
    )


def test_prefix_cache_hit_over_image(llm, hf_llava, image_token) -> None:
    img = _image(30)
    ids = [1, 2, 3, image_token] + list(range(100, 130))  # 49 tokens: image at [3, 19)
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": img}}
    first = llm.generate(prompt, GREEDY)[0]
    hits = llm.engine.stats()["encoder_cache_hits"]
    again = llm.generate(prompt, GREEDY)[0]
    assert again.num_cached_tokens == 48  # three full blocks, the image among them
    # the second request did not run the vision tower either
    assert llm.engine.stats()["encoder_cache_hits"] == hits + 1
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert first.outputs[0].token_ids == _hf_greedy(hf_llava, _expanded(ids, image_token), [img], 6)


def test_different_images_never_share_blocks(llm, image_token) -> None:
    ids = list(range(200, 220)) + [image_token] + list(range(300, 315))  # image at [20, 36)
    outs = [
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": _image(s)}}, GREEDY)[0]
        for s in (40, 41, 40)
    ]
    assert outs[1].num_cached_tokens == 16  # only the text-only first block is shared
    assert outs[2].num_cached_tokens == 48  # the same image again: every full block
    assert outs[2].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert outs[1].outputs[0].token_ids != outs[0].outputs[0].token_ids


def test_precomputed_embeds_equal_raw_images(llava_dir, llm, image_token) -> None:
    import asyncio

    from splitserve.roles.engine.config import EngineConfig
    from splitserve.roles.workers import EncodeWorker

    a, b = _image(50), _image(51, (20, 90))
    worker = EncodeWorker("encode-0", EngineConfig(model=str(llava_dir)))
    b64 = base64.b64encode(_png(b)).decode()
    encoded = asyncio.run(worker.encode([_png(a), f"data:image/png;base64,{b64}"]))
    assert [e["embeds"].shape for e in encoded] == [(NUM_IMAGE_TOKENS, 64)] * 2
    assert all(e["embeds"].dtype == np.float32 for e in encoded)
    ids = [1, 77, image_token, 78, 79, image_token] + list(range(500, 520))
    raw = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [a, b]}}, GREEDY)[0]
    data = {
        "image_embeds": [e["embeds"] for e in encoded],
        "image_hashes": [e["hash"] for e in encoded],
    }
    pre = llm.generate({"prompt_token_ids": ids, "multi_modal_data": data}, GREEDY)[0]
    assert pre.outputs[0].token_ids == raw.outputs[0].token_ids
    assert pre.num_cached_tokens == 48  # same hashes as the raw images: a prefix-cache hit
    # an already-expanded prompt (as a decode worker may receive it) is taken as it is
    expanded = llm.generate(
        {"prompt_token_ids": raw.prompt_token_ids, "multi_modal_data": data}, GREEDY
    )[0]
    assert expanded.prompt_token_ids == raw.prompt_token_ids
    assert expanded.outputs[0].token_ids == raw.outputs[0].token_ids


def test_preemption_recomputes_images(llava_dir, image_token) -> None:
    """Too few blocks for three image requests at once: preempted requests recompute their
    images' rows and still equal running alone."""
    tight = LLM(str(llava_dir), num_kv_blocks=5, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    prompts = [
        {
            "prompt_token_ids": [1, s, image_token, s + 1, s + 2],
            "multi_modal_data": {"image": _image(s)},
        }
        for s in (60, 61, 62)
    ]
    together = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    alone = [tight.generate(p, params)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]


def test_resume_continues_multimodal_request(llm, image_token) -> None:
    img = _image(70)
    prompt = {"prompt_token_ids": [1, 3, image_token, 4], "multi_modal_data": {"image": img}}
    full = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    head = full[0].outputs[0].token_ids[:3]
    eng = llm.engine
    eng.add_request(
        "resume-1",
        prompt,
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        resume_token_ids=head,
    )
    tail: list[int] = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            tail.extend(out.outputs[0].token_ids)
    assert head + tail == full[0].outputs[0].token_ids


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"image": b"\x89PNG\r\n\x1a\nnot really"}, "multi_modal_data.image"),
        ({"image": "this is !! not base64"}, "multi_modal_data.image"),
        ({"image": "data:text/plain;base64,aGVsbG8="}, "multi_modal_data.image"),
        ({"image": [42]}, "multi_modal_data.image"),
        ({"image": [_image(1), _image(2)]}, "multi_modal_data"),  # two images, one placeholder
        ({"video": b"..."}, "multi_modal_data"),
        ({"image_embeds": [np.zeros((4, 3), np.float32)]}, "multi_modal_data.image_embeds"),
        (
            {"image_embeds": [np.zeros((4, 64), np.float32)], "image_hashes": ["x"]},
            "multi_modal_data.image_hashes",
        ),
    ],
)
def test_bad_multimodal_input_names_the_field(llm, image_token, data, field) -> None:
    with pytest.raises(InvalidRequestError) as err:
        llm.generate({"prompt_token_ids": [1, image_token, 5], "multi_modal_data": data}, GREEDY)
    assert err.value.field == field
    ok = llm.generate(
        {"prompt_token_ids": [1, image_token, 5], "multi_modal_data": {"image": _image(3)}}, GREEDY
    )
    assert len(ok[0].outputs[0].token_ids) == 6


def test_image_to_text_only_model_is_refused(tiny_model_dir) -> None:
    text_llm = LLM(str(tiny_model_dir), num_kv_blocks=16)
    with pytest.raises(InvalidRequestError) as err:
        text_llm.generate(
            {"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": _png(_image(1))}}
        )
    assert err.value.field == "multi_modal_data"
    assert len(text_llm.generate([1, 2, 3], GREEDY)[0].outputs[0].token_ids) == 6
