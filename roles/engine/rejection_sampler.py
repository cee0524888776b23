"""Rejection sampling of draft-free proposals, coupled to the sampler's (seed, position) draws.

Owns the rule that turns a verify chunk's k + 1 target rows into the tokens a request keeps.

A draft-free proposer is deterministic: its "draft distribution" q is a point mass on the
proposed token d. Speculative sampling (Leviathan et al., Chen et al.) then accepts d with
probability min(1, p(d) / q(d)) = p(d), and on rejection draws from the residual
norm(max(0, p - q)) = p with d removed, renormalized; the result is distributed exactly as p.

We realize both draws with the one the sampler makes anyway at that position: one uniform
through the inverse CDF of p, seeded by (request seed, position), picks token x with
probability p(x). Accepting d exactly when that draw is d has probability p(d);
when it does not, the drawn token is distributed as p conditioned on "not d", which is the
residual. So the kept tokens are distributed as the target model's, and, because every draw
depends only on (seed, position), they are the very tokens the request would have produced
without speculation: greedy and seeded outputs do not change, replays on another worker
continue identically, and logprobs are the target model's at each kept position.

Pure functions; no state, no tensors.
"""

from __future__ import annotations

from collections.abc import Sequence


def num_accepted(draft_token_ids: Sequence[int], target_token_ids: Sequence[int]) -> int:
    """How many leading draft tokens the target draws agree with.

    ``target_token_ids[i]`` is the token drawn at the position of ``draft_token_ids[i]``
    (row i of the verify chunk, whose input is the token before it).
    """
    n = 0
    for d, t in zip(draft_token_ids, target_token_ids, strict=False):
        if d != t:
            break
        n += 1
    return n

