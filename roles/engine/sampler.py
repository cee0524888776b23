"""Sampler: next tokens from logits, per request, reproducibly.

Each random draw depends only on (request seed, position of the token being
drawn): a fresh generator seeded from both draws one uniform ``u`` and the token
is the first whose cumulative probability (float64) exceeds ``u`` times the total
(inverse-CDF sampling, exactly ``p``). One draw per row, not one per vocabulary
entry as an exponential race needs, keeps a sampled sequence's share of a step
small (an n=128 request must not slow a short request beside it). So a request
replayed on another worker from its prompt plus the tokens generated so far
continues with the same tokens. It owns no state.

An allow-list, a logit bias and penalties (``SamplingParams.adjusts_logits``) change a row's
logits before the greedy pick or the draw, in vLLM's order: ``allowed_token_ids`` (every other
token to -inf), the bias, then the repetition penalty (tokens of the prompt or the output),
then the frequency and presence penalties (tokens of the output). They depend only on the
row's tokens so far (a verify row's include the draft before it), so a replay, a P/D hand-off
or speculation gives the same tokens. Log-probabilities stay those of the model's
distribution (vLLM's default ``raw_logprobs``). Before ``min_tokens`` the stop tokens are
banned (vLLM's min-tokens processor) unless nothing else is left; a row left with no token at
all (a grammar and an allow-list that share none) ends its request on a stop token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.hashing import hash_block
from splitserve.kernels.native import argmax_rows
from splitserve.outputs import Logprob
from splitserve.sampling_params import SamplingParams

Tensor = torch.Tensor
logger = logging.getLogger(__name__)


@dataclass
class SampleRequest:
    """What the sampler needs of one row."""

    params: SamplingParams
    seed: int
    position: int
    """Position in the sequence of the token being drawn."""
    tokens: list[int] | None = None
    """The sequence's tokens before this one (prompt, then output), when ``params`` adjusts
    the logits (``adjusts_logits``); None otherwise."""
    num_prompt_tokens: int = 0
    """How many of ``tokens`` are the prompt's."""
    stop_ids: tuple[int, ...] = ()
    """The tokens that end the request (EOS unless ``ignore_eos``, ``stop_token_ids``), set
    where a row may have to ban them (``min_tokens``) or fall back on them (a row the
    adjustments leave without any token)."""
    before_min_tokens: bool = False
    """The token drawn is one of the first ``min_tokens``: ``stop_ids`` are banned, as
    vLLM's min-tokens processor bans them, unless nothing else is left (a grammar that
    only lets the request end)."""


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    """Log-probability of the sampled token under the raw model distribution."""
    top_logprobs: dict[int, Logprob] | None = None


def draw_seed(seed: int, position: int) -> int:
    """The generator seed of the draw at ``position`` (63 bits, stable everywhere)."""
    return hash_block(seed & (2**64 - 1), [position]) >> 1


def sample(logits: Tensor, rows: list[SampleRequest]) -> list[SampleResult]:
    """logits: [N, V] float32, one row per request. Returns one result per row. The rows
    whose parameters adjust the logits are changed in place."""
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    dead_ends = set()
    for i, row in enumerate(rows):
        if row.params.adjusts_logits:
            adjust(logits[i], row)
        if row.before_min_tokens and row.stop_ids:
            alive = _ban_unless_alone(logits[i], row.stop_ids)
        elif narrows_vocabulary(row.params):
            alive = bool(torch.isfinite(logits[i]).any())
        else:  # a bias or a penalty moves finite logits only: some token is always left
            continue
        if not alive:
            dead_ends.add(i)
    tokens = argmax_rows(logits)
    for i, row in enumerate(rows):
        if i in dead_ends:  # no token is allowed (a grammar and an allow-list that share
            # none, say): the request ends on a stop token rather than emit one nothing allowed
            logger.warning("no token satisfies every constraint of a request (its grammar "
                           "with allowed_token_ids / bad_words): it ends here")
            if row.stop_ids:
                tokens[i] = row.stop_ids[0]
        elif not row.params.greedy:
            tokens[i] = _sample_row(logits[i], row)
    return [_result(tokens[i], rows[i], logprobs, i) for i in range(len(rows))]


