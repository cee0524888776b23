"""LLMEngine: one engine instance (prefill and decode in one process).

Owns request intake (tokenize, validate, fan out ``n`` samples), the step loop
(schedule -> execute -> update) and turning finished work into RequestOutput
deltas with text. Not thread-safe: AsyncEngine and the workers drive it from one
thread.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitserve.errors import InvalidRequestError, KVCacheCapacityError, ModelLoadError
from splitserve.integrity import IntegrityReport
from splitserve.kernels import allocator, cpu_ops, native
from splitserve.kvtransfer.params import KvTransferParams
from splitserve.outputs import CompletionOutput, Logprob, RequestOutput
from splitserve.request import RequestStatus
from splitserve.roles.encoder import ImageEncoder
from splitserve.roles.engine import pooling
from splitserve.roles.engine.config import EngineConfig, kv_cache_torch_dtype
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
from splitserve.roles.engine.precision import (
    TORCH_DTYPES,  # noqa: F401 - re-exported: roles import the name map from here
    DtypeChoice,
    resolve_dtype,
    weight_summary,
)
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.sampler import SampleResult, draw_seed
from splitserve.roles.engine.scheduler import Scheduler, SchedulerOutput
from splitserve.roles.engine.speculative import Speculator
from splitserve.roles.engine.structured import StructuredOutputManager
from splitserve.roles.models.loader import LoadedModel, load_model
from splitserve.roles.models.quantize import WeightFormat
from splitserve.sampling_params import PoolingParams, SamplingParams
from splitserve.validation import (
    check_n,
    check_priority,
    check_prompt_length,
    check_token_ids,
    prompt_token_ids,
    truncate_prompt,
)

logger = logging.getLogger(__name__)

PromptType = str | Sequence[int]
MAX_EARLY_TOKENS = 1024
"""First tokens kept for requests not (or no longer) here (``resume_remote``)."""


@dataclass
class _Tracked:
    """Engine-side bookkeeping of one child request (one of the ``n`` samples)."""

    parent_id: str
    index: int
    prompt: str | None
    detok: IncrementalDetokenizer
    num_sent_tokens: int = 0
    cumulative_logprob: float = 0.0
    sent_prompt_logprobs: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


class LLMEngine:
    """Tokenize, schedule, run and detokenize requests on one model instance."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.malloc_tuning = allocator.tune() if torch.device(config.device).type == "cpu" else None
        """glibc malloc settings of this process (CPU only; see ``kernels/allocator``)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype_choice: DtypeChoice = resolve_dtype(config.dtype, config.device)
        self.dtype = self.dtype_choice.dtype
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        """The KV cache's element type (``EngineConfig.kv_cache_dtype``)."""
        fmt = WeightFormat(config.quantization, config.int4_group_size)
        loaded = load_model(config.model, self.dtype, fmt, tokenizer=config.tokenizer)
        self.weights_info = weight_summary(loaded.weights)
        """Tensor count per storage format and total weight bytes, as loaded."""
        logger.info("%s: dtype %s (%s), KV cache %s, quantization %s, weights %s",
                    loaded.model_id, self.dtype_choice.name, self.dtype_choice.reason,
                    str(self.kv_dtype).removeprefix("torch."), config.quantization,
                    self.weights_info)
        self.model_id = loaded.model_id
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget()
        try:
            self.runner = ModelRunner(
                loaded.config, loaded.weights, self.num_blocks, config.block_size, self.dtype,
                torch.device(config.device), kv_dtype=self.kv_dtype,
            )
        except ModelLoadError as e:  # a missing or mis-shaped tensor: say which checkpoint
            raise ModelLoadError(f"{loaded.path}: {e}", path=loaded.path) from e
        self.native_kernels = native.status() if self.runner.ops is cpu_ops else None
        """The C kernels of the CPU backend: built (or found built) at start, not on the first
        step; None on other backends."""
        self.pooler = pooling.model_pooler(loaded.path, config.pooler_config)
        """Embeddings' defaults (``SamplingParams.pooling`` fields left out)."""
        self.structured = StructuredOutputManager(self.tokenizer, loaded.config.vocab_size)
        """Grammars and matchers of constrained requests (structured outputs)."""
        self.runner.structured = self.structured
        self.image_encoder = self._image_encoder(loaded)
        """Vision tower + projector of a LLaVA model (None for text-only models)."""
        self.kv = KVCacheManager(
            self.num_blocks, config.block_size, config.enable_prefix_caching,
            sliding_window=loaded.config.uniform_window,
        )
        self.scheduler = Scheduler(config.scheduler_config, self.kv, self.max_model_len)
        if config.speculative_config is not None:
            self.scheduler.speculator = Speculator(config.speculative_config)
        self._tracked: dict[str, _Tracked] = {}
        self._children: dict[str, list[str]] = {}
        self._pending: list[RequestOutput] = []
        self._rng = random.Random(config.seed)
        self.kv_worker: Any = None
        """Worker half of the KV connector once ``attach_kv_connector`` made this a P/D role."""
        self.on_early_output: Callable[[RequestOutput], None] | None = None
        """Delivers an output in the middle of a step (``AsyncEngine`` sets it): a layer-wise
        streamed offer must reach the KV sink while the forward runs. None: it goes out
        with the step's outputs."""
        self._streamed: dict[str, dict[str, Any]] = {}
        """KV source side: params of requests offered layer-wise, until their hand-off."""
        self._token_texts: dict[int, str] = {}
        """Token id -> its text alone (logprobs' ``decoded_token``), filled as needed."""
        self._early_tokens: dict[str, list[int]] = {}
        """KV sink side: first tokens that arrived before their request (``resume_remote``)."""

    def info(self) -> dict[str, Any]:
        """What this engine serves and in which numeric formats (``/version`` shows it)."""
        return {
            "model_id": self.model_id,
            **self.dtype_choice.report(),
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "quantization": self.config.quantization,
            "weight_formats": self.weights_info["formats"],
            "weight_bytes": self.weights_info["weight_bytes"],
            "kv_cache_blocks": self.num_blocks,
            "malloc_tuning": self.malloc_tuning.reason if self.malloc_tuning else None,
            "kernels": self.runner.ops.__name__.rsplit(".", 1)[-1],
            "native_kernels": self.native_kernels.reason if self.native_kernels else None,
        }

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
        per_block *= self.kv_dtype.itemsize
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
        group_id: str | None = None,
        tokenized: Sequence[int] | None = None,
    ) -> list[int]:
        """Queue a request; returns its prompt token ids. Raises InvalidRequestError.

        ``prompt`` may be vLLM's dict form (``{"prompt" | "prompt_token_ids",
        "multi_modal_data"}``). ``multi_modal_data``: ``{"image": img | [imgs]}`` (one
        placeholder token per image in the prompt; this engine runs the vision tower) or
        ``{"image_embeds": [[T, H] arrays], "image_hashes": [int]}`` (an encode worker's
        output). The returned ids have each placeholder expanded to its image's tokens.

        ``kv_transfer_params``: ``{"do_remote_decode": True}`` (vLLM's key) makes this engine
        the request's KV source (prefill role: it stops after the first token and hands the
        request and its KV off to a remote KV sink); a ``KvTransferParams`` dict makes it the
        KV sink (decode role: it pulls the prompt's KV from the remote KV source first).
        ``resume_token_ids``: output tokens already generated (and streamed) elsewhere; the
        request continues after them, with the same draws it would have made there.
        ``group_id``: the request this one is a sample of, when the caller fanned ``n`` out
        itself (the cluster does); the scheduler shares sequence slots fairly by group. The
        ``n`` samples of one call form a group by themselves. ``n`` above
        ``EngineConfig.max_n`` is refused (field ``n``). ``tokenized``: a text prompt's token
        ids, already computed by ``tokenize_prompt`` off this thread (``AsyncEngine`` does, so
        a long text does not hold up the steps); the prompt stays the text.
        """
        params = params or SamplingParams()
        check_n(params.n, self.config.max_n)
        check_priority(params.priority, self.config.scheduling_policy, "this engine")
        check_token_ids(params, self.model_config.vocab_size)
        remote_kv_source, remote_kv_sink = self._transfer_role(kv_transfer_params, params)
        pool = (pooling.resolve(params.pooling, self.pooler, self.model_config.hidden_size)
                if isinstance(params.pooling, PoolingParams) else None)
        if pool is None and self.model_config.embedding_only:
            raise InvalidRequestError(
                f"{self.model_id} is a base model's checkpoint (no language-model head): it "
                "serves embeddings only (/v1/embeddings, LLM.embed)",
                field="model")
        if pool is not None:  # it ends at its prompt, here: nothing to hand off
            remote_kv_sink = False
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", field="request_id")
        if request_id in self._children:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        inner, multi_modal_data = split_prompt(prompt, multi_modal_data)
        token_ids = self.tokenize_prompt(
            list(tokenized) if tokenized is not None and isinstance(inner, str) else inner)
        token_ids = truncate_prompt(token_ids, params, self.max_model_len, bool(multi_modal_data))
        mm = None
        if multi_modal_data:
            token_ids, mm = self._multimodal_inputs(token_ids, multi_modal_data)
        params.bad_words_token_ids = self._bad_words_ids(params.bad_words)
        max_tokens = self._check_lengths(token_ids, params)
        resume = self._check_resume(resume_token_ids, max_tokens)
        grammar = self.structured.compile(params)  # InvalidRequestError: bad or too slow
        text = inner if isinstance(inner, str) else None
        arrival = arrival_time if arrival_time is not None else time.time()
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        children = [request_id if params.n == 1 else f"{i}_{request_id}" for i in range(params.n)]
        for i, child_id in enumerate(children):
            seed = base_seed if i == 0 else draw_seed(base_seed, -i)
            req = Request(
                child_id, token_ids, _sample_params(params, i), seed=seed, max_tokens=max_tokens,
                eos_token_ids=self.tokenizer.eos_token_ids, block_size=self.config.block_size,
                arrival_time=arrival, output_token_ids=resume, remote_kv_source=remote_kv_source,
                remote_kv_sink=remote_kv_sink, mm=mm, group_id=group_id or request_id,
            )
            req.pool = pool
            detok = IncrementalDetokenizer(self.tokenizer, params)
            detok.prime(resume)
            self._tracked[child_id] = _Tracked(
                request_id, i, text, detok, num_sent_tokens=len(resume),
                metrics={"arrival_time": arrival},
            )
            self.structured.add(child_id, grammar, params)
            self.scheduler.add_request(req)
        self._children[request_id] = children
        early = self._early_tokens.pop(request_id, None)
        if early is not None:
            self.resume_remote(request_id, early)
        return token_ids

    def _transfer_role(
        self, kv_transfer_params: dict[str, Any] | None, params: SamplingParams
    ) -> tuple[Any, bool]:
        """(remote KV source to pull from, remote KV sink to hand off to) of a request."""
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
        """Token ids of a prompt, checked exactly as the cluster checks it (validation.py)."""
        return prompt_token_ids(prompt, self.tokenizer.encode, self.model_config.vocab_size)

    def _bad_words_ids(self, words: list[str] | None) -> list[list[int]]:
        """Each bad word's token ids as written and with a leading space, where those differ:
        the word is banned at the start of the text and inside it. (vLLM keeps the spaced
        form only when it has as many tokens as the plain one, which suits SentencePiece
        vocabularies; in a byte-level BPE one such as SmolLM2's, `` disagreements`` and
        ``disagreements`` tokenize to different counts, and the word would stay allowed
        after a space, where words mostly are.)"""
        out: list[list[int]] = []
        for word in words or ():
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def _check_lengths(self, token_ids: list[int], params: SamplingParams) -> int:
        """The request's effective max_tokens, after checking it can ever run."""
        n = len(token_ids)
        check_prompt_length(n, self.max_model_len)
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
            if request_id in self._held() and self.kv_worker is not None:
                self.kv_worker.abort(request_id)  # ends the lease; blocks freed next step
            for child in self._children.get(request_id, []):
                req = self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                if req is not None:
                    self._pending.append(self._output_for(req, [], []))
                    self._forget(req)

    def abort_all_requests(self) -> list[str]:
        """Abort every request (after a failed step); their ids."""
        request_ids = list(self._children)
        self.abort_request(request_ids)
        return request_ids

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

    def has_runnable_requests(self) -> bool:
        """Requests a step may compute (queued or running), not only KV loads in flight."""
        return bool(self.scheduler.waiting or self.scheduler.running)

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
            result = self._execute(out)
            for rid, by_pos in result.prompt_logprobs.items():
                self.scheduler.requests[rid].prompt_logprobs.update(by_pos)
            for rid, (start, part) in result.pooled.items():
                req = self.scheduler.requests[rid]
                req.pool_acc = pooling.combine(req.pool, req.pool_acc, part, start)
            tokens = {rid: [r.token_id for r in rs] for rid, rs in result.sampled.items()}
            updated = self.scheduler.update(out, tokens)
            self._pending.extend(self._process(updated, result.sampled))
        if self.kv_worker is not None:
            loading = set(self._loading())
            for req in self.scheduler.update_transfers(self.kv_worker.get_finished()):
                self._pending.append(self._output_for(req, [], []))
                self._forget(req)
            now = time.time()
            for rid in loading.difference(self._loading()):
                if rid in self._tracked:
                    self._tracked[rid].metrics.setdefault("kv_load_end_time", now)
        outputs, self._pending = self._pending, []
        return outputs

    def _execute(self, out: SchedulerOutput) -> Any:
        """Run the step; requests whose KV streams layer-wise are offered before it runs."""
        if not self._offer_streams(out):
            return self.runner.execute(out)
        self.runner.on_layer = self.kv_worker.on_layer_computed
        try:
            return self.runner.execute(out)
        finally:
            self.runner.on_layer = None
            self.kv_worker.end_forward()

    def _offer_streams(self, out: SchedulerOutput) -> bool:
        """Layer-wise streaming, KV source side: lease the prompt blocks of every request
        whose last prompt chunk runs in this step and publish the params at once (an early
        output, before the forward), so the KV sink pulls each layer group as it is
        computed. True when this step's forward must report its layers."""
        if self.kv_worker is None or not self.kv_worker.streaming:
            return False
        offered = False
        for s in out.scheduled:
            req = s.request
            if not req.remote_kv_sink or not s.samples or req.request_id in self._streamed:
                continue
            num_tokens = req.num_prompt_tokens
            block_ids = self.kv.get_block_ids(req.request_id)[: self.kv.blocks_for(num_tokens)]
            try:
                params = self.kv_worker.offer_stream(req.request_id, block_ids, num_tokens)
            except Exception:  # noqa: BLE001 - it is offered after its first token instead
                logger.exception("could not offer KV of %s layer-wise", req.request_id)
                continue
            assert self.scheduler.connector is not None
            self.scheduler.connector.on_stream_offered(req)
            self._streamed[req.request_id] = params.to_dict()
            output = self._output_for(req, [], [])
            output.kv_transfer_params = self._streamed[req.request_id]
            if self.on_early_output is not None:
                self.on_early_output(output)
            else:
                self._pending.append(output)
            offered = True
        return offered

    def resume_remote(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Layer-wise streaming, KV sink side: the KV source's first token(s) for a request
        admitted with streamed params, or ``[]`` when the source ended without one (the
        request then recomputes its prompt here). It runs once its KV is verified too."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            self._early_tokens[request_id] = list(token_ids)  # its add_request may be queued
            while len(self._early_tokens) > MAX_EARLY_TOKENS:  # or it ended: forget the oldest
                del self._early_tokens[next(iter(self._early_tokens))]
            return
        tokens = self._check_resume(token_ids, req.max_tokens)
        tracked = self._tracked[request_id]
        for token in tokens:
            req.append_token(token)
        tracked.detok.prime(tokens)
        tracked.num_sent_tokens = req.num_output_tokens
        for ended in self.scheduler.first_token(request_id, bool(tokens)):
            self._pending.append(self._output_for(ended, [], []))
            self._forget(ended)
        metrics = self._tracked[request_id].metrics if request_id in self._tracked else {}
        if "kv_load_start_time" in metrics and request_id not in self._loading():
            metrics.setdefault("kv_load_end_time", time.time())  # left loading here, not in step

    def _stamp(self, out: SchedulerOutput) -> None:
        """Per-stage timestamps: first scheduled (queue ends), KV load start (decode role)."""
        now = time.time()
        for s in out.scheduled:
            tracked = self._tracked.get(s.request.request_id)
            if tracked is not None:
                tracked.metrics.setdefault("first_scheduled_time", now)
        for rid in self._loading():
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
            lease_ttl_s=lease_ttl_s, layer_windows=self.model_config.kv_layer_windows,
            model_signature=self.model_config.kv_signature,
        )
        self.scheduler.connector = KvConnectorScheduler[Request](self.config.block_size)
        return self.kv_worker

    def _loading(self) -> Mapping[str, Request]:
        """KV sink side: requests pulling their prompt KV (the connector's scheduler half)."""
        connector = self.scheduler.connector
        return connector.loading if connector is not None else {}

    def _held(self) -> Mapping[str, Request]:
        """KV source side: handed-off requests whose blocks are held for a remote reader."""
        connector = self.scheduler.connector
        return connector.held if connector is not None else {}

    def has_pending_transfers(self) -> bool:
        """Loads in flight or blocks held for readers: the engine must keep stepping."""
        return self.scheduler.has_transfers()

    def _hand_off(self, req: Request) -> dict[str, Any] | None:
        """Prefill side: hold the request's prompt blocks under a lease for the decode role."""
        assert self.kv_worker is not None
        streamed = self._streamed.pop(req.request_id, None)
        self.scheduler.hand_off(req.request_id)
        if streamed is not None:  # leased before the forward; its reader may be done already
            if self.kv_worker.leases.get(req.request_id) is None:
                self.scheduler.release_held(req.request_id)
            return streamed
        num_tokens = req.num_prompt_tokens
        block_ids = self.kv.get_block_ids(req.request_id)[: self.kv.blocks_for(num_tokens)]
        try:
            return self.kv_worker.offer(req.request_id, block_ids, num_tokens).to_dict()
        except Exception:
            logger.exception("could not offer KV of %s", req.request_id)
            self.scheduler.release_held(req.request_id)
            return None

    def _process(
        self, updated: list[Request], sampled: dict[str, list[SampleResult]]
    ) -> list[RequestOutput]:
        outputs = []
        now = time.time()
        for req in updated:
            tracked = self._tracked[req.request_id]
            tracked.metrics.setdefault("first_token_time", now)
            new_tokens = req.output_token_ids[tracked.num_sent_tokens :]
            stop, num_kept = _detokenize(tracked.detok, new_tokens, _ended_by_token(req))
            if num_kept < len(new_tokens):  # a stop string ended it before later kept drafts
                req.truncate(req.num_tokens - (len(new_tokens) - num_kept))
                new_tokens = new_tokens[:num_kept]
                if req.is_finished:  # by a later token: the stop string came first
                    req.status = RequestStatus.FINISHED_STOPPED
            tracked.num_sent_tokens = req.num_output_tokens
            if stop is not None and not req.is_finished:
                self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
            elif stop is not None and req.status == RequestStatus.FINISHED_LENGTH:
                req.status = RequestStatus.FINISHED_STOPPED  # the last token held a stop string
            if stop is not None:
                req.stop_reason = stop
            handoff = None
            if req.remote_kv_sink and not req.is_finished:
                handoff = self._hand_off(req)
                if handoff is None:
                    req.status = RequestStatus.FINISHED_ERROR
            if req.is_finished:
                tracked.metrics["finished_time"] = now
            output = self._output_for(req, new_tokens, sampled.get(req.request_id, []))
            if handoff is not None:
                output.kv_transfer_params = handoff  # HANDED_OFF: no finish reason
            outputs.append(output)
            if req.is_finished:
                self._forget(req)
        return outputs

    def _output_for(
        self, req: Request, new_tokens: list[int], samples: list[SampleResult]
    ) -> RequestOutput:
        """``samples``: the sampler's rows of this step (the first ``len(new_tokens)`` are
        the new tokens'; a verify chunk's rejected rows follow and are ignored)."""
        tracked = self._tracked[req.request_id]
        finished = req.is_finished
        logprobs = None
        kept = [s for s in samples[: len(new_tokens)] if s.top_logprobs]
        if req.sampling_params.logprobs is not None and kept:
            tracked.cumulative_logprob += sum(s.logprob or 0.0 for s in kept)
            logprobs = [self._decode_logprobs(s.top_logprobs) for s in kept]
        completion = CompletionOutput(
            index=tracked.index,
            text=tracked.detok.take_delta(finished),
            token_ids=list(new_tokens),
            finish_reason=req.status.finish_reason if finished else None,
            stop_reason=req.stop_reason if finished else None,
            cumulative_logprob=tracked.cumulative_logprob if logprobs is not None else None,
            logprobs=logprobs,
        )
        prompt_logprobs = None
        if (req.sampling_params.prompt_logprobs is not None and not tracked.sent_prompt_logprobs
                and not req.needs_prompt_logprobs):
            tracked.sent_prompt_logprobs = True
            prompt_logprobs = [None] + [
                self._decode_logprobs(req.prompt_logprobs[p]) for p in range(req.num_prompt_tokens - 1)
            ]
        embedding = None
        if finished and req.pool is not None and req.pool_acc is not None:
            embedding = pooling.finish(req.pool, req.pool_acc, req.num_prompt_tokens)
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
            prompt_logprobs=prompt_logprobs,
            embedding=embedding,
        )

    def _decode_logprobs(self, top: dict[int, Logprob]) -> dict[int, Logprob]:
        """Each entry's token text (a token alone decodes the same anywhere: memoized, so a
        long prompt's logprobs cost dictionary lookups on the engine thread, not ~20 decodes
        per position)."""
        texts = self._token_texts
        for token_id, lp in top.items():
            text = texts.get(token_id)
            if text is None:
                text = texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
            lp.decoded_token = text
        return top

    def _forget(self, req: Request) -> None:
        self.structured.release(req.request_id)
        self._streamed.pop(req.request_id, None)
        tracked = self._tracked.pop(req.request_id)
        siblings = self._children.get(tracked.parent_id, [])
        if not any(c in self._tracked for c in siblings):
            self._children.pop(tracked.parent_id, None)

    # ------------------------------------------------------------------ integrity

    def check_integrity(self) -> IntegrityReport:
        """Every invariant of the scheduler, KV manager, block pool and (on a P/D role) the
        leases and loads, plus the engine's own request bookkeeping. Call between steps, on
        the thread that steps the engine; it changes nothing."""
        report = self.scheduler.check_integrity()
        for request_id in sorted(set(self._tracked) ^ set(self.scheduler.requests)):
            report.add(f"request {request_id!r} is tracked by only one of engine and scheduler")
        for parent, children in self._children.items():
            if not any(c in self._tracked for c in children):
                report.add(f"request {parent!r} has no live sample left but is not forgotten")
        for request_id in self.structured.request_ids() - set(self._tracked):
            report.add(f"request {request_id!r} left a grammar matcher behind")
        if self.kv_worker is not None:
            streaming = self.scheduler.connector.streaming if self.scheduler.connector else ()
            held = {rid: self.kv.get_block_ids(rid) for rid in {*self._held(), *streaming}}
            report.merge(self.kv_worker.check_integrity(held, set(self._loading())))
        return report

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
            "num_window_freed_blocks": kv.num_window_freed,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_fair_preemptions": self.scheduler.num_fair_preemptions,
            "num_loading_kv": len(self._loading()),
            "num_held_kv": len(self._held()),
            "num_remote_fallbacks": (
                self.scheduler.connector.num_remote_fallbacks if self.scheduler.connector else 0
            ),
            **(spec.stats.as_dict() if (spec := self.scheduler.speculator) is not None else {}),
            **(self.kv_worker.counters if self.kv_worker is not None else {}),
            **(self.image_encoder.stats() if self.image_encoder is not None else {}),
            **self.structured.stats(),
        }


