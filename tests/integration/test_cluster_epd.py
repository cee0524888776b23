"""E/P/D on a real Ray cluster (tiny random LLaVA): 1 encode + 1 prefill + 1 decode worker.

Checks: greedy outputs of image prompts equal the monolithic multimodal engine token for token;
a repeated image is an embedding-cache hit on the encode worker; images reach decode too (a
short prompt prefilled locally on decode); bad images fail alone; the stage timing has encode;
a killed encode worker is replaced and the request waits for it; image chats over HTTP.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from splitserve import LLM, Cluster, SamplingParams
from splitserve.errors import InvalidRequestError
from tests.utils import assert_workers_intact, make_tiny_llava

pytestmark = [pytest.mark.ray, pytest.mark.ucx]

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_llava(tmp_path_factory.mktemp("llava-epd") / "tiny-llava", tokenizer_dir)


@pytest.fixture(scope="module")
def image_token(llava_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llava_dir)).convert_tokens_to_ids("<image>")


@pytest.fixture(scope="module")
def cluster(llava_dir):
    with Cluster.local(prefill=1, decode=1, encode=1, model=str(llava_dir),
                       kv_cache_memory_bytes=16 << 20,
                       router={"local_prefill_max_tokens": 23}) as c:
        yield c
        assert_workers_intact(h for h in c.workers.values() if h.healthy)


def _prompts(image_token: int) -> list[dict]:
    a, b, c = _png(1), _png(2), _png(3, size=(64, 64))
    text = lambda n, k: list(range(100 + k, 100 + k + n))  # noqa: E731
    return [
        {"prompt_token_ids": text(5, 0) + [image_token] + text(7, 1),
         "multi_modal_data": {"image": a}},
        {"prompt_token_ids": [image_token] + text(20, 2) + [image_token] + text(3, 3),
         "multi_modal_data": {"image": [b, base64.b64encode(c).decode()]}},
        {"prompt_token_ids": text(9, 4) + [image_token] + text(30, 5),
         "multi_modal_data": {"image": f"data:image/png;base64,{base64.b64encode(a).decode()}"}},
        {"prompt_token_ids": text(40, 6)},  # text only, on the same cluster
    ]


def test_epd_equals_monolithic_and_hits_the_embedding_cache(cluster, llava_dir, image_token):
    prompts = _prompts(image_token)
    want = [o.outputs[0].token_ids for o in LLM(str(llava_dir)).generate(prompts, GREEDY)]
    outs = cluster.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert outs[0].metrics["encode_s"] > 0 and "encode_s" not in outs[3].metrics
    encode = next(w for w in cluster.status()["workers"] if w["role"] == "encode")
    # four images sent, three distinct: the third prompt's image (same pixels as the first,
    # sent as a data URL) is served from the cache
    assert encode["encoder_cache_misses"] == 3 and encode["encoder_cache_hits"] == 1
    again = cluster.generate(prompts[:1], GREEDY)
    assert again[0].outputs[0].token_ids == want[0]
    encode = next(w for w in cluster.status()["workers"] if w["role"] == "encode")
    assert encode["encoder_cache_hits"] == 2
    # same image, same tokens: the KV was reused, on the prefill worker or, when the router
    # already knew the decode worker holds the prefix (the rest is under the local-prefill
    # threshold), on the decode worker
    hits = {w["role"]: w.get("prefix_cache_hits", 0) for w in cluster.status()["workers"]}
    assert hits["prefill"] + hits["decode"] > 0, hits


def test_short_image_prompt_prefilled_on_decode(cluster, llava_dir, image_token):
    """The uncached part is under the threshold: decode prefills it, with the embeddings."""
    prompt = {"prompt_token_ids": [image_token, 300, 301], "multi_modal_data": {"image": _png(4)}}
    local = cluster.counters["route:local_prefill"]
    got = cluster.generate([prompt], GREEDY)[0]  # 18 tokens (16 of the image) < 24: local
    want = LLM(str(llava_dir)).generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert got.outputs[0].token_ids == want
    assert cluster.counters["route:local_prefill"] == local + 1


def test_bad_images_fail_alone(cluster, image_token):
    good = {"prompt_token_ids": [image_token, 5, 6], "multi_modal_data": {"image": _png(5)}}
    for bad, field in (
        ({"prompt_token_ids": [image_token, 5], "multi_modal_data": {"image": b"not a png"}},
         "multi_modal_data.image"),
        ({"prompt_token_ids": [image_token, 5], "multi_modal_data": {"image": "@@@"}},
         "multi_modal_data.image"),
        ({"prompt_token_ids": [5, 6], "multi_modal_data": {"image": _png(6)}},
         "multi_modal_data"),
    ):
        with pytest.raises(InvalidRequestError) as err:
            cluster.generate([good, bad], GREEDY)
        assert err.value.field == field
    assert len(cluster.generate([good], GREEDY)[0].outputs[0].token_ids) == 8


def test_encode_worker_killed_is_replaced_and_requests_wait_for_it(cluster, llava_dir,
                                                                  image_token) -> None:
    encode = next(h for h in cluster.workers.values() if h.role == "encode" and h.healthy)
    encode.actor.die.remote()
    prompt = {"prompt_token_ids": [7, image_token, 8, 9] + list(range(400, 430)),
              "multi_modal_data": {"image": _png(8)}}
    got = cluster.generate([prompt], GREEDY)[0]  # waits for the new encode worker
    want = LLM(str(llava_dir)).generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert got.outputs[0].token_ids == want
    live = [w for w in cluster.status()["workers"] if w["role"] == "encode" and w["healthy"]]
    assert len(live) == 1 and live[0]["worker_id"] != encode.worker_id
    assert cluster.counters["workers_replaced"] == 1


def test_http_image_chat_through_the_cluster(cluster, image_token) -> None:
    """Last in the module: closing the server closes the backend, i.e. this cluster."""
    import httpx

    from splitserve.cluster.frontends.backend import ClusterBackend
    from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions

    url = "data:image/png;base64," + base64.b64encode(_png(7)).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    opts = ServeOptions(port=0, grpc_port=None, served_model_name="tiny")
    with BackgroundServer(ClusterBackend(cluster), opts) as srv, \
            httpx.Client(base_url=srv.http_url, timeout=120) as http:
        first = http.post("/v1/chat/completions", json=body)
        again = http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["message"] == again.json()["choices"][0]["message"]
        assert first.json()["timing"]["encode"] > 0
        text = http.get("/metrics").text
        version = http.get("/version").json()
        workers = cluster.status()["workers"]
    # /version says what the prefill and decode workers chose, not only what was asked
    assert version["dtype_requested"] == "float32" and version["dtype"] == "float32"
    assert version["dtype_reason"] == "requested" and version["weight_formats"]
    llm_workers = [w for w in workers if w["role"] in ("prefill", "decode") and w["healthy"]]
    assert len(llm_workers) == 2 and all(w["formats"]["dtype"] == "float32" for w in llm_workers)
    assert all(w["formats"] == {} for w in workers if w["role"] == "encode")
    # each worker's process froze its heap once its model was built (SPLITSERVE_GC_FREEZE)
    assert all(w["gc_frozen_objects"] > 10_000 for w in workers if w["healthy"]), workers
    assert 'splitserve:encoder_cache_hits_total{role="encode"' in text
