"""The real SmolLM2 behind the HTTP API: greedy chat through ``openai`` equals ``LLM.chat``."""

from __future__ import annotations

import openai
import pytest

from splitserve import SamplingParams
from splitserve.cluster.frontends.backend import EngineBackend
from splitserve.cluster.frontends.serve import BackgroundServer, ServeOptions

pytestmark = pytest.mark.slow


def test_greedy_chat_equals_llm(smollm) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = smollm.chat(messages, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    backend = EngineBackend.from_config(kv_cache_memory_bytes=1 << 28)
    with BackgroundServer(backend, ServeOptions(port=0, grpc_port=None)) as srv:
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        res = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=24
        )
        streamed = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=24, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert res.choices[0].message.content == ref.text == text
    assert "Paris" in ref.text
