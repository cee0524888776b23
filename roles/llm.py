"""LLM: the offline, synchronous API in vLLM's shape (generate, chat, embed) over one engine."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from splitserve.errors import InvalidRequestError
from splitserve.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
)
from splitserve.roles.engine.async_engine import heap_frozen_while
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.llm_engine import LLMEngine, PromptType
from splitserve.roles.models import generation_config as gen_config
from splitserve.sampling_params import PoolingParams, SamplingParams, embedding_request

Messages = list[dict[str, Any]]


class LLM:
    """Generate with one in-process engine.

    ``LLM()`` loads the embedded SmolLM2-135M-Instruct; ``model`` also takes a Hugging
    Face folder or a ``.gguf`` file. ``generation_config``: whose sampling defaults
    ``generate`` / ``chat`` use when given no SamplingParams (``auto``: the model folder's
    ``generation_config.json``; ``vllm``: none; or a folder holding one), as vLLM's. Other
    keyword arguments are EngineConfig fields.
    """

    def __init__(self, model: str | None = None, *, generation_config: str = "auto",
                 **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._ids = itertools.count()
        self._defaults = gen_config.defaults_for(generation_config, self.engine.tokenizer)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams ``generate`` and ``chat`` use when given none: the model's
        generation config over vLLM's defaults (as vLLM's ``LLM``)."""
        return SamplingParams(**self._defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | dict[str, Any],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in input order.

        A prompt is text, token ids, or vLLM's dict ``{"prompt" | "prompt_token_ids",
        "multi_modal_data": {"image": img | [imgs]}}`` for a multimodal model.
        ``priority``: one per prompt, as vLLM's (needs ``scheduling_policy="priority"``;
        lower runs first).
        """
        prompt_list = _as_prompt_inputs(prompts)
        params = _as_params_list(sampling_params or self.get_default_sampling_params(),
                                 len(prompt_list))
        if priority is not None:
            if len(priority) != len(prompt_list):
                raise InvalidRequestError(
                    f"got {len(priority)} priorities for {len(prompt_list)} prompts",
                    field="priority")
            params = [dataclasses.replace(p, priority=v)
                      for p, v in zip(params, priority, strict=True)]
        return self._run(prompt_list, params)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (or ``chat_template``, Jinja text) to each
        conversation, then generate (``continue_final_message``, ``chat_template_kwargs``,
        ``chat_template``: as vLLM's ``LLM.chat``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts: list[PromptType | dict[str, Any]] = [
            tok.apply_chat_template(list(c), add_generation_prompt,  # type: ignore[arg-type]
                                    continue_final_message=continue_final_message,
                                    template_kwargs=chat_template_kwargs,
                                    chat_template=chat_template)
            for c in conversations
        ]
        params = _as_params_list(sampling_params or self.get_default_sampling_params(),
                                 len(prompts))
        return self._run(prompts, params)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType] | dict[str, Any],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in input order (vLLM's ``LLM.embed``): the prompt's final
        hidden states pooled (``PoolingParams``; left-out fields take the model's pooler,
        see ``roles/engine/pooling.py``). ``truncate_prompt_tokens``: keep the last k tokens."""
        prompt_list = _as_prompt_inputs(prompts)
        params = embedding_params(len(prompt_list), pooling_params, truncate_prompt_tokens)
        return embedding_outputs(self._run(prompt_list, params))

    def _run(
        self, prompts: list[PromptType | dict[str, Any]], params: list[SamplingParams]
    ) -> list[RequestOutput]:
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                self.engine.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception:
            self.engine.abort_request(added)
            self.engine.step()  # drain the abort outputs so the engine is clean
            raise
        return self._collect(ids)

    def _collect(self, ids: list[str]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with heap_frozen_while():
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    if delta.request_id in wanted:
                        _merge(results, delta)
        for delta in self.engine.step():  # outputs produced by the last update
            if delta.request_id in wanted:
                _merge(results, delta)
        return [results[i] for i in ids]


def embedding_params(
    count: int, pooling_params: PoolingParams | Sequence[PoolingParams] | None,
    truncate_prompt_tokens: int | None = None,
) -> list[SamplingParams]:
    """The one-token requests ``embed`` sends for ``count`` prompts (``LLM``, ``Cluster``)."""
    if pooling_params is None or isinstance(pooling_params, PoolingParams):
        pools = [pooling_params or PoolingParams()] * count
    else:
        pools = list(pooling_params)
        if len(pools) != count:
            raise InvalidRequestError(f"got {len(pools)} pooling params for {count} prompts",
                                      field="pooling_params")
    return [embedding_request(pool, truncate_prompt_tokens) for pool in pools]


def embedding_outputs(outs: Sequence[RequestOutput]) -> list[EmbeddingRequestOutput]:
    return [EmbeddingRequestOutput(out.request_id, out.prompt_token_ids,
                                   EmbeddingOutput(out.embedding or []), out.finished)
            for out in outs]


def _merge(results: dict[str, RequestOutput], delta: RequestOutput) -> None:
    acc = results.get(delta.request_id)
    if acc is None:
        acc = results[delta.request_id] = RequestOutput(
            delta.request_id, delta.prompt, delta.prompt_token_ids, [], False,
            delta.num_cached_tokens, {},
        )
    for c in delta.outputs:
        while len(acc.outputs) <= c.index:
            acc.outputs.append(CompletionOutput(len(acc.outputs), "", []))
        target = acc.outputs[c.index]
        target.text += c.text
        target.token_ids.extend(c.token_ids)
        target.finish_reason = c.finish_reason
        target.stop_reason = c.stop_reason
        if c.logprobs is not None:
            target.logprobs = (target.logprobs or []) + c.logprobs
            target.cumulative_logprob = c.cumulative_logprob
    if acc.prompt_logprobs is None:  # the first sample's (each of n computes the same)
        acc.prompt_logprobs = delta.prompt_logprobs
    if delta.embedding is not None:
        acc.embedding = delta.embedding
    acc.finished = delta.finished
    acc.metrics.update(delta.metrics)


def _as_prompt_inputs(prompts: Any) -> list[PromptType | dict[str, Any]]:
    """Like ``_as_prompt_list``, but dict prompts that carry ``multi_modal_data`` stay dicts
    (the engine reads them)."""
    items = [prompts] if isinstance(prompts, dict) else prompts
    if isinstance(items, list | tuple) and any(
        isinstance(p, dict) and p.get("multi_modal_data") for p in items
    ):
        return [p if isinstance(p, dict) else _as_prompt_list([p])[0] for p in items]
    return list(_as_prompt_list(prompts))


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        prompts = [prompts]
    elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes) or not prompts:
        raise InvalidRequestError("prompts must be a non-empty string or list", field="prompt")
    out: list[PromptType] = []
    for p in prompts:
        if isinstance(p, dict):
            p = p.get("prompt_token_ids", p.get("prompt"))
        if not isinstance(p, str | Sequence):
            raise InvalidRequestError("each prompt must be a string or token ids", field="prompt")
        out.append(p)
    return out


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError(
            f"got {len(params)} sampling params for {n} prompts", field="sampling_params"
        )
    return list(params)
