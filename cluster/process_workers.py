"""Process workers: role workers as child processes of this one, without Ray.

Owns the ``runtime: processes`` side of the launcher (``cluster/launcher.py``): starting a
worker class (``roles/workers.py``) in a child process of its own, and ``ProcessActor``, the
handle the rest of ``cluster/`` calls as it calls a Ray actor (``actor.m.remote(...)`` gives
something to ``await``, or to iterate for an async-generator method; ``get`` waits from a
thread). A worker keeps what Ray gave it that matters on one machine: its own process (an
engine that crashes takes only its worker down; the cluster notices, replaces it and replays
its requests) and its own event loop. What it does without: Ray's daemons (GCS, raylet,
agents, monitors) and core-worker threads in the worker and in this process, which on a
2-core machine took 5-7% of a core from the engine's OpenMP team (docs/serving.md).

Wire: one Unix socket pair per worker, frames of ``4-byte length + pickle``. Parent to
child: ``("call", id, method, args, kwargs)`` and ``("cancel", id)`` (a stream's caller is
gone). Child to parent: ``("ok"|"err", id, value)`` for a call, ``("item", id, value)`` per
item of a stream and ``("end", id, error | None)`` at its end. The child's first frame is
``("ready", pid)``; it exits when the socket closes (its parent died: no orphan engines).
It must not decide what a lost worker means (membership.py does): a lost worker fails every
waiting call with ``WorkerProcessLost``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import weakref
from collections import deque
from typing import Any

from splitserve.roles.workers import WORKER_CLASSES, picklable_error

_HEADER = struct.Struct("!I")


class WorkerProcessLost(Exception):
    """The worker's process is gone (killed, crashed or stopped): its calls cannot finish."""


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- parent side


def _settle(future: concurrent.futures.Future[Any], value: Any, ok: bool) -> None:
    """Give ``future`` its outcome unless its caller gave up on it (an awaiting task cancelled,
    e.g. by ``asyncio.wait_for``'s timeout, cancels it): a late answer is dropped."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass


class _Call:
    """One call's result: ``await`` it on an event loop, or ``result(timeout)`` from a thread."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def __await__(self) -> Any:
        return asyncio.wrap_future(self.future).__await__()

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)


class _Done:
    """An item of a stream, already here (awaiting it gives it, as a Ray object ref would)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Any:
        return self.value
        yield  # pragma: no cover - makes this a generator


class _Stream:
    """An async-generator method's items, as ``async for ref in actor.m.remote(...)``."""

    _END = object()

    def __init__(self, actor: ProcessActor, call_id: int) -> None:
        self._actor, self._id = actor, call_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._early: list[Any] = []  # items that came before the first __anext__
        self._lock = threading.Lock()

    def _push(self, item: Any) -> None:  # on the actor's reader thread
        with self._lock:
            if self._queue is None:
                self._early.append(item)
                return
            loop, queue = self._loop, self._queue
        assert loop is not None
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # its loop is closed: nobody is reading
            pass

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> _Done:
        if self._queue is None:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._queue = asyncio.Queue()
                for item in self._early:
                    self._queue.put_nowait(item)
                self._early.clear()
        item = await self._queue.get()
        if item is self._END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return _Done(item)

    def __del__(self) -> None:  # its reader let go of it: the child's generator can stop
        actor = getattr(self, "_actor", None)
        if actor is not None:
            actor._cancels.append(self._id)  # sent with the next frame (no lock here: GC)


class _Method:
    def __init__(self, actor: ProcessActor, name: str, streams: bool) -> None:
        self._actor, self._name, self._streams = actor, name, streams

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._actor._call(self._name, args, kwargs, self._streams)


