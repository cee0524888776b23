"""The model's generation_config.json over HTTP and gRPC, as vLLM serves it: its sampling
values fill the fields a request leaves unset (here temperature 0 and max_new_tokens 3, so an
unset request is greedy and 3 tokens long), a request's own values win, and
``generation_config="vllm"`` turns them off."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from splitserve import LLM, SamplingParams
from splitserve.client import Client
from splitserve.roles.models import generation_config as gen_config
from tests.utils import tiny_server

PROMPT = list(range(700, 712))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("gencfg") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    (folder / gen_config.FILE).write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    return folder


@pytest.fixture(scope="module")
def greedy(tiny_model_dir: Path) -> list[int]:
    return list(LLM(str(tiny_model_dir), num_kv_blocks=64).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
        .outputs[0].token_ids)


@pytest.fixture(scope="module", params=["auto", "vllm"])
def server(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[Any]:
    with tiny_server(model_dir, grpc_port=0, generation_config=request.param) as srv:
        yield srv


def _completion(server: Any, **fields: Any) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": PROMPT, "ignore_eos": True, "return_token_ids": True,
            "seed": 1, **fields}
    r = httpx.post(server.http_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


def test_unset_fields_take_the_models_defaults(server: Any, greedy: list[int]) -> None:
    auto = server.opts.generation_config == "auto"
    version = httpx.get(server.http_url + "/version", timeout=60).json()
    assert version["default_sampling_params"] == ({"temperature": 0.0, "max_tokens": 3}
                                                  if auto else {})
    # completions' max_tokens defaults to 16 (OpenAI's); null leaves it to the model's config
    unset = _completion(server, max_tokens=None)
    if auto:
        assert unset["token_ids"] == greedy[:3] and unset["finish_reason"] == "length"
    else:  # vLLM's defaults: temperature 1, up to the context
        assert len(unset["token_ids"]) > 3 and unset["token_ids"][:3] != greedy[:3]
    # the request's own values win over the config's
    own = _completion(server, max_tokens=5, temperature=0.0)
    assert own["token_ids"] == greedy[:5]
    sampled = _completion(server, max_tokens=3, temperature=1.0)
    assert sampled["token_ids"] != greedy[:3]
    # chat without max_tokens: the config's 3
    chat = httpx.post(server.http_url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
        "max_tokens": None if auto else 4})
    assert chat.json()["usage"]["completion_tokens"] == (3 if auto else 4)
    # gRPC: unset proto fields the same
    with Client(server.grpc_target, timeout=60) as client:
        res = client.generate(token_ids=PROMPT, ignore_eos=True, seed=1,
                              **({} if auto else {"max_tokens": 3}))
    if auto:
        assert list(res.completions[0].token_ids) == greedy[:3]
    else:  # vLLM's defaults: sampled
        assert list(res.completions[0].token_ids) != greedy[:3]


def test_a_default_max_tokens_past_the_context_is_capped(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    """The config's max_new_tokens beyond what fits beside a prompt (context 512) is not a
    400 as a client's would be: the answer runs to the context's end (vLLM caps a default)."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    (folder / gen_config.FILE).write_text(json.dumps({"max_new_tokens": 600}))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
            "temperature": 0}
    with tiny_server(folder, grpc_port=None) as srv:
        url = srv.http_url + "/v1/chat/completions"
        res = httpx.post(url, json=body, timeout=120).json()
        asked = httpx.post(url, json={**body, "max_tokens": 600}, timeout=60)
    usage = res["usage"]
    assert res["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "max_tokens"