def _sample_params(params: SamplingParams, i: int) -> SamplingParams:
    """Sample i's parameters: only the first of ``n`` computes the prompt logprobs (they are
    the same for all), so the others may still take the prompt from the prefix cache."""
    if i == 0 or params.prompt_logprobs is None:
        return params
    child = dataclasses.replace(params, prompt_logprobs=None)
    child.bad_words_token_ids = params.bad_words_token_ids  # resolved, not an init field
    return child


def _ended_by_token(req: Request) -> bool:
    """The request just ended on its last token being an end id (EOS) or one of
    ``stop_token_ids``, whose text is left out of the output (vLLM's detokenizer skips it)
    unless ``include_stop_str_in_output``; the id stays in ``token_ids``."""
    params = req.sampling_params
    if req.status != RequestStatus.FINISHED_STOPPED or params.include_stop_str_in_output:
        return False
    last = req.all_token_ids[-1]
    return (not params.ignore_eos and last in req.eos_token_ids) or \
        last in (params.stop_token_ids or ())


def _detokenize(detok: IncrementalDetokenizer, new_tokens: list[int],
                skip_last: bool = False) -> tuple[str | None, int]:
    """Feed tokens one at a time, as decoding one per step would: (the stop string found, or
    None; how many tokens up to and including the one that completed it). ``skip_last``: the
    last token ended the request (``_ended_by_token``): its text is not decoded."""
    fed = new_tokens[:-1] if skip_last and new_tokens else new_tokens
    for i, token in enumerate(fed):
        stop = detok.update([token])
        if stop is not None:
            return stop, i + 1
    return None, len(new_tokens)
