"""A child process that compiles each new grammar before the engine does, so a compile that
takes too long or too much memory is stopped (the child is killed) instead of running on.

Owns: the child (``python -m splitserve.roles.engine.grammar_probe``), its frames and its
limits. Must not: cache grammars or hold matchers (``structured.GrammarCompiler`` does).

Why: xgrammar's ``compile_grammar`` cannot be interrupted. In a thread, a hostile JSON schema
(tens of thousands of properties) compiled for minutes after its request was refused, on both
cores, and grew the engine by gigabytes. The compiled grammar cannot come back from the child
either: its ``serialize_json`` is about ten times its size in memory (120 MB and 4 s for a
200-property schema), so the child only says whether the compile finished within the budget
and the engine then compiles the grammar itself, which the probe has shown to be bounded.
A grammar that compiles costs it twice (a 200-property schema: about 1 s each; a usual one a
few milliseconds each); one that does not costs the timeout once, and the refusal is cached.

Frames both ways: a 4-byte big-endian length, then a pickle (the child is ours, started by
the engine, and reads only from its parent's pipe). Parent -> child: first the tokenizer's
``TokenizerInfo.serialize_json()`` and the compiler's thread count; then one grammar per
compile, as ``Grammar.serialize_json()`` (the parent has checked the constraint and built the
grammar already: a 20,000-property schema's check takes ~5 s, its grammar's JSON ~0.5 s).
Child -> parent: ``("ready",)`` once, then ``("ok", seconds)`` or ``("error", message)`` per
compile (an error is the parent's to report: it compiles the grammar too and raises).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import time
from typing import IO, Any

from splitserve import env

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""How long a child may take to start (import xgrammar and torch, load the vocabulary)."""
POLL_S = 0.02
"""How often the parent looks at the child's memory while it compiles."""


class ProbeRefused(Exception):
    """The grammar did not compile within the budget (``reason`` says which limit)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProbeUnavailable(Exception):
    """The child could not be started or died unasked: the caller compiles without a probe."""


def _write(stream: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError("pipe closed")
        data += chunk
    return data


def _read(stream: IO[bytes]) -> Any:
    (n,) = struct.unpack(">I", _read_exact(stream, 4))
    return pickle.loads(_read_exact(stream, n))


def _rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class GrammarProbe:
    """One child compiling one grammar at a time. Not thread-safe: one per compile thread."""

    def __init__(self, tokenizer_info_json: str, max_threads: int) -> None:
        self._info, self._threads = tokenizer_info_json, max_threads
        self.proc: subprocess.Popen[bytes] | None = None
        self._baseline_rss = 0
        self._ready = False
        self.num_kills = 0
        self.num_starts = 0

    @property
    def ready(self) -> bool:
        """A child is up and has answered that it is ready (a probe would not wait for it)."""
        return self.proc is not None and self._ready

    def start(self) -> None:
        """Start the child (it loads in the background; ``probe`` waits for it)."""
        if self.proc is not None:
            return
        child_env = {k: v for k, v in os.environ.items() if k not in env.secret_names()}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.roles.engine.grammar_probe"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env, close_fds=True,
        )
        self.num_starts += 1
        self._ready = False
        assert self.proc.stdin is not None
        try:
            _write(self.proc.stdin, (self._info, self._threads))
        except OSError as e:
            self.kill()
            raise ProbeUnavailable(f"grammar probe did not start: {e}") from e

    def _wait_frame(self, deadline: float, max_growth: int | None) -> Any:
        """The child's next frame; kills it and raises ProbeRefused past ``deadline`` or when its
        memory grows more than ``max_growth`` bytes over what it held when ready."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ProbeRefused("time")
            readable, _, _ = select.select([fd], [], [], min(POLL_S, left))
            if readable:
                try:
                    return _read(proc.stdout)
                except (EOFError, OSError, pickle.UnpicklingError) as e:
                    code = proc.poll()
                    self.kill()
                    raise ProbeUnavailable(f"grammar probe exited ({code})") from e
            if max_growth is not None and _rss_bytes(proc.pid) - self._baseline_rss > max_growth:
                self.kill()
                raise ProbeRefused("memory")

    def probe(self, grammar_json: str, timeout_s: float, max_memory_bytes: int) -> float:
        """Seconds the child took to compile the grammar (or to fail on it); raises
        ProbeRefused (child killed) when it takes longer than ``timeout_s`` or grows by more
        than ``max_memory_bytes``, ProbeUnavailable when the child cannot be had."""
        if timeout_s <= 0:
            raise ProbeRefused("time")
        self.start()
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        if not self._ready:
            frame = self._wait_frame(time.monotonic() + START_TIMEOUT_S, None)
            if frame != ("ready",):
                self.kill()
                raise ProbeUnavailable(f"grammar probe answered {frame!r} at start")
            self._ready = True
            self._baseline_rss = _rss_bytes(proc.pid)
        try:
            _write(proc.stdin, grammar_json)
        except OSError as e:
            self.kill()
            raise ProbeUnavailable(f"grammar probe is gone: {e}") from e
        frame = self._wait_frame(time.monotonic() + timeout_s, max_memory_bytes)
        if not (isinstance(frame, tuple) and frame and frame[0] in ("ok", "error")):
            self.kill()
            raise ProbeUnavailable(f"grammar probe answered {frame!r}")
        if frame[0] == "ok":
            return float(frame[1])
        return 0.0  # the parent's own compile raises the precise error

    def kill(self) -> None:
        """Stop the child at once (SIGKILL) and reap it; the next ``probe`` starts another."""
        proc, self.proc, self._ready = self.proc, None, False
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            self.num_kills += 1
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    close = kill


def _exit_with_parent(parent: int) -> None:
    """Exit as soon as the parent is gone, even mid-compile (xgrammar releases the GIL while
    it compiles, so this thread runs): a SIGKILLed engine leaves no compile running behind it.
    A closed pipe alone would be seen only after the compile."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


PARENT_POLL_S = 0.2
"""How often the child checks that its parent is alive."""


def _serve() -> int:
    """The child: compile what the parent sends, answer how it went."""
    import threading

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the frames
    inp = sys.stdin.buffer
    try:
        info_json, threads = _read(inp)
    except EOFError:
        return 0
    import xgrammar as xgr

    info = xgr.TokenizerInfo.deserialize_json(info_json)
    compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    # The first compile builds the vocabulary's tables (~300 MB); the parent measures each
    # grammar's memory from what the child holds after it.
    compiler.compile_grammar(xgr.Grammar.builtin_json_grammar())
    _write(out, ("ready",))
    while True:
        try:
            grammar_json = _read(inp)
        except EOFError:
            return 0
        t0 = time.perf_counter()
        try:
            compiler.compile_grammar(xgr.Grammar.deserialize_json(grammar_json))
            _write(out, ("ok", time.perf_counter() - t0))
        except (RuntimeError, ValueError, TypeError) as e:
            _write(out, ("error", str(e)))


if __name__ == "__main__":
    sys.exit(_serve())
