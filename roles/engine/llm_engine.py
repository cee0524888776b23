"""LLMEngine: one engine instance (prefill and decode in one process).

Owns request intake (tokenize, validate, fan out ``n`` samples), the step loop
(schedule -> execute -> update) and turning finished work into RequestOutput
deltas with text. Not thread-safe: AsyncEngine and the workers drive it from one
thread.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitserve.errors import InvalidRequestError, KVCacheCapacityError
from splitserve.kvtransfer.params import KvTransferParams
from splitserve.outputs import CompletionOutput, Logprob, RequestOutput
from splitserve.request import RequestStatus
from splitserve.roles.encoder import ImageEncoder
from splitserve.roles.engine.config import EngineConfig
from splitserve.roles.engine.detokenizer import IncrementalDetokenizer
from splitserve.roles.engine.kv_cache_manager import KVCacheManager
from splitserve.roles.engine.model_runner import ModelRunner
from splitserve.roles.engine.multimodal import (
    FIELD,
    ImagePlaceholder,
    MultiModalInputs,
    check_data,
    check_embeds,
    expand_placeholders,
    split_prompt,
)
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.sampler import SampleResult, draw_seed
from splitserve.roles.engine.scheduler import Scheduler, SchedulerOutput
from splitserve.roles.models.loader import LoadedModel, load_model
from splitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``EngineConfig.dtype`` names -> torch dtypes (every role that loads weights uses these)."""
PromptType = str | Sequence[int]


@dataclass
class _Tracked:
    """Engine-side bookkeeping of one child request (one of the ``n`` samples)."""

    parent_id: str
    index: int
    prompt: str | None
    detok: IncrementalDetokenizer
    num_sent_tokens: int = 0
    cumulative_logprob: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