class ProcessActor:
    """A worker in a child process, called like a Ray actor handle (see the module doc)."""

    def __init__(self, worker_cls: type, proc: subprocess.Popen[bytes], sock: socket.socket,
                 worker_id: str) -> None:
        self.worker_id = worker_id
        self.pid = proc.pid
        self._cls = worker_cls
        self._proc = proc
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = iter(range(1, 1 << 62))
        self._calls: dict[int, _Call] = {}
        self._streams: weakref.WeakValueDictionary[int, _Stream] = weakref.WeakValueDictionary()
        """Open streams, held by their readers only (one dropped unread is cancelled)."""
        self._cancels: deque[int] = deque()
        self._lost: WorkerProcessLost | None = None
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._reader = threading.Thread(target=self._read, name=f"worker-{worker_id}",
                                        daemon=True)
        self._reader.start()

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        target = getattr(self._cls, name, None)
        if target is None or not callable(target):
            raise AttributeError(f"{self._cls.__name__} has no method {name!r}")
        return _Method(self, name, inspect.isasyncgenfunction(target))

    # ---- calls

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              streams: bool) -> Any:
        with self._lock:
            call_id = next(self._ids)
            handle: Any = _Stream(self, call_id) if streams else _Call()
            if self._lost is None:
                (self._streams if streams else self._calls)[call_id] = handle
            lost = self._lost
        if lost is not None:
            self._fail(handle, lost)
            return handle
        try:
            self._send(("call", call_id, name, args, kwargs))
        except OSError as e:
            self._lose(f"sending to it failed: {e}")
        return handle

    def _send(self, message: Any) -> None:
        data = _frame(message)
        while self._cancels:  # streams whose readers dropped them
            data = _frame(("cancel", self._cancels.popleft())) + data
        with self._send_lock:
            self._sock.sendall(data)

    @staticmethod
    def _fail(handle: Any, error: BaseException) -> None:
        if isinstance(handle, _Stream):
            handle._push(error)
        else:
            _settle(handle.future, error, ok=False)

    # ---- the reader thread

    def _read(self) -> None:
        reason = "its process exited"
        try:
            while True:
                header = _recv_exact(self._sock, _HEADER.size)
                if header is None:
                    break
                (size,) = _HEADER.unpack(header)
                body = _recv_exact(self._sock, size)
                if body is None:
                    break
                self._dispatch(pickle.loads(body))
        except Exception as e:  # noqa: BLE001 - a broken socket or frame: the worker is lost
            reason = f"its connection failed: {type(e).__name__}: {e}"
        self._lose(reason)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind, call_id = message[0], message[1]
        if kind == "ready":
            _settle(self._ready, call_id, ok=True)
            return
        if kind == "failed":  # its worker could not be built
            _settle(self._ready, message[2], ok=False)
            return
        if kind in ("ok", "err"):
            with self._lock:
                call = self._calls.pop(call_id, None)
            if call is not None:
                _settle(call.future, message[2], kind == "ok")
            return
        with self._lock:
            stream = self._streams.get(call_id)
            if kind == "end":
                self._streams.pop(call_id, None)
        if stream is None:
            return
        if kind == "item":
            stream._push(message[2])
        else:
            stream._push(message[2] if message[2] is not None else _Stream._END)

    def _lose(self, reason: str) -> None:
        rc = self._proc.poll()
        status = f" (exit status {rc})" if rc is not None else ""
        error = WorkerProcessLost(f"worker {self.worker_id} (pid {self.pid}) is lost: "
                                  f"{reason}{status}")
        with self._lock:
            if self._lost is not None:
                return
            self._lost = error
            calls, streams = list(self._calls.values()), list(self._streams.values())
            self._calls.clear()
            self._streams.clear()
        _settle(self._ready, error, ok=False)
        for handle in [*calls, *streams]:
            self._fail(handle, error)

    # ---- life

    def wait_started(self, timeout_s: float) -> None:
        """Wait for the child's first frame (its worker object exists); raises if it died."""
        self._ready.result(timeout_s)

    @property
    def alive(self) -> bool:
        return self._lost is None and self._proc.poll() is None

    def kill(self) -> None:
        """End the child at once (SIGKILL) and reap it."""
        if self._proc.poll() is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        self._proc.wait()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)


def spawn(role: str, worker_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
          env: dict[str, str] | None = None) -> ProcessActor:
    """Start a ``role`` worker (``WORKER_CLASSES[role](*args, **kwargs)``) in a child process."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.cluster.process_workers", str(child.fileno())],
            pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    try:
        parent.sendall(_frame((role, worker_id, args, kwargs)))
    except OSError:
        pass  # it died at once: the reader reports it lost
    return ProcessActor(WORKER_CLASSES[role], proc, parent, worker_id)


def get(handles: Any, timeout: float | None = None) -> Any:
    """Wait (from a thread) for one call's result or a list of them."""
    if isinstance(handles, list):
        return [h.result(timeout) for h in handles]
    return handles.result(timeout)


# --------------------------------------------------------------------------- child side


class _Child:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.worker: Any = None
        self.writer: asyncio.StreamWriter | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def send(self, message: Any) -> None:
        assert self.writer is not None
        self.writer.write(_frame(message))

    async def run(self, role: str, worker_id: str, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        try:
            self.worker = WORKER_CLASSES[role](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the parent says why the worker did not start
            self.send(("failed", 0, picklable_error(e)))
            await self.writer.drain()
            return
        self.send(("ready", os.getpid()))
        while True:
            try:
                header = await reader.readexactly(_HEADER.size)
                (size,) = _HEADER.unpack(header)
                message = pickle.loads(await reader.readexactly(size))
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the parent is gone (or closed us): so are we
            if message[0] == "call":
                _, call_id, name, call_args, call_kwargs = message
                self.tasks[call_id] = asyncio.ensure_future(
                    self.serve(call_id, name, call_args, call_kwargs))
            elif message[0] == "cancel":
                task = self.tasks.pop(message[1], None)
                if task is not None:
                    task.cancel()

    async def serve(self, call_id: int, name: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        streaming = False
        try:
            result = getattr(self.worker, name)(*args, **kwargs)
            if inspect.isasyncgen(result):
                streaming = True
                try:
                    async for item in result:
                        self.send(("item", call_id, item))
                finally:
                    await result.aclose()
                self.send(("end", call_id, None))
                return
            if inspect.isawaitable(result):
                result = await result
            self.send(("ok", call_id, result))
        except asyncio.CancelledError:
            return  # cancelled by the parent: it is not waiting
        except BaseException as e:  # noqa: BLE001 - the caller gets the error
            self.send(("end" if streaming else "err", call_id, picklable_error(e)))
        finally:
            self.tasks.pop(call_id, None)


def _child_main(fd: int) -> None:
    # Ctrl-C in a terminal (or a supervisor's SIGTERM) signals the whole group: the parent
    # drains and then stops its workers itself; a worker's life ends with its socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return
    body = _recv_exact(sock, _HEADER.unpack(header)[0])
    if body is None:
        return
    role, worker_id, args, kwargs = pickle.loads(body)
    sock.setblocking(False)
    child = _Child(sock)
    try:
        asyncio.run(child.run(role, worker_id, args, kwargs))
    finally:
        # the engine's thread must not keep a worker whose parent is gone alive
        os._exit(0)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))

