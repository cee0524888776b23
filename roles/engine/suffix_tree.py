"""SuffixTrie: counts of every short substring of some token sequences, for suffix decoding.

Owns a trie whose path from the root spells a substring (length <= ``max_depth``) of one of
the sequences added, with at each node the number of times that substring occurs. Appending a
token to a sequence extends every suffix of it (at most ``max_depth`` nodes), so a sequence of
L tokens costs O(L * max_depth) to insert and as much to remove. ``speculate`` finds the
longest suffix of a context that occurs, then follows the most frequent continuation while
its estimated probability (count of the child / count of the parent, multiplied along the
path) stays above a floor: the SuffixDecoding method (Oliaro et al., 2024), written here
because the maintained implementation (arctic-inference) builds from source against a CUDA
torch and protobuf 5.

Torch-free. It must not know about requests or the engine: ``proposer.py`` feeds it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}


@dataclass(frozen=True)
class SuffixDraft:
    """A speculated continuation: its tokens, their estimated probabilities and the match."""

    token_ids: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    match_len: int = 0
    """Length of the context suffix that was found in the trie."""

    @property
    def score(self) -> float:
        """Expected number of accepted tokens, if the estimates are right."""
        return sum(self.probs)


class SuffixTrie:
    """Substring counts of a set of sequences, each addressed by a hashable id."""

    def __init__(self, max_depth: int) -> None:
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self.root = _Node()
        self._tokens: dict[Hashable, list[int]] = {}
        self._active: dict[Hashable, list[_Node]] = {}
        """Per sequence: nodes of its suffixes of length 1 .. max_depth - 1, shortest first."""

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self._tokens.get(seq_id, ()))

    def extend(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Append tokens to a sequence (created when new), counting its new substrings."""
        tokens = self._tokens.setdefault(seq_id, [])
        active = self._active.get(seq_id, [])
        for t in token_ids:
            active = self._step(active, t, +1)
            tokens.append(t)
        self._active[seq_id] = active

    def remove(self, seq_id: Hashable) -> None:
        """Forget a sequence: every count it added is taken back, empty nodes pruned."""
        tokens = self._tokens.pop(seq_id, None)
        self._active.pop(seq_id, None)
        active: list[_Node] = []
        for t in tokens or ():
            active = self._step(active, t, -1)

    def _step(self, active: list[_Node], token: int, delta: int) -> list[_Node]:
        """Extend each suffix (and the empty one) by ``token``; returns the new suffix nodes."""
        nxt = []
        for parent in [self.root, *active[: self.max_depth - 1]]:
            child = parent.children.get(token)
            if child is None:
                child = parent.children[token] = _Node()
            child.count += delta
            if child.count <= 0:
                del parent.children[token]  # its subtree is empty too (counts only shrink below)
            nxt.append(child)
        return nxt

    # ------------------------------------------------------------------ lookup

    def _walk(self, tokens: Sequence[int]) -> _Node | None:
        node = self.root
        for t in tokens:
            node = node.children.get(t)  # type: ignore[assignment]
            if node is None:
                return None
        return node

    def longest_match(self, context: Sequence[int], max_len: int) -> tuple[int, _Node | None]:
        """The longest suffix of ``context`` (at most ``max_len`` tokens) that occurs followed
        by some token (a sequence's own tail occurs, but with nothing after it).

        That property is monotone in the length (a suffix of such a string has it too), so a
        binary search over the length needs O(log max_len) walks.
        """
        lo, hi = 0, min(max_len, len(context), self.max_depth - 1)
        best: _Node | None = None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            node = self._walk(context[len(context) - mid :])
            if node is None or not node.children:
                hi = mid - 1
            else:
                lo, best = mid, node
        return lo, best

    def speculate(
        self, context: Sequence[int], max_tokens: int, max_match: int, spec_factor: float,
        min_prob: float,
    ) -> SuffixDraft:
        """Most frequent continuation of the longest matching suffix of ``context``.

        At most ``min(max_tokens, spec_factor * match_len)`` tokens (a short match earns a
        short guess), each kept while the product of child/parent counts along the path is at
        least ``min_prob``.
        """
        match_len, node = self.longest_match(context, max_match)
        if node is None or match_len == 0:
            return SuffixDraft()
        limit = min(max_tokens, int(spec_factor * match_len))
        tokens: list[int] = []
        probs: list[float] = []
        prob = 1.0
        while len(tokens) < limit and node.children:
            token, child = max(node.children.items(), key=lambda kv: (kv[1].count, -kv[0]))
            prob *= child.count / node.count
            if prob < min_prob:
                break
            tokens.append(token)
            probs.append(prob)
            node = child
        return SuffixDraft(tuple(tokens), tuple(probs), match_len)