class LLMEngine:
    """Tokenize, schedule, run and detokenize requests on one model instance."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = TORCH_DTYPES[config.dtype]
        loaded = load_model(config.model, self.dtype)
        self.model_id = loaded.model_id
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget()
        self.runner = ModelRunner(
            loaded.config, loaded.weights, self.num_blocks, config.block_size, self.dtype,
            torch.device(config.device),
        )
        self.image_encoder = self._image_encoder(loaded)
        """Vision tower + projector of a LLaVA model (None for text-only models)."""
        self.kv = KVCacheManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, self.kv, self.max_model_len)
        self._tracked: dict[str, _Tracked] = {}
        self._children: dict[str, list[str]] = {}
        self._pending: list[RequestOutput] = []
        self._rng = random.Random(config.seed)
        self.kv_worker: Any = None
        """Worker half of the KV connector once ``attach_kv_connector`` made this a P/D role."""

    def _image_encoder(self, loaded: LoadedModel) -> ImageEncoder | None:
        llava = loaded.config.llava
        if llava is None:
            return None
        return ImageEncoder.from_weights(
            llava, loaded.weights, loaded.path, torch.device(self.config.device),
            self.config.encoder_cache_bytes,
        )

    def _blocks_for_budget(self) -> int:
        per_block = self.model_config.kv_bytes_per_token * self.config.block_size
        per_block *= torch.tensor([], dtype=self.dtype).element_size()
        blocks = self.config.kv_cache_memory_bytes // per_block
        if blocks < 1:
            raise KVCacheCapacityError(
                f"kv_cache_memory_bytes={self.config.kv_cache_memory_bytes} is smaller than one "
                f"KV block ({per_block} bytes)",
                field="kv_cache_memory_bytes",
            )
        return int(blocks)

    # ------------------------------------------------------------------ intake

    def add_request(
        self,
        request_id: str,
        prompt: PromptType | dict[str, Any],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
        resume_token_ids: Sequence[int] = (),
        multi_modal_data: dict[str, Any] | None = None,
    ) -> list[int]:
        """Queue a request; returns its prompt token ids. Raises InvalidRequestError.

        ``prompt`` may be vLLM's dict form (``{"prompt" | "prompt_token_ids",
        "multi_modal_data"}``). ``multi_modal_data``: ``{"image": img | [imgs]}`` (one
        placeholder token per image in the prompt; this engine runs the vision tower) or
        ``{"image_embeds": [[T, H] arrays], "image_hashes": [int]}`` (an encode worker's
        output). The returned ids have each placeholder expanded to its image's tokens.

        ``kv_transfer_params``: ``{"do_remote_decode": True}`` makes this engine a prefill
        role for the request (it stops after the first token and hands its KV off); a
        ``KvTransferParams`` dict makes it a decode role (it pulls the prompt's KV first).
        ``resume_token_ids``: output tokens already generated (and streamed) elsewhere; the
        request continues after them, with the same draws it would have made there.
        """
        params = params or SamplingParams()
        remote_params, remote_decode = self._transfer_role(kv_transfer_params, params)
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", field="request_id")
        if request_id in self._children:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        inner, multi_modal_data = split_prompt(prompt, multi_modal_data)
        token_ids = self.tokenize_prompt(inner)
        mm = None
        if multi_modal_data:
            token_ids, mm = self._multimodal_inputs(token_ids, multi_modal_data)
        max_tokens = self._check_lengths(token_ids, params)
        resume = self._check_resume(resume_token_ids, max_tokens)
        text = inner if isinstance(inner, str) else None
        arrival = arrival_time if arrival_time is not None else time.time()
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        children = [request_id if params.n == 1 else f"{i}_{request_id}" for i in range(params.n)]
        for i, child_id in enumerate(children):
            seed = base_seed if i == 0 else draw_seed(base_seed, -i)
            req = Request(
                child_id, token_ids, params, seed=seed, max_tokens=max_tokens,
                eos_token_ids=self.tokenizer.eos_token_ids, block_size=self.config.block_size,
                arrival_time=arrival, output_token_ids=resume, remote_params=remote_params,
                remote_decode=remote_decode, mm=mm,
            )
            detok = IncrementalDetokenizer(self.tokenizer, params)
            detok.prime(resume)
            self._tracked[child_id] = _Tracked(
                request_id, i, text, detok, num_sent_tokens=len(resume),
                metrics={"arrival_time": arrival},
            )
            self.scheduler.add_request(req)
        self._children[request_id] = children
        return token_ids

    def _transfer_role(
        self, kv_transfer_params: dict[str, Any] | None, params: SamplingParams
    ) -> tuple[Any, bool]:
        """(remote params to pull, hand off after the first token) from a request's params."""
        if not kv_transfer_params:
            return None, False
        if self.kv_worker is None:
            raise InvalidRequestError(
                "this engine has no KV connector (attach_kv_connector)", field="kv_transfer_params"
            )
        if params.n != 1:
            raise InvalidRequestError("disaggregated requests must have n == 1", field="n")
        if kv_transfer_params.get("do_remote_decode"):
            return None, True
        try:
            return KvTransferParams.decode_any(kv_transfer_params), False
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidRequestError(f"bad kv_transfer_params: {e}", "kv_transfer_params") from e

    def _multimodal_inputs(
        self, token_ids: list[int], data: Any
    ) -> tuple[list[int], MultiModalInputs]:
        """Expand the image placeholders and gather the images' embeddings (encoding raw
        images here: this engine is monolithic for them)."""
        llava = self.model_config.llava
        if llava is None or self.image_encoder is None:
            raise InvalidRequestError(
                f"the model {self.model_id!r} is text-only; it takes no multi_modal_data",
                field=FIELD,
            )
        kind, items = check_data(data)
        if kind == "image":
            lengths = [llava.num_image_tokens] * len(items)
        else:
            embeds, hashes = check_embeds(items, data.get("image_hashes"), self.model_config.hidden_size)
            lengths = [e.shape[0] for e in embeds]
        token_ids, offsets = expand_placeholders(token_ids, llava.image_token_id, lengths)
        if kind == "image":
            encoded = self.image_encoder.encode(items, field=f"{FIELD}.image")
            hashes, embeds = [h for h, _ in encoded], [e for _, e in encoded]
        places = [ImagePlaceholder(o, n, h) for o, n, h in zip(offsets, lengths, hashes, strict=True)]
        return token_ids, MultiModalInputs(places, embeds)

    def _check_resume(self, resume: Sequence[int], max_tokens: int) -> list[int]:
        resume = list(resume)
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in resume):
            raise InvalidRequestError("resume token ids out of range", field="resume_token_ids")
        if len(resume) >= max_tokens:
            raise InvalidRequestError(
                f"{len(resume)} resumed tokens leave nothing to generate (max_tokens "
                f"{max_tokens})", field="resume_token_ids",
            )
        return resume

    def tokenize_prompt(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", field="prompt")
            return self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {vocab})", field="prompt_token_ids"
            )
        return token_ids

    def _check_lengths(self, token_ids: list[int], params: SamplingParams) -> int:
        """The request's effective max_tokens, after checking it can ever run."""
        n = len(token_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {n} tokens; the model's context length (max_model_len) is "
                f"{self.max_model_len}, which leaves no room to generate",
                field="prompt",
            )
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        capacity = self.num_blocks * self.config.block_size
        if n + max_tokens > capacity:
            culprit = "prompt" if n >= capacity else "max_tokens"
            raise KVCacheCapacityError(
                f"the request needs KV for {n + max_tokens} tokens ({n} prompt + {max_tokens} "
                f"max_tokens) but the KV cache holds only {capacity} tokens; lower {culprit} or "
                "raise kv_cache_memory_bytes",
                field=culprit,
            )
        return max_tokens

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests wherever they are and free their KV; emits a final 'abort' output."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            if request_id in self.scheduler.held and self.kv_worker is not None:
                self.kv_worker.abort(request_id)  # ends the lease; blocks freed next step
            for child in self._children.get(request_id, []):
                req = self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                if req is not None:
                    self._pending.append(self._output_for(req, [], None))
                    self._forget(req)

    def withdraw_request(self, request_id: str) -> bool:
        """Abort a request only if no step has touched it yet (queued-request migration).

        True when every sample is still waiting with nothing computed: the request is
        aborted here (final 'abort' output) and the caller may run it elsewhere. False
        when it started (or is unknown): it stays where it is.
        """
        children = self._children.get(request_id, [])
        waiting = {r.request_id: r for r in self.scheduler.waiting}
        if not children or any(
            c not in waiting or waiting[c].num_computed_tokens > 0 for c in children
        ):
            return False
        self.abort_request(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._children)

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns delta outputs of the requests that progressed."""
        out = self.scheduler.schedule()
        self._stamp(out)
        if self.kv_worker is not None and out.kv_meta is not None:
            self.kv_worker.apply(out.kv_meta)
        if not out.is_empty:
            result = self.runner.execute(out)
            tokens = {rid: r.token_id for rid, r in result.sampled.items()}
            updated = self.scheduler.update(out, tokens)
            self._pending.extend(self._process(updated, result.sampled))
        if self.kv_worker is not None:
            loading = set(self.scheduler.loading)
            for req in self.scheduler.update_transfers(self.kv_worker.get_finished()):
                self._pending.append(self._output_for(req, [], None))
                self._forget(req)
            now = time.time()
            for rid in loading.difference(self.scheduler.loading):
                if rid in self._tracked:
                    self._tracked[rid].metrics.setdefault("kv_load_end_time", now)
        outputs, self._pending = self._pending, []
        return outputs

    def _stamp(self, out: SchedulerOutput) -> None:
        """Per-stage timestamps: first scheduled (queue ends), KV load start (decode role)."""
        now = time.time()
        for s in out.scheduled:
            tracked = self._tracked.get(s.request.request_id)
            if tracked is not None:
                tracked.metrics.setdefault("first_scheduled_time", now)
        for rid in self.scheduler.loading:
            tracked = self._tracked.get(rid)
            if tracked is not None:
                tracked.metrics.setdefault("kv_load_start_time", now)

    # ------------------------------------------------------------------ disaggregation

    def attach_kv_connector(
        self, transport: Any, engine_id: str, lease_ttl_s: float = 30.0,
        transfer_config: Any = None,
    ) -> Any:
        """Make this engine a disaggregated role: serve and pull KV blocks through ``transport``."""
        from splitserve.kvtransfer.connector_scheduler import KvConnectorScheduler
        from splitserve.kvtransfer.connector_worker import KvConnectorWorker

        self.kv_worker = KvConnectorWorker(
            engine_id, self.runner.kv_caches, transport, self.model_id, transfer_config,
            lease_ttl_s=lease_ttl_s,
        )
        self.scheduler.connector = KvConnectorScheduler()
        return self.kv_worker

    def has_pending_transfers(self) -> bool:
        """Loads in flight or blocks held for readers: the engine must keep stepping."""
        return self.scheduler.has_transfers()

    def _hand_off(self, req: Request) -> dict[str, Any] | None:
        """Prefill side: hold the request's prompt blocks under a lease for the decode role."""
        assert self.kv_worker is not None
        self.scheduler.hand_off(req.request_id)
        num_tokens = req.num_prompt_tokens
        block_ids = self.kv.get_block_ids(req.request_id)[: self.kv.blocks_for(num_tokens)]
        try:
            return self.kv_worker.offer(req.request_id, block_ids, num_tokens).to_dict()
        except Exception:
            logger.exception("could not offer KV of %s", req.request_id)
            self.scheduler.release_held(req.request_id)
            return None

    def _process(self, updated: list[Request], sampled: dict[str, SampleResult]) -> list[RequestOutput]:
        outputs = []
        now = time.time()
        for req in updated:
            tracked = self._tracked[req.request_id]
            tracked.metrics.setdefault("first_token_time", now)
            new_tokens = req.output_token_ids[tracked.num_sent_tokens :]
            tracked.num_sent_tokens = req.num_output_tokens
            stop = tracked.detok.update(new_tokens)
            if stop is not None and not req.is_finished:
                self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
            if stop is not None:
                req.stop_reason = stop
            handoff = None
            if req.remote_decode and not req.is_finished:
                handoff = self._hand_off(req)
                if handoff is None:
                    req.status = RequestStatus.FINISHED_ERROR
            if req.is_finished:
                tracked.metrics["finished_time"] = now
            output = self._output_for(req, new_tokens, sampled.get(req.request_id))
            if handoff is not None:
                output.kv_transfer_params = handoff
                output.outputs[0].finish_reason = None  # the decode role continues it
            outputs.append(output)
            if req.is_finished:
                self._forget(req)
        return outputs

    def _output_for(
        self, req: Request, new_tokens: list[int], sample: SampleResult | None
    ) -> RequestOutput:
        tracked = self._tracked[req.request_id]
        finished = req.is_finished
        logprobs = None
        if req.sampling_params.logprobs is not None and sample is not None and sample.top_logprobs:
            tracked.cumulative_logprob += sample.logprob or 0.0
            logprobs = [self._decode_logprobs(sample.top_logprobs)]
        completion = CompletionOutput(
            index=tracked.index,
            text=tracked.detok.take_delta(finished),
            token_ids=list(new_tokens),
            finish_reason=req.status.finish_reason if finished else None,
            stop_reason=req.stop_reason if finished else None,
            cumulative_logprob=tracked.cumulative_logprob if logprobs is not None else None,
            logprobs=logprobs,
        )
        siblings = self._children.get(tracked.parent_id, [])
        parent_done = finished and all(
            c == req.request_id or c not in self._tracked for c in siblings
        )
        return RequestOutput(
            request_id=tracked.parent_id,
            prompt=tracked.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[completion],
            finished=parent_done,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            metrics=dict(tracked.metrics),
        )

    def _decode_logprobs(self, top: dict[int, Logprob]) -> dict[int, Logprob]:
        for token_id, lp in top.items():
            lp.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return top

    def _forget(self, req: Request) -> None:
        tracked = self._tracked.pop(req.request_id)
        siblings = self._children.get(tracked.parent_id, [])
        if not any(c in self._tracked for c in siblings):
            self._children.pop(tracked.parent_id, None)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, float]:
        kv = self.kv
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": kv.usage,
            "num_free_blocks": kv.pool.num_free_blocks,
            "num_blocks": kv.num_blocks,
            "prefix_cache_queries": kv.num_prefix_queries,
            "prefix_cache_hits": kv.num_prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_loading_kv": len(self.scheduler.loading),
            "num_held_kv": len(self.scheduler.held),
            "num_remote_fallbacks": self.scheduler.num_remote_fallbacks,
            **(self.kv_worker.counters if self.kv_worker is not None else {}),
            **(self.image_encoder.stats() if self.image_encoder is not None else {}),
        }
