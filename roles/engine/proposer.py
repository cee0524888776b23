"""Proposers: draft tokens for speculative decoding, guessed from text already seen.

Owns the ``Proposer`` interface and its draft-free implementations:

- ``NgramProposer`` (prompt lookup): the longest suffix of the sequence, ``prompt_lookup_max``
  down to ``prompt_lookup_min`` tokens long, that occurred earlier in the prompt or output;
  the tokens that followed its latest earlier occurrence are the draft.
- ``SuffixProposer`` (suffix decoding): a ``SuffixTrie`` per request over its prompt and
  output, plus one global trie over the outputs of the last ``max_cached_requests`` finished
  requests (FIFO); the draft is the more confident of the two tries' continuations, its length
  bounded by the match length (adaptive speculation length).

A proposer only guesses: verification by the target model decides every token, so a
proposer's state (which differs from worker to worker) never changes an output. It must not
touch KV, tensors or the request's tokens. Torch-free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from splitserve.roles.engine.request import Request
from splitserve.roles.engine.suffix_tree import SuffixTrie

if TYPE_CHECKING:
    from splitserve.roles.engine.speculative import SpeculativeConfig


class Proposer(ABC):
    """Guesses the next tokens of a running request.

    ``propose`` may update the proposer's own index of the request's tokens (it sees each
    request's tokens grow step by step); ``finish`` drops the request's state (and may learn
    from its output). Neither mutates the request.
    """

    @abstractmethod
    def propose(self, request: Request, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` draft tokens to follow ``request.all_token_ids`` (maybe none)."""

    @abstractmethod
    def finish(self, request: Request) -> None:
        """The request left this engine (finished, aborted or handed off)."""


class NgramProposer(Proposer):
    """Prompt lookup: copy what followed the latest earlier occurrence of the suffix n-gram."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}
        """Per request: a growing int64 buffer of its tokens and how many are filled."""

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        tokens = self._tokens(request)
        n_total = tokens.shape[0]
        for n in range(min(self.max_n, n_total - 1), self.min_n - 1, -1):
            end = _latest_earlier_match(tokens, n)
            if end >= 0:
                return tokens[end : min(end + max_tokens, n_total)].tolist()
        return []

    def _tokens(self, request: Request) -> np.ndarray:
        """The request's tokens as an array, appending only what is new since the last call."""
        ids = request.all_token_ids
        buf, filled = self._arrays.get(request.request_id, (np.empty(0, np.int64), 0))
        if filled > len(ids):  # tokens were taken back: start over
            filled = 0
        if len(ids) > buf.shape[0]:
            grown = np.empty(max(2 * buf.shape[0], len(ids) + 64), np.int64)
            grown[:filled] = buf[:filled]
            buf = grown
        buf[filled : len(ids)] = ids[filled:]
        self._arrays[request.request_id] = (buf, len(ids))
        return buf[: len(ids)]

    def finish(self, request: Request) -> None:
        self._arrays.pop(request.request_id, None)


def _latest_earlier_match(tokens: np.ndarray, n: int) -> int:
    """End index of the latest occurrence of the last ``n`` tokens that starts before them,
    i.e. the position of the token that followed it; -1 when there is none."""
    if tokens.shape[0] <= n:
        return -1
    suffix = tokens[-n:]
    # candidate starts 0 .. len - n - 1 (the suffix itself starts at len - n)
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # [len - n, n]
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    return int(hits[-1]) + n if hits.size else -1


class SuffixProposer(Proposer):
    """Suffix decoding over a per-request trie and a bounded global trie of recent outputs."""

    def __init__(
        self, max_depth: int, max_cached_requests: int, spec_factor: float, min_token_prob: float,
        max_spec_tokens: int,
    ) -> None:
        self.max_depth = max_depth
        self.max_cached_requests = max_cached_requests
        self.spec_factor = spec_factor
        self.min_token_prob = min_token_prob
        self.max_match = max(1, max_depth - max_spec_tokens)
        """Longest context match looked up, leaving room in the trie to continue after it."""
        self._local: dict[str, SuffixTrie] = {}
        self.global_trie = SuffixTrie(max_depth)
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._next_id = 0

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        local = self._local.get(request.request_id)
        if local is None:
            local = self._local[request.request_id] = SuffixTrie(self.max_depth)
        ids = request.all_token_ids
        seen = local.num_tokens(0)
        if seen > len(ids):  # tokens were taken back: rebuild
            local.remove(0)
            seen = 0
        local.extend(0, ids[seen:])
        context = ids[-self.max_match :]
        best = local.speculate(
            context, max_tokens, self.max_match, self.spec_factor, self.min_token_prob
        )
        if len(self.global_trie):
            other = self.global_trie.speculate(
                context, max_tokens, self.max_match, self.spec_factor, self.min_token_prob
            )
            if other.score > best.score:
                best = other
        return list(best.token_ids)

    def finish(self, request: Request) -> None:
        self._local.pop(request.request_id, None)
        if self.max_cached_requests == 0 or request.num_output_tokens == 0:
            return
        seq_id = self._next_id
        self._next_id += 1
        self.global_trie.extend(seq_id, request.output_token_ids)
        self._cached[seq_id] = None
        while len(self._cached) > self.max_cached_requests:
            oldest, _ = self._cached.popitem(last=False)
            self.global_trie.remove(oldest)


def create_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer ``config.method`` names (the config has already checked it)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    return SuffixProposer(
        config.suffix_decoding_max_tree_depth,
        config.suffix_decoding_max_cached_requests,
        config.suffix_decoding_max_spec_factor,
        config.suffix_decoding_min_token_prob,
        config.num_speculative_tokens,
    )
