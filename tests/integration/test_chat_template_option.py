"""``--chat-template`` (vLLM's): a Jinja chat template, from a file or inline, rendered instead
of the model's for every chat the server takes (HTTP chat completions, the Responses API,
gRPC chat), ``splitserve batch`` and ``LLM.chat(chat_template=...)``. A path that is neither a
file nor a template, and a template that cannot render one message, are refused naming the
flag; the HTTP API still refuses a request's own ``chat_template`` (vLLM's default too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from splitserve import LLM, SamplingParams
from splitserve.client import Client
from splitserve.errors import ConfigError
from splitserve.roles.models.tokenizer import load_chat_template
from tests.utils import tiny_server

TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
MESSAGES = [{"role": "user", "content": "Say hello."}]


def _expected(tokenizer_dir: Path, template: str | None) -> list[int]:
    """The ids transformers renders for MESSAGES with ``template`` (None: the model's)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                  chat_template=template)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module", params=["file", "inline"])
def server(request: pytest.FixtureRequest, tiny_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Any:
    value = TEMPLATE
    if request.param == "file":
        path = tmp_path_factory.mktemp("tmpl") / "chat.jinja"
        path.write_text(TEMPLATE)
        value = str(path)
    with tiny_server(tiny_model_dir, grpc_port=0,
                     chat_template=load_chat_template(value)) as srv:
        yield srv


def test_every_chat_the_server_takes_renders_the_given_template(
    server: Any, tokenizer_dir: Path,
) -> None:
    want = _expected(tokenizer_dir, TEMPLATE)
    assert want != _expected(tokenizer_dir, None)  # the model's own renders otherwise
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "return_token_ids": True}
    r = httpx.post(server.http_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_token_ids"] == want
    # gRPC renders it too (the same tokenizer object serves both frontends)
    with Client(server.grpc_target) as client:
        assert client.tokenize(messages=MESSAGES) == want
        out = client.generate(messages=MESSAGES, max_tokens=2, temperature=0.0)
    assert out.usage.prompt_tokens == len(want)
    # a request's own template stays refused, naming the field
    bad = httpx.post(server.http_url + "/v1/chat/completions",
                     json={**body, "chat_template": TEMPLATE}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template"


def test_llm_chat_takes_a_template_per_call(tiny_model_dir: Path, tokenizer_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_kv_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=2)
    given = llm.chat(MESSAGES, params, chat_template=TEMPLATE)[0]
    assert given.prompt_token_ids == _expected(tokenizer_dir, TEMPLATE)
    own = llm.chat(MESSAGES, params)[0]  # the call's template did not stick
    assert own.prompt_token_ids == _expected(tokenizer_dir, None)


@pytest.mark.parametrize(("value", "message"), [
    ("/no/such/template.jinja", "neither a file nor a Jinja template"),
    ("{% for m in messages %}", "does not render a one-message conversation"),
    ("{{ raise_exception('no') }}", "does not render a one-message conversation"),
])
def test_bad_templates_are_refused_naming_the_flag(
    value: str, message: str, tiny_model_dir: Path,
) -> None:
    """The first at reading (before any worker would start), the others when the server's
    tokenizer takes them: a ConfigError naming --chat-template, and the model's template is
    kept."""
    from splitserve.cluster.frontends.backend import EngineBackend
    from splitserve.cluster.frontends.serve import ServeOptions, start_servers

    backend = EngineBackend.from_config(model=str(tiny_model_dir), num_kv_blocks=16)
    try:
        own = backend.tokenizer.hf.chat_template
        with pytest.raises(ConfigError, match=message) as err:
            import asyncio

            asyncio.run(start_servers(backend, ServeOptions(
                port=0, grpc_port=None, chat_template=load_chat_template(value))))
        assert "--chat-template" in str(err.value)
        assert backend.tokenizer.hf.chat_template == own
    finally:
        import asyncio

        asyncio.run(backend.close())


def test_serve_and_batch_take_the_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``splitserve serve --chat-template`` refuses a missing file before starting anything
    (exit 2, the flag named); ``splitserve batch --chat-template`` renders every chat line
    with the file's template."""
    res = subprocess.run(
        [sys.executable, "-m", "splitserve.cluster.tools.cli", "serve", "--model",
         str(tiny_model_dir), "--chat-template", str(tmp_path / "missing.jinja")],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--chat-template" in res.stderr, res.stderr[-2000:]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "tiny", "messages": MESSAGES, "max_tokens": 2,
                                        "return_token_ids": True}}) + "\n")
    from splitserve.cluster.tools.batch import main

    rc = main(["--input", str(inp), "--output", str(out), "--single-engine", "--model",
               str(tiny_model_dir), "--served-model-name", "tiny",
               "--chat-template", str(template)])
    assert rc == 0
    line = json.loads(out.read_text().splitlines()[0])
    body = line["response"]["body"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    want = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                   chat_template=TEMPLATE)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert body["prompt_token_ids"] == want