def adjust(logits: Tensor, row: SampleRequest) -> None:
    """Apply ``row``'s allow-list, bad words, logit bias and penalties to its logits [V] in
    place (vLLM's order). A bad word's last token is banned where the output ends with the
    word's other tokens."""
    p = row.params
    vocab = logits.shape[-1]
    if p.allowed_token_ids:
        ids = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=logits.device)
        kept = logits[ids]
        logits.fill_(float("-inf"))
        logits[ids] = kept
    assert row.tokens is not None, "a row whose logits are adjusted carries its tokens"
    output = row.tokens[row.num_prompt_tokens:]
    banned = [word[-1] for word in p.bad_words_token_ids if _ends_with(output, word[:-1])]
    if banned:
        logits[torch.tensor(banned, dtype=torch.long, device=logits.device)] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
        bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits.index_add_(0, ids, bias)
    if p.repetition_penalty != 1.0 and row.tokens:
        seen = torch.unique(torch.tensor(row.tokens, dtype=torch.long, device=logits.device))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                   values * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and output:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=logits.device),
                                minlength=vocab)[:vocab].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def narrows_vocabulary(params: SamplingParams) -> bool:
    """Whether ``params`` can take tokens out of the running (an allow-list, bad words): with
    a grammar's mask, they may leave a row no token at all."""
    return bool(params.allowed_token_ids or params.bad_words)


def _ban_unless_alone(logits: Tensor, ids: tuple[int, ...]) -> bool:
    """Set ``logits[ids]`` to -inf unless no other token has a finite logit; whether any
    token is left."""
    index = torch.tensor(ids, dtype=torch.long, device=logits.device)
    kept = logits[index]
    logits[index] = float("-inf")
    if bool(torch.isfinite(logits).any()):
        return True
    logits[index] = kept
    return bool(torch.isfinite(kept).any())


def _ends_with(tokens: list[int], tail: list[int]) -> bool:
    return not tail or (len(tail) <= len(tokens) and tokens[len(tokens) - len(tail):] == tail)


def _sample_row(logits: Tensor, row: SampleRequest) -> int:
    p = row.params
    x = logits / p.temperature
    if p.top_k > 0 and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        probs = _top_p(probs, p.top_p)
    gen = torch.Generator(device=logits.device).manual_seed(draw_seed(row.seed, row.position))
    u = torch.rand(1, generator=gen, dtype=torch.float64, device=logits.device)
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)  # [V]; zero-probability tokens add 0
    # the first index whose cdf exceeds u * total: a token of probability 0 is never it. u is
    # at most 1 - 2**-53, and t * (1 - 2**-53) rounds below t for every float64 t > 0 (the
    # exact product is t less at least half an ulp of t, and at a power of two it is exactly
    # t's lower neighbour), so some cdf entry exceeds u * total: the clamp never binds.
    token = torch.searchsorted(cdf, u * cdf[-1], right=True)
    return int(token.clamp_(max=cdf.shape[-1] - 1))


def _top_p(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p.

    Kept: the tokens, in descending order of probability, whose mass of strictly better tokens
    is below ``top_p``. Only that head of the order is needed, so ``torch.topk`` orders the
    first ``k`` tokens (a full sort of a 49,152-token vocabulary took ~3.6 ms a row on a
    2-core CPU, the top 256 ~0.15 ms). Once the mass of those ``k`` reaches ``top_p``, every
    later token has at least that much better mass and is cut, so ``k`` was enough; until then
    ``k`` grows 8x. The cumulative sums are the same numbers a full sort gives for its first
    ``k`` (a prefix of the same order), so the kept set is the full sort's.
    """
    vocab = probs.shape[-1]
    k = min(vocab, _TOP_P_FIRST_K)
    while True:
        head, order = torch.topk(probs, k)  # descending
        mass = torch.cumsum(head, dim=-1)
        if k == vocab or bool(mass[-1] >= top_p):
            break
        k = min(vocab, 8 * k)
    head = head.masked_fill(mass - head >= top_p, 0.0)  # mass of strictly better tokens
    return torch.zeros_like(probs).scatter_(-1, order, head)


_TOP_P_FIRST_K = 256
"""Tokens ordered in the first try of ``_top_p`` (a trained model's nucleus is mostly
smaller; a flat distribution's grows it 8x at a time)."""


def _result(token: int, row: SampleRequest, logprobs: Tensor | None, i: int) -> SampleResult:
    n = row.params.logprobs
    if logprobs is None or n is None:
        return SampleResult(token)
    lp = logprobs[i]
    chosen = float(lp[token])
    rank = int((lp > chosen).sum()) + 1
    top: dict[int, Logprob] = {token: Logprob(chosen, rank)}
    if n > 0:
        values, ids = torch.topk(lp, n)
        for r, (tid, val) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), start=1):
            top.setdefault(tid, Logprob(val, r))
    return SampleResult(token, chosen, top)
