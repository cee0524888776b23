"""IntegrityReport: what a ``check_integrity()`` found, in a form every layer can merge.

The block pool, the KV cache manager, the scheduler, the lease manager and the engine each
check their own invariants (mini-sglang's ``check_integrity``) and return one of these;
the engine merges them, a worker returns it as a dict, tests and the soak harness assert
it is clean. Owns no state and checks nothing itself; imports nothing of ours but errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from splitserve.errors import SplitserveError


class IntegrityError(SplitserveError, AssertionError):
    """An integrity check failed; the message lists every broken invariant."""


@dataclass
class IntegrityReport:
    """Broken invariants and the leak counts derived from them (all zero when intact)."""

    problems: list[str] = field(default_factory=list)
    """One sentence per broken invariant, naming the block, request or lease."""
    leaked_blocks: int = 0
    """Blocks referenced by no live request (or referenced more often than requests hold them)."""
    stranded_leases: int = 0
    """Leases that will never end by themselves: no live request holds their blocks, or their
    deadline passed long ago and they are still not finalized."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def merge(self, other: IntegrityReport) -> IntegrityReport:
        """Fold ``other`` into this report; returns self."""
        self.problems.extend(other.problems)
        self.leaked_blocks += other.leaked_blocks
        self.stranded_leases += other.stranded_leases
        return self

    def raise_if_bad(self, what: str = "integrity check") -> None:
        if self.problems:
            lines = "\n  ".join(self.problems)
            raise IntegrityError(
                f"{what} failed ({self.leaked_blocks} leaked blocks, {self.stranded_leases} "
                f"stranded leases):\n  {lines}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}
