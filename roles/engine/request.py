"""Request: one sequence's state inside an engine (tokens, progress, blocks' hashes).

Owned by the scheduler; the KV manager reads its block hashes, the runner its
tokens and positions. Text and stop strings live in the detokenizer, not here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from splitserve.hashing import hash_block_tokens, root_hash
from splitserve.outputs import Logprob
from splitserve.request import RequestStatus
from splitserve.sampling_params import SamplingParams

if TYPE_CHECKING:  # multimodal imports torch; the scheduler side stays torch-free
    from splitserve.roles.engine.multimodal import MultiModalInputs


class Request:
    """A sequence being generated: prompt + output tokens and how far KV is computed."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        *,
        seed: int,
        max_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        block_size: int = 16,
        arrival_time: float | None = None,
        output_token_ids: Sequence[int] = (),
        remote_kv_source: Any = None,
        remote_kv_sink: bool = False,
        mm: MultiModalInputs | None = None,
        group_id: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.group_id = group_id if group_id is not None else request_id
        """The request this sequence is a sample of (its ``n`` siblings share it): the
        scheduler shares sequence slots fairly between groups, not between sequences."""
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.seed = seed
        """Resolved seed: draws depend only on (seed, position), so replays continue identically."""
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.block_size = block_size
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.all_token_ids = self.prompt_token_ids + list(output_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        """Prompt tokens found in the prefix cache at first scheduling (-1: not yet looked up)."""
        self.num_preemptions = 0
        self.prompt_logprobs: dict[int, dict[int, Logprob]] = {}
        """With ``sampling_params.prompt_logprobs``: by position p, the logprob of prompt
        token p + 1 given the tokens up to p (the token's own first, then the top ones)."""
        self.stop_reason: int | str | None = None
        self.pool: Any = None
        """An embedding request's resolved ``pooling.Pool`` (None: not one)."""
        self.pool_acc: Any = None
        """Its running result over the prompt chunks computed so far (a tensor)."""
        self.mm = mm
        """Images of the prompt (placeholder ranges, content hashes, embeddings), or None."""
        self.root_hash = root_hash(sampling_params.cache_salt)
        """Parent hash of the first block (its ``cache_salt``'s)."""
        self.block_hashes: list[int] = []
        self._update_block_hashes()
        self.remote_kv_source = remote_kv_source
        """Decode side (this engine is the KV sink): the remote KV source's KvTransferParams,
        the prompt KV to pull before running; None once pulled, or for a local prompt."""
        self.remote_kv_sink = remote_kv_sink
        """Prefill side (this engine is the KV source): a remote KV sink continues the request,
        so after its first token it is handed off (``HANDED_OFF``), its blocks held for the pull."""

    # ------------------------------------------------------------------ tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are not computed yet: the prompt then
        runs here in full (no prefix cache hit would give its rows' logits)."""
        return (self.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def computes_whole_prompt(self) -> bool:
        """Every prompt position must run here (prompt logprobs still missing, or a MEAN /
        CLS embedding): the prefix cache gives this request nothing."""
        return self.needs_prompt_logprobs or (
            self.pool is not None and self.pool.whole_prompt and not self.is_finished)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self._update_block_hashes()

    def truncate(self, num_tokens: int) -> None:
        """Drop the tokens past ``num_tokens`` (output only), with their block hashes.

        Used when a stop string ends the request inside a verify chunk's kept tokens.
        """
        if not self.num_prompt_tokens <= num_tokens <= self.num_tokens:
            raise ValueError(f"cannot truncate {self.request_id} to {num_tokens} tokens")
        del self.all_token_ids[num_tokens:]
        del self.block_hashes[num_tokens // self.block_size :]
        self.num_computed_tokens = min(self.num_computed_tokens, num_tokens)

    def _update_block_hashes(self) -> None:
        """Extend the chained hashes to every full block of the token sequence."""
        done = len(self.block_hashes)
        start = done * self.block_size
        parent = self.block_hashes[-1] if self.block_hashes else self.root_hash
        extra = None
        if self.mm is not None:  # blocks over an image also key on its content hash
            num_new = len(self.all_token_ids) // self.block_size - done
            extra = self.mm.block_extra_keys(done, num_new, self.block_size)
        self.block_hashes.extend(
            hash_block_tokens(
                self.all_token_ids[start:], self.block_size, parent_hash=parent, extra_keys=extra
            )
        )

    # ------------------------------------------------------------------ stopping

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """Finished state implied by the last token (EOS, stop id, length), or None."""
        last = self.all_token_ids[-1]
        params = self.sampling_params
        # before min_tokens the sampler bans these tokens unless nothing else was allowed
        # (a grammar that can only end), so one drawn ends the request there too
        if not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in (params.stop_token_ids or ()):
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
