"""Errors the router raises on purpose; each subclasses a shared ``splitserve.errors`` class.

Owns: the router's typed failures (no instance for a role, unknown policy, bad
trace line). Must not: define errors that other layers raise, or import anything
beyond ``splitserve.errors``.
"""

from __future__ import annotations

from splitserve.errors import ConfigError, NoHealthyWorkerError, SplitserveError


class NoInstanceAvailable(NoHealthyWorkerError):
    """No healthy instance of the role a placement needs; ``role`` names it."""

    def __init__(self, role: str, detail: str = "") -> None:
        message = f"no healthy {role} instance is available to place the request"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.role = role


class UnknownPolicyError(ConfigError):
    """A policy name that is not registered; the message lists the known names."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown router policy {name!r}; known policies: {', '.join(known)}")
        self.name = name


class UnknownInstanceError(SplitserveError, KeyError):
    """An event or call names an instance the router does not know."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"unknown instance {instance_id!r}")
        self.instance_id = instance_id

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class TraceFormatError(SplitserveError, ValueError):
    """A trace file line that is not a valid Mooncake-format record; names path and line."""

    def __init__(self, path: str, line_number: int, problem: str) -> None:
        super().__init__(f"{path}:{line_number}: {problem}")
        self.path = path
        self.line_number = line_number
