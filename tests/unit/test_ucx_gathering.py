"""The UCX server's staged gathers end with the lease unpinned however the serving task
ends, cancelled in the middle of a gather included (the reader went away)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator

import torch

from splitserve.kvtransfer.ucx_transport import _Gathering


class _Server:
    def __init__(self) -> None:
        self.released: list[torch.Tensor] = []
        self.pins = 1  # stage_parts pinned

    def release_staging(self, staging: torch.Tensor) -> None:
        self.released.append(staging)


def _parts(server: _Server, gate: threading.Event, started: threading.Event
           ) -> Generator[torch.Tensor, None, None]:
    try:
        for i in range(3):
            started.set()
            gate.wait(10)
            yield torch.full((4,), float(i))
    finally:
        server.pins -= 1


def test_cancel_during_a_gather_unpins_once_the_gather_ends() -> None:
    server, gate, started = _Server(), threading.Event(), threading.Event()
    gathering = _Gathering(_parts(server, gate, started), server)  # type: ignore[arg-type]

    async def run() -> None:
        async def serve() -> None:
            try:
                await gathering.next()
            finally:
                gathering.close()

        task = asyncio.get_running_loop().create_task(serve())
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        task.cancel()  # the gather is running on its thread
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert server.pins == 1  # still gathering: the blocks are being read
        gate.set()
        for _ in range(200):
            if server.pins == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert server.pins == 0
    assert len(server.released) == 1  # the part gathered for nobody went back


def test_parts_run_in_order_and_close_after_the_last() -> None:
    server, gate, started = _Server(), threading.Event(), threading.Event()
    gate.set()
    gathering = _Gathering(_parts(server, gate, started), server)  # type: ignore[arg-type]

    async def run() -> list[float]:
        got = []
        while (part := await gathering.next()) is not None:
            got.append(float(part[0]))
        gathering.close()
        return got

    assert asyncio.run(run()) == [0.0, 1.0, 2.0]
    assert server.pins == 0 and server.released == []
