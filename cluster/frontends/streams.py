"""Stream plumbing the frontends share: start requests, surface their errors, merge, collect.

Owns the rule that a request's validation error comes out *before* any response bytes (the
first delta of every stream is awaited up front), the fan-in of several prompts' streams, and
the per-choice accumulation of deltas (text, token ids, logprobs, finish reason, usage).
Closing any stream returned here closes the backend's iterators, which aborts their requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from splitserve.cluster.frontends.backend import Backend, PromptInput
from splitserve.errors import InvalidRequestError
from splitserve.offload import off_loop
from splitserve.outputs import CompletionOutput, Logprob, RequestOutput
from splitserve.sampling_params import SamplingParams
from splitserve.validation import truncate_prompt

_DONE = object()


async def open_streams(
    backend: Backend, prompts: Sequence[PromptInput], params: SamplingParams, request_id: str,
    max_tokens_asked: bool = True,
) -> list[AsyncIterator[RequestOutput]]:
    """Start one backend request per prompt and wait for each one's first delta.

    Raises the first error (InvalidRequestError, ...) after closing every started stream.
    ``max_tokens_asked`` false: ``params.max_tokens`` is a default (the model's generation
    config), not the client's, so a prompt it does not fit beside is not refused: the answer
    ends at the context's end, as vLLM caps a default.
    """
    prompts = [await _check_context(backend, prompt, params, max_tokens_asked)
               for prompt in prompts]
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    gens = [backend.generate(p, params, rid) for p, rid in zip(prompts, ids, strict=True)]
    starts = [asyncio.ensure_future(anext(g)) for g in gens]
    try:
        firsts = await asyncio.gather(*starts)
    except BaseException:
        # gather returns at the first error while the other starts still run: stop them before
        # closing their iterators (closing a running one fails, and the request it then starts
        # would hold its admission slot and KV until garbage collection; CI's fuzz found that)
        for start in starts:
            start.cancel()
        await asyncio.gather(*starts, return_exceptions=True)
        await close_all(gens)
        raise
    return [_Primed(first, g) for first, g in zip(firsts, gens, strict=True)]


async def _check_context(
    backend: Backend, prompt: PromptInput, params: SamplingParams, max_tokens_asked: bool = True
) -> PromptInput:
    """Refuse prompt + max_tokens beyond the context, as OpenAI and vLLM servers do (400);
    returns the prompt to send. A text prompt is tokenized off the loop (megabytes of text
    take seconds, during which every other stream of this frontend would wait) with the
    backend's own tokenizer, and its ids are what the backend then gets: it would otherwise
    tokenize the same text again (the ids are what it would compute; no response here
    repeats the prompt's text). ``truncate_prompt_tokens`` cuts the ids first, as the engine
    would."""
    if params.max_tokens is None and params.truncate_prompt_tokens is None:
        return prompt
    if isinstance(prompt, str):
        encode = getattr(backend.tokenizer, "encode", None)
        if encode is None:
            return prompt  # the backend validates what it cannot be told here
        prompt = list(await off_loop(encode, prompt))
    if isinstance(prompt, list):
        prompt = truncate_prompt(prompt, params, backend.max_model_len)
    if params.max_tokens is None:
        return prompt
    if isinstance(prompt, dict):  # multimodal: the backend checks the expanded length
        num = len(prompt.get("prompt_token_ids", ()))
    else:
        num = len(prompt)
    limit = backend.max_model_len
    if num < limit and num + params.max_tokens > limit and max_tokens_asked:
        raise InvalidRequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num + params.max_tokens} tokens ({num} in the prompt, {params.max_tokens} in the "
            "completion). Please reduce the prompt or max_tokens.",
            field="max_tokens",
        )
    return prompt


class _Primed:
    """A started stream: its first delta, then the rest. ``aclose`` always closes the backend's
    iterator, even if this one was never iterated (a generator that never started would not run
    its ``finally``, leaving the request and its admission slot open until garbage collection).
    """

    def __init__(self, first: RequestOutput, gen: AsyncIterator[RequestOutput]) -> None:
        self._first: RequestOutput | None = first
        self._gen = gen
        self._done = first.finished

    def __aiter__(self) -> _Primed:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            first, self._first = self._first, None
            if self._done:
                await self.aclose()
            return first
        if self._done:
            raise StopAsyncIteration
        try:
            return await anext(self._gen)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._done, self._first = True, None
        await self._gen.aclose()  # type: ignore[attr-defined]


async def merge(
    streams: Sequence[AsyncIterator[RequestOutput]],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Interleave several streams as ``(stream index, delta)``; closing it closes them all."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield 0, delta
        finally:
            await close_all(streams)
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, RequestOutput)
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


async def close_all(streams: Sequence[AsyncIterator[RequestOutput]]) -> None:
    """Close every stream (aborting what still runs); a failing close does not stop the rest."""
    await asyncio.gather(*(s.aclose() for s in streams),  # type: ignore[attr-defined]
                         return_exceptions=True)


async def _pump(
    i: int, stream: AsyncIterator[RequestOutput], queue: asyncio.Queue[tuple[int, object]]
) -> None:
    try:
        async for delta in stream:
            queue.put_nowait((i, delta))
        queue.put_nowait((i, _DONE))
    except Exception as e:
        queue.put_nowait((i, e))


@dataclass
class ChoiceDelta:
    """What one delta added to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    first: bool
    """True on the choice's first delta (chat sends the role then)."""
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """The prompt's logprobs (``SamplingParams.prompt_logprobs``), on the one delta that
    brought them: once per prompt, whatever its ``n``."""
    echo_of: int | None = None
    """Streamed ``echo``: the prompt (by index) whose text goes in front of this delta's."""
    stop_reason: int | str | None = None
    """On the last delta: the stop string or stop token id that ended the choice, if any."""


@dataclass
class Choice:
    """Everything one choice produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Accumulator:
    """Collects the deltas of ``num_prompts`` requests with ``n`` choices each."""

    n: int
    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[dict[int, Logprob] | None]] = field(default_factory=dict)
    """By prompt index: its prompt logprobs, the first copy that came."""
    prompt_ids: dict[int, list[int]] = field(default_factory=dict)
    """By prompt index: its token ids."""

    def add(self, prompt_index: int, delta: RequestOutput) -> list[ChoiceDelta]:
        """Fold one delta in; returns what it added per choice."""
        self.prompt_tokens[prompt_index] = len(delta.prompt_token_ids)
        if prompt_index not in self.prompt_ids:  # once, not a copy per delta
            self.prompt_ids[prompt_index] = list(delta.prompt_token_ids)
        cached = max(self.cached_tokens.get(prompt_index, 0), delta.num_cached_tokens)
        self.cached_tokens[prompt_index] = cached
        deltas = [self._add_completion(prompt_index, c) for c in delta.outputs]
        pl = delta.prompt_logprobs
        if pl is not None and prompt_index not in self.prompt_logprobs:
            self.prompt_logprobs[prompt_index] = pl
            if deltas:
                deltas[0].prompt_logprobs = pl
        return deltas

    def _add_completion(self, prompt_index: int, c: CompletionOutput) -> ChoiceDelta:
        index = prompt_index * self.n + c.index
        first = index not in self.choices
        choice = self.choices.setdefault(index, Choice(index))
        choice.text += c.text
        choice.token_ids.extend(c.token_ids)
        choice.logprobs.extend(c.logprobs or [])
        if c.finish_reason is not None:
            choice.finish_reason = c.finish_reason
            choice.stop_reason = c.stop_reason
        return ChoiceDelta(index, c.text, list(c.token_ids), c.logprobs, c.finish_reason, first,
                           stop_reason=c.stop_reason if c.finish_reason is not None else None)

    def ordered(self) -> list[Choice]:
        return [self.choices[i] for i in sorted(self.choices)]

    def usage(self) -> dict[str, object]:
        """OpenAI ``usage`` with ``prompt_tokens_details.cached_tokens``."""
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(c.token_ids) for c in self.choices.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())},
        }


class EmbeddingLost(Exception):
    """An embedding request ended without its vector (aborted on the way): retry."""


EMBED_FIELDS = ("prompt", "prompt_token_ids", "max_tokens")
"""The engine's names for what an embeddings request calls its input."""


async def embed_all(backend: Backend, inputs: Sequence[PromptInput], params: SamplingParams,
                    request_id: str) -> tuple[list[list[float]], list[int]]:
    """Each input's embedding and prompt token count, in order (``params.pooling`` set):
    one request per input, started together; the backend's errors pass through."""
    streams = await open_streams(backend, inputs, params, request_id)
    vectors: dict[int, list[float]] = {}
    tokens: dict[int, int] = {}
    stream = merge(streams)
    try:
        async for i, delta in stream:
            tokens[i] = len(delta.prompt_token_ids) or tokens.get(i, 0)
            if delta.embedding is not None:
                vectors[i] = delta.embedding
    finally:
        await stream.aclose()
    missing = [i for i in range(len(inputs)) if i not in vectors]
    if missing:
        raise EmbeddingLost(f"inputs {missing} got no embedding; retry")
    return [vectors[i] for i in range(len(inputs))], [tokens[i] for i in range(len(inputs))]
