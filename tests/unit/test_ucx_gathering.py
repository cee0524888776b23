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


def test_receives_overlap_and_a_cancel_waits_for_the_ones_posted(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The reader posts each part's receive as soon as its message is there, without
    waiting for the one before to land; cancelled, it returns only once every posted
    receive has finished writing (the blocks may be given back right after)."""
    from splitserve.kvtransfer import ucx_transport as ut

    arrived = {0: asyncio.Event(), 1: asyncio.Event(), 2: asyncio.Event()}
    landed: list[int] = []
    posted: list[int] = []
    release = asyncio.Event()

    async def probe(tag: int, conn: object) -> int:
        await arrived[tag].wait()
        return tag

    async def recv(dest: torch.Tensor, tag: int) -> None:
        posted.append(tag)
        await release.wait()
        dest.fill_(tag)
        landed.append(tag)

    monkeypatch.setattr(ut, "_probe_on_worker", probe)
    monkeypatch.setattr(ut, "_recv_probed", recv)
    views = [torch.zeros(2) for _ in range(3)]

    async def run() -> None:
        task = asyncio.ensure_future(ut._recv_all_on_worker(views, 0, object()))  # type: ignore[arg-type]
        arrived[0].set()
        arrived[1].set()  # part 2 never comes (its sender went away)
        while len(posted) < 2:
            await asyncio.sleep(0.001)
        assert landed == []  # two receives in flight at once
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()  # waits for the posted receives
        release.set()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert sorted(landed) == [0, 1]

    asyncio.run(run())
    assert views[0].tolist() == [0.0, 0.0] and views[1].tolist() == [1.0, 1.0]
    assert views[2].tolist() == [0.0, 0.0]  # never posted
