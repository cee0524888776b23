"""ModelRunner: owns the model and the paged KV cache; executes one scheduled step.

Turns a SchedulerOutput into flat tensors (token ids, positions, slot mapping,
block tables, context lengths), runs the model, computes logits only for the
rows that sample, and samples. Single-token rows (decodes) go first so they
share one batched attention call; prefill chunks follow.

A speculative verify chunk (a request's next token + k draft tokens) runs as k + 1 decode
rows over the request's own cache, row i with context ``start + i + 1``: every layer first
stores the chunk's K/V, so each row attends to exactly what a plain decode at its position
would, through the same kernel. Each row's logits are sampled with its own position's draw,
so verification reproduces, bit for bit, the tokens decoding one by one would produce.

KV cache, one view per layer: [2, num_blocks, block_size, num_kv_heads, head_dim], all views of
one block-major allocation [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
(kernels/kv_cache.py), so each block is one contiguous region across layers and K/V.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from splitserve import env
from splitserve.kernels.kv_cache import allocate_kv_caches
from splitserve.kernels.ops import get_ops
from splitserve.outputs import Logprob
from splitserve.roles.engine import pooling
from splitserve.roles.engine.request import Request
from splitserve.roles.engine.sampler import (
    SampleRequest,
    SampleResult,
    narrows_vocabulary,
    sample,
)
from splitserve.roles.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.roles.engine.structured import StructuredOutputManager
from splitserve.roles.models.blocks import AttentionMetadata
from splitserve.roles.models.config import ModelConfig
from splitserve.roles.models.registry import create_model

Tensor = torch.Tensor


@dataclass
class RunnerOutput:
    """Sampled tokens of the rows that reached the end of their sequence: one per request,
    or one per row of a verify chunk (k + 1, in position order)."""

    sampled: dict[str, list[SampleResult]]
    prompt_logprobs: dict[str, dict[int, dict[int, Logprob]]] = field(default_factory=dict)
    """Requests asking for prompt logprobs whose prompt rows ran in this step: by position
    p, the logprob of prompt token p + 1 (its own first, then the top ones)."""
    pooled: dict[str, tuple[int, Tensor]] = field(default_factory=dict)
    """Embedding requests whose prompt rows ran in this step: (the chunk's first position,
    its part of the pooled result; ``pooling.chunk_part``)."""


PROMPT_LOGPROB_SLICE = 256
"""Prompt rows whose logits are computed at once for prompt logprobs."""


class ModelRunner:
    """Runs the model over the paged KV cache of one worker."""

    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict[str, Tensor],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.config = model_config
        self.block_size = block_size
        self.device = device
        self.ops = get_ops(device)
        self.model = create_model(model_config, weights, self.ops, device)
        # per layer [2, num_blocks, block_size, kv_heads, head_dim]: strided views of one
        # block-major pool [num_blocks, num_layers, 2, ...] (one region per block, sent in place)
        self.kv_caches = allocate_kv_caches(
            model_config.num_layers, num_blocks, block_size, model_config.num_kv_heads,
            model_config.head_dim, kv_dtype or dtype, device,
        )
        self.structured: StructuredOutputManager | None = None
        """Matchers of constrained requests; masks their logits rows before sampling."""
        self.on_layer: Callable[[int], None] | None = None
        """Called with each layer's index once it stored its KV, during the next ``execute``
        (layer-wise KV streaming sets it for the step that computes a streamed prompt)."""

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        items = sorted(out.scheduled, key=lambda s: not s.is_decode)  # decode rows first
        input_ids, positions, slots = self._flatten(items)
        meta = self._metadata(items, slots)
        embeds = self._input_embeds(items, input_ids)
        rows, last = self._sampling_rows(items)
        prompt_rows = self._prompt_rows(items)
        embedding = any(s.request.pool is not None for s in items)  # every row's hidden state
        pruned = not prompt_rows and not embedding and self._prune(
            items, meta, last, input_ids.shape[0])
        hidden = self.model.forward(
            input_ids, positions, self.kv_caches, meta, embeds, on_layer=self.on_layer
        )
        prompt_lp = self._prompt_logprobs(hidden, prompt_rows) if prompt_rows else {}
        pooled = self._pooled(hidden, items) if embedding else {}
        if not rows:
            return RunnerOutput({}, prompt_lp, pooled)
        logits = self.model.compute_logits(hidden if pruned else hidden[last])
        if self.structured is not None:
            self.structured.apply(  # a verify chunk's rows: the mask after each draft prefix
                logits, [(s.request, s.draft_token_ids) for s in items if s.num_sample_rows]
            )
        results = sample(logits, [r for _, r in rows])
        sampled: dict[str, list[SampleResult]] = {}
        for (rid, _), res in zip(rows, results, strict=True):
            sampled.setdefault(rid, []).append(res)
        return RunnerOutput(sampled, prompt_lp, pooled)

    def _pooled(self, hidden: Tensor, items: list[ScheduledRequest]) -> dict[str, tuple[int, Tensor]]:
        """Each embedding request's part of its pooled result from this step's prompt rows."""
        parts: dict[str, tuple[int, Tensor]] = {}
        offset = 0
        for s in items:
            req = s.request
            end = min(s.start + s.num_new_tokens, req.num_prompt_tokens)
            if req.pool is not None and end > s.start:
                part = pooling.chunk_part(
                    req.pool, hidden[offset: offset + end - s.start], s.start, req.num_prompt_tokens)
                if part is not None:
                    parts[req.request_id] = (s.start, part)
            offset += s.num_new_tokens
        return parts

    # ------------------------------------------------------------------ prompt logprobs

    def _prompt_rows(self, items: list[ScheduledRequest]) -> list[tuple[str, int, int, int, int]]:
        """(request id, top-k, row, position, next prompt token) of each prompt row whose
        logits score the next prompt token (positions [start, num_prompt - 1) of a chunk)
        for a request that asked for prompt logprobs."""
        wanted: list[tuple[str, int, int, int, int]] = []
        offset = 0
        for s in items:
            req = s.request
            k = req.sampling_params.prompt_logprobs
            end = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
            if k is not None and not s.draft_token_ids:
                prompt = req.prompt_token_ids
                wanted.extend((req.request_id, k, offset + pos - s.start, pos, prompt[pos + 1])
                              for pos in range(s.start, end))
            offset += s.num_new_tokens
        return wanted

    def _prompt_logprobs(
        self, hidden: Tensor, wanted: list[tuple[str, int, int, int, int]]
    ) -> dict[str, dict[int, dict[int, Logprob]]]:
        """The raw model logprobs of the next prompt token at each row of ``wanted`` (and
        the top ones), computed ``PROMPT_LOGPROB_SLICE`` rows at a time (a 2,048-row chunk's
        logits over a 49k vocabulary would be 400 MB at once)."""
        out: dict[str, dict[int, dict[int, Logprob]]] = {}
        for lo in range(0, len(wanted), PROMPT_LOGPROB_SLICE):
            part = wanted[lo: lo + PROMPT_LOGPROB_SLICE]
            idx = torch.tensor([w[2] for w in part], dtype=torch.long, device=hidden.device)
            lp = torch.log_softmax(self.model.compute_logits(hidden[idx]), dim=-1)
            nxt = [w[4] for w in part]
            target = torch.tensor(nxt, dtype=torch.long, device=lp.device)
            chosen = lp.gather(1, target[:, None])
            ranks = ((lp > chosen).sum(dim=1) + 1).tolist()
            kmax = max(w[1] for w in part)
            top_v, top_i = torch.topk(lp, kmax) if kmax else (None, None)
            for j, (rid, k, _, pos, _) in enumerate(part):
                entry = {nxt[j]: Logprob(float(chosen[j, 0]), int(ranks[j]))}
                if k:
                    assert top_v is not None and top_i is not None
                    for r, (tid, val) in enumerate(
                        zip(top_i[j, :k].tolist(), top_v[j, :k].tolist(), strict=True), start=1
                    ):
                        entry.setdefault(tid, Logprob(val, r))
                out.setdefault(rid, {})[pos] = entry
        return out

    # ------------------------------------------------------------------ inputs

    def _flatten(self, items: list[ScheduledRequest]) -> tuple[Tensor, Tensor, Tensor]:
        ids: list[int] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        bs = self.block_size
        for s in items:
            ids.extend(s.input_token_ids())
            p = np.arange(s.start, s.start + s.num_new_tokens, dtype=np.int64)
            table = np.asarray(s.block_ids, dtype=np.int64)
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        as_tensor = lambda a: torch.from_numpy(np.concatenate(a)).to(self.device)  # noqa: E731
        return torch.tensor(ids, device=self.device), as_tensor(pos), as_tensor(slots)

    def _input_embeds(self, items: list[ScheduledRequest], input_ids: Tensor) -> Tensor | None:
        """Token embeddings with image rows spliced in at placeholder positions, or None
        when no image position is in this step (text runs the plain embedding lookup).

        Each chunk takes only the rows of its own positions, so a chunk that starts or ends
        inside an image's span, or follows a cached prefix that covers one, gets exactly
        the rows it computes.
        """
        splices: list[tuple[int, Tensor]] = []
        offset = 0
        for s in items:
            if s.request.mm is not None:
                rows = s.request.mm.rows_in(s.start, s.start + s.num_new_tokens)
                splices.extend((offset + at, r) for at, r in rows)
            offset += s.num_new_tokens
        if not splices:
            return None
        embeds = self.model.embed_tokens(input_ids)  # [T, H]
        for at, rows in splices:
            embeds[at : at + rows.shape[0]] = rows.to(embeds.device, embeds.dtype)
        return embeds

    def _metadata(self, items: list[ScheduledRequest], slots: Tensor) -> AttentionMetadata:
        decodes = [s for s in items if s.is_decode]
        prefills = items[len(decodes) :]
        starts = np.cumsum([0] + [s.num_new_tokens for s in prefills])
        rows = [s for s in decodes for _ in range(s.num_new_tokens)]  # a verify chunk: k + 1
        return AttentionMetadata(
            slot_mapping=slots,
            num_decode=len(rows),
            decode_block_tables=self._block_tables(rows),
            decode_context_lens=self._int32(
                [s.start + i + 1 for s in decodes for i in range(s.num_new_tokens)]
            ),
            prefill_block_tables=self._block_tables(prefills),
            prefill_query_start_loc=self._int32(starts.tolist()),
            prefill_context_lens=self._int32([s.start + s.num_new_tokens for s in prefills]),
        )

    def _prune(
        self, items: list[ScheduledRequest], meta: AttentionMetadata, last: Tensor,
        num_tokens: int,
    ) -> bool:
        """Whether the last layer runs for the sampled rows ``last`` only (``meta.keep``):
        in a step with prompt rows, of which only each finished prompt's last is sampled
        (or none, in a chunk that does not end its prompt), the last layer's attention, MLP
        and final norm over the other rows would be thrown away. Each kept row then attends
        as a decode row over its own context (position + 1), the same computation a decode
        step gives it. Off with ``SPLITSERVE_PRUNE_LAST_LAYER=0``."""
        if len(last) == num_tokens or not env.SPLITSERVE_PRUNE_LAST_LAYER.get():
            return False
        owners: list[ScheduledRequest] = []
        lens: list[int] = []
        kept = last.tolist()
        offset, at = 0, 0
        for s in items:  # kept rows ascend, items are in row order
            while at < len(kept) and kept[at] < offset + s.num_new_tokens:
                owners.append(s)
                lens.append(s.start + kept[at] - offset + 1)
                at += 1
            offset += s.num_new_tokens
        meta.keep = last
        meta.keep_block_tables = self._block_tables(owners)
        meta.keep_context_lens = self._int32(lens)
        return True

    def _block_tables(self, items: list[ScheduledRequest]) -> Tensor:
        """[len(items), max_blocks] int32, padded with block 0 (never read: beyond context)."""
        width = max((len(s.block_ids) for s in items), default=0)
        table = np.zeros((len(items), max(width, 1)), dtype=np.int32)
        for i, s in enumerate(items):
            table[i, : len(s.block_ids)] = s.block_ids
        return torch.from_numpy(table).to(self.device)

    def _int32(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def _sampling_rows(
        self, items: list[ScheduledRequest]
    ) -> tuple[list[tuple[str, SampleRequest]], Tensor]:
        rows, last, offset = [], [], 0
        for s in items:
            offset += s.num_new_tokens
            req = s.request
            n = s.num_sample_rows  # row i draws the token at position num_tokens + i
            sp = req.sampling_params
            adjusts = sp.adjusts_logits
            min_left = sp.min_tokens - req.num_output_tokens  # rows before min_tokens ban stops
            stop_ids = _stop_ids(req) if min_left > 0 or narrows_vocabulary(sp) else ()
            for i in range(n):
                params = SampleRequest(sp, req.seed, req.num_tokens + i, stop_ids=stop_ids,
                                       before_min_tokens=i < min_left)
                if adjusts:  # a verify row's tokens so far include the draft before it
                    params.tokens = req.all_token_ids + s.draft_token_ids[:i]
                    params.num_prompt_tokens = req.num_prompt_tokens
                rows.append((req.request_id, params))
                last.append(offset - n + i)
        return rows, torch.tensor(last, dtype=torch.long, device=self.device)


def _stop_ids(req: Request) -> tuple[int, ...]:
    """The tokens that end ``req``: EOS (unless ``ignore_eos``), then ``stop_token_ids``."""
    sp = req.sampling_params
    eos = () if sp.ignore_eos else tuple(sorted(req.eos_token_ids))
    return eos + tuple(t for t in sp.stop_token_ids or () if t not in req.eos_token_ids)
