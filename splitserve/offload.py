"""Request preparation off the event loops and the engine's thread.

Tokenizing, chat templates and output-constraint checks of large inputs take seconds (a 7 MB
prompt: ~4 s here), while a loop (a frontend's, the cluster's) or the engine's thread serves
every other request. ``off_loop`` runs them on a small pool of their own rather than a loop's
default executor: that one also lends threads to calls that wait (the cluster's status behind
an unanswering worker, a grammar compile up to its timeout), and a burst of those must not
hold up the preparation of plain requests. The tokenizer releases the GIL while it encodes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

THREAD_PREFIX = "splitserve-prep"
"""Name prefix of the pool's threads (tests check the work ran there)."""

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=THREAD_PREFIX)


async def off_loop(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the preparation pool; its result or its exception."""
    return await asyncio.get_running_loop().run_in_executor(
        _pool, functools.partial(fn, *args, **kwargs))
