"""Image inputs over both frontends (tiny random LLaVA behind one engine): HTTP ``image_url``
content parts with data URLs through the official ``openai`` client, gRPC ``images`` through
the generated client; bad images are 400s / INVALID_ARGUMENT naming the part, and the server
keeps serving."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from splitserve import LLM, SamplingParams
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions
from tests.utils import make_tiny_llava


def _data_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_llava(tmp_path_factory.mktemp("llava-http") / "tiny-llava", tokenizer_dir)


@pytest.fixture(scope="module")
def server(llava_dir) -> Iterator[BackgroundServer]:
    backend = EngineBackend.from_config(model=str(llava_dir), num_kv_blocks=256)
    with BackgroundServer(backend, ServeOptions(port=0, grpc_port=0,
                                                served_model_name="llava")) as srv:
        yield srv


def _messages(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_chat_with_an_image_equals_the_engine(server: BackgroundServer, llava_dir) -> None:
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)
    url = _data_url(1)
    res = client.chat.completions.create(model="llava", messages=_messages(url), max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    tok = AutoTokenizer.from_pretrained(str(llava_dir))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is in the picture?<image>"}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )
    want = LLM(str(llava_dir)).generate(
        {"prompt_token_ids": list(ids), "multi_modal_data": {"image": url}},
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
    )[0].outputs[0]
    assert res.choices[0].message.content == want.text
    assert res.usage.completion_tokens == 8
    assert res.usage.prompt_tokens == len(ids) - 1 + 16  # the placeholder became 16 image tokens
    other = client.chat.completions.create(model="llava", messages=_messages(_data_url(2)),
                                           max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert other.choices[0].message.content != res.choices[0].message.content  # image matters


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64,!!!!", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "image"),
    ("https://example.com/cat.png", "not fetched"),
])
def test_bad_images_are_400_naming_the_part(server: BackgroundServer, url: str, words: str) -> None:
    body = {"model": "llava", "messages": _messages(url), "max_tokens": 4}
    res = httpx.post(server.http_url + "/v1/chat/completions", json=body, timeout=60)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == "messages[0].content[1].image_url"
    assert words in err["message"].lower()
    ok = httpx.post(server.http_url + "/v1/chat/completions", timeout=60,
                    json={**body, "messages": _messages(_data_url(3))})
    assert ok.status_code == 200


def _png(seed: int) -> bytes:
    return base64.b64decode(_data_url(seed).split(",", 1)[1])


def test_grpc_images_equal_the_engine_and_bad_ones_are_invalid_argument(
    server: BackgroundServer, llava_dir
) -> None:
    from splitserve.client import Client, InvalidArgumentError

    tok_ids = [11, 12, 49152, 13, 14]  # 49152: <image> in the tiny LLaVA's tokenizer
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(str(llava_dir)).generate(
        {"prompt_token_ids": tok_ids, "multi_modal_data": {"image": _png(4)}}, params
    )[0].outputs[0].token_ids
    with Client(server.grpc_target, timeout=60) as client:
        got = client.generate(token_ids=tok_ids, images=[_png(4)], max_tokens=6, temperature=0,
                              ignore_eos=True)
        assert got.completions[0].token_ids == want
        with pytest.raises(InvalidArgumentError, match=r"images\[0\]"):
            client.generate(token_ids=tok_ids, images=[b"not a png"], max_tokens=2)
        with pytest.raises(InvalidArgumentError, match="placeholder"):
            client.generate(token_ids=[11, 12], images=[_png(4)], max_tokens=2)
        again = client.generate(token_ids=tok_ids, images=[_png(4)], max_tokens=6,
                                temperature=0, ignore_eos=True)
        assert again.completions[0].token_ids == want
