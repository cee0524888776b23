"""The request path: a prepared prompt's way through the workers, with replay on faults.

Owns placing a request with the router, encoding its images, the prefill stream (and its
re-issue after a migration), the decode stream, replaying on another worker when one dies or
its engine fails, fanning ``n > 1`` out into child requests, and abort. With layer-wise KV
streaming the prefill worker hands the KV params off before its forward runs: the decode
stream then opens at once (its pull overlaps the prefill) and gets the first token (or word
that none is coming) when the prefill stream ends. It must not start or
stop workers (membership.py) nor poll them (health.py). Everything here runs on the cluster's
event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.flights import (
    Flight,
    FlightTable,
    abort_output,
    decode_timing,
    prefill_timing,
    stage_keys,
    withdrawn,
)
from splitserve.cluster.inputs import PreparedInput
from splitserve.cluster.membership import WORKER_LOST, Membership, WorkerLost, aref
from splitserve.cluster.worker_streams import WorkerStreamEnded, WorkerStreams
from splitserve.errors import EngineFailedError, NoHealthyWorkerError, RequestAbortedError
from splitserve.hashing import hash_block_tokens, root_hash
from splitserve.outputs import RequestOutput
from splitserve.roles.engine.sampler import draw_seed
from splitserve.roles.llm import _merge
from splitserve.router.errors import NoInstanceAvailable
from splitserve.router.schema import Placement, RouteRequest
from splitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

REPLACEMENT_WAIT_S = 120.0
"""How long a request whose role has no live worker left waits for a replacement to start."""
MAX_REPLAYS = 8
"""How many times one request may be placed again after its worker died."""


class RequestPath:
    """Streams requests through the workers of a `Membership`, recording them as flights."""

    def __init__(
        self, config: ClusterConfig, membership: Membership, flights: FlightTable,
        counters: collections.Counter[str],
    ) -> None:
        self.config = config
        self.membership = membership
        self.router = membership.router
        self.flights = flights
        self.counters = counters
        self.streams = WorkerStreams()
        """One output stream per worker for this handle's requests (not one per request)."""
        self._rng = random.Random()

    # ------------------------------------------------------------------ whole requests

    async def generate_all(
        self, ids: list[str], inputs: list[PreparedInput], params: list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run several requests concurrently; one finished output each, in order."""
        async def one(rid: str, inp: PreparedInput, p: SamplingParams) -> RequestOutput:
            results: dict[str, RequestOutput] = {}
            async for delta in self.stream(rid, inp, p):
                _merge(results, delta)
            return results[rid]

        return list(await asyncio.gather(*(one(*a) for a in zip(ids, inputs, params, strict=True))))

    async def stream(
        self, request_id: str, inp: PreparedInput, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """All ``n`` samples of a request, merged into one stream of deltas. ``request_id``
        is the cluster's own (unique) id; children are ``<request_id>.<i>``."""
        flight_ids = (request_id,) if params.n == 1 else tuple(
            f"{request_id}.{i}" for i in range(params.n))
        self.flights.add_request(request_id, flight_ids)
        try:
            async for out in self._stream_samples(request_id, flight_ids, inp, params):
                yield out
        finally:
            self.flights.remove_request(request_id)

    async def _stream_samples(
        self, request_id: str, flight_ids: tuple[str, ...], inp: PreparedInput,
        params: SamplingParams,
    ) -> AsyncIterator[RequestOutput]:
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        if params.n == 1:
            child = dataclasses.replace(params, seed=seed)
            async for out in self._stream_one(request_id, inp, child):
                yield out
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def run(i: int, child_id: str) -> None:
            child = dataclasses.replace(  # one sample computes the prompt logprobs
                params, n=1, seed=seed if i == 0 else draw_seed(seed, -i),
                prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            try:
                async for out in self._stream_one(child_id, inp, child, group_id=request_id):
                    out.outputs[0].index = i
                    await queue.put(out)
            finally:
                await queue.put(i)

        tasks = [asyncio.ensure_future(run(i, c)) for i, c in enumerate(flight_ids)]
        done = 0
        try:
            while done < len(tasks):
                item = await queue.get()
                if isinstance(item, int):
                    done += 1
                    if tasks[item].exception() is not None:
                        raise tasks[item].exception()  # type: ignore[misc]
                    continue
                item.request_id = request_id
                item.finished = item.finished and done == len(tasks) - 1
                yield item
        finally:
            for t in tasks:
                t.cancel()

    async def abort(self, request_id: str) -> None:
        """Stop one request (by the cluster's id) and its ``n`` children, wherever they run;
        no other request is touched."""
        for flight in self.flights.flights_of(request_id):
            flight.aborted = True
            await self._abort_flight(flight)

    # ------------------------------------------------------------------ one sample

    async def _stream_one(
        self, request_id: str, inp: PreparedInput, params: SamplingParams,
        group_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """One sample through (encode,) prefill then decode, replayed if a worker dies.
        ``group_id``: the request it is a sample of (``n > 1``), for the engines' fairness."""
        flight = self.flights.open(request_id, group_id)
        finished = False
        early: _EarlyDecode | None = None
        prefilled = asyncio.Event()
        try:
            placement = self._place(request_id, inp, params)
            flight.placed = {placement.decode_instance, placement.prefill_instance or ""}
            flight.mm = await self._encode(flight, inp, placement.encode_instances)

            def start_decode() -> None:  # layer-wise streaming: the KV params came early
                nonlocal early
                early = early or _EarlyDecode(self._decode(
                    flight, inp.ids, params, placement.decode_instance, prefilled))

            if not placement.skip_remote_prefill and placement.prefill_instance is not None:
                flight.prefill = placement.prefill_instance
                async for out in self._prefill(flight, inp.ids, params, start_decode):
                    finished = out.finished
                    yield _once(out, flight)
                prefilled.set()
                self.router.on_prefill_done(request_id)
            if early is not None and not finished and not flight.aborted:
                await self._resume_decode(flight)
            if finished:
                return
            if flight.aborted:  # aborted between hand-off and decode
                finished = True
                yield abort_output(request_id, inp.ids)
                return
            decode = early if early is not None else self._decode(
                flight, inp.ids, params, placement.decode_instance)
            async for out in decode:
                finished = out.finished
                yield _once(out, flight)
        finally:
            self.flights.close(request_id)
            self.router.on_finish(request_id)
            early_open = early is not None and not early.done  # e.g. prefill ended it
            if early is not None:
                await early.close()
            if (not finished and not flight.aborted) or early_open:
                await self._abort_flight(flight)

    async def _prefill(
        self, flight: Flight, prompt_ids: list[int], params: SamplingParams,
        on_early_handoff: Callable[[], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The prefill stream; re-issued on the target after a migration. Leaves the hand-off
        params in ``flight.handoff`` (None if the prefill worker died). A layer-wise streamed
        offer (params before any token) is not the client's: it calls ``on_early_handoff``."""
        while flight.prefill is not None:
            moved = False
            try:
                async for out in self._call(flight.prefill, flight, prompt_ids, params,
                                            {"do_remote_decode": True}):
                    if withdrawn(flight, out):
                        moved = True  # re-queued on migrate_to below; not the client's
                        break
                    if _early_handoff(out) and on_early_handoff is not None:
                        flight.handoff = out.kv_transfer_params
                        on_early_handoff()
                        continue
                    flight.handoff, out.kv_transfer_params = out.kv_transfer_params, None
                    if flight.handoff is not None:
                        out.finished = False
                    if flight.handoff is not None or out.finished:
                        prefill_timing(flight.timing, out.metrics)
                    if out.finished:  # done at prefill (e.g. max_tokens=1)
                        out.metrics = {**out.metrics, **stage_keys(flight.timing)}
                    yield out
            except WorkerLost:
                flight.handoff = None  # the decode worker prefills (prompt + tokens so far)
                self.counters["replays"] += 1
            flight.prefill, flight.migrate_to = (flight.migrate_to if moved else None), None
            if flight.prefill is not None:
                flight.placed.add(flight.prefill)

    async def _decode(
        self, flight: Flight, prompt_ids: list[int], params: SamplingParams, decode: str,
        prefilled: asyncio.Event | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The decode stream; replayed on another decode worker if its worker dies (opened
        early, a replay waits for ``prefilled``: it must start after the first token)."""
        handoff = flight.handoff
        while True:
            try:
                flight.decode = decode
                async for out in self._call(decode, flight, prompt_ids, params, handoff):
                    if out.finished:
                        decode_timing(flight.timing, out.metrics, local=handoff is None)
                        out.metrics = {**out.metrics, **stage_keys(flight.timing)}
                    yield out
                return
            except WorkerLost:
                handoff = None
                flight.replays += 1
                self.counters["replays"] += 1
                if prefilled is not None:
                    await prefilled.wait()
                decode = await self._replacement("decode", flight)

    async def _resume_decode(self, flight: Flight) -> None:
        """Give an early decode stream its first token: the prefill stream's, or none when
        the prefill worker died (the decode worker then computes the prompt itself). A lost
        decode worker is the decode stream's to notice (it replays)."""
        handle = self.membership.healthy_handle(flight.decode or "")
        if handle is None:
            return
        tokens = list(flight.tokens) if flight.handoff is not None else []
        try:
            await aref(handle.actor.resume.remote(flight.request_id, tokens))
        except WORKER_LOST as e:
            logger.warning("decode worker %s lost before its first token: %s", flight.decode, e)

    def _place(self, request_id: str, inp: PreparedInput, params: SamplingParams) -> Placement:
        hashes = hash_block_tokens(inp.ids, self.config.block_size, extra_keys=inp.extra_keys,
                                   parent_hash=root_hash(params.cache_salt))
        try:
            placement = self.router.route(RouteRequest(
                request_id, len(inp.ids), hashes, image_hashes=tuple(inp.image_hashes),
                max_output_tokens=params.max_tokens or 0,
            ))
        except NoInstanceAvailable as e:
            self.counters["route:no_instance"] += 1
            raise NoHealthyWorkerError(f"no healthy worker: {e}") from e
        self.counters[f"route:{_outcome(placement)}"] += 1
        return placement

    # ------------------------------------------------------------------ encode

    async def _encode(
        self, flight: Flight, inp: PreparedInput, instances: Sequence[str]
    ) -> dict[str, Any] | None:
        """Run the images through the encode workers the router chose (by content hash, so
        a repeated image hits that worker's embedding cache); None for a text prompt."""
        if not inp.images:
            return None
        start = time.monotonic()
        groups: dict[str, list[int]] = {}
        for i, worker_id in enumerate(instances):
            groups.setdefault(worker_id, []).append(i)
        outs = await asyncio.gather(*(
            self._encode_on(w, [inp.images[i] for i in idx], flight) for w, idx in groups.items()
        ))
        results: list[Any] = [None] * len(inp.images)
        for idx, out in zip(groups.values(), outs, strict=True):
            for i, r in zip(idx, out, strict=True):
                results[i] = r
        flight.timing["encode"] = time.monotonic() - start
        return {"image_embeds": [r["embeds"] for r in results],
                "image_hashes": [int(r["hash"]) for r in results]}

    async def _encode_on(self, worker_id: str, images: list[Any], flight: Flight) -> list[Any]:
        """One encode worker's results; another encode worker takes over if it dies."""
        while True:
            handle = self.membership.healthy_handle(worker_id)
            if handle is not None:
                try:
                    return list(await handle.actor.encode.remote(images))
                except WORKER_LOST as e:
                    logger.warning("encode worker %s lost: %s", worker_id, e)
                    self.membership.mark_dead(worker_id)
            flight.replays += 1
            self.counters["replays"] += 1
            worker_id = await self._replacement("encode", flight)

    # ------------------------------------------------------------------ workers

    async def _call(
        self, worker_id: str, flight: Flight, prompt_ids: list[int], params: SamplingParams,
        kv_transfer_params: dict[str, Any] | None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one worker's deltas for the flight; raises WorkerLost if it dies."""
        handle = self.membership.healthy_handle(worker_id)
        if handle is None:
            raise WorkerLost(worker_id)
        flight.workers.add(worker_id)
        outputs = self.streams.generate(
            worker_id, handle.actor, flight.request_id, prompt_ids, params, kv_transfer_params,
            list(flight.tokens), flight.mm, flight.group_id,
        )
        try:
            async for out in outputs:
                flight.tokens.extend(out.outputs[0].token_ids)
                done = out.finished  # read first: the consumer may rewrite it (a hand-off)
                yield out
                if done:  # the worker's last word: its stream's end is not waited for (a
                    return  # worker killed just after it would otherwise replay a done request)
        except (*WORKER_LOST, WorkerStreamEnded) as e:
            logger.warning("worker %s lost during %s: %s", worker_id, flight.request_id, e)
            self.membership.mark_dead(worker_id)
            raise WorkerLost(worker_id) from e
        except EngineFailedError as e:  # its engine failed a step: run the request again
            logger.warning("engine of %s failed during %s: %s", worker_id, flight.request_id, e)
            self.counters["engine_failures"] += 1
            await self._check_engine(worker_id)
            raise WorkerLost(worker_id) from e
        except Exception as e:
            # requests are checked before placement, so a worker refusing one is news: say
            # where in its life (replays, resumed tokens, KV params) the flight was
            if not isinstance(e, RequestAbortedError):
                logger.warning(
                    "worker %s refused %s (replays %d, %d tokens so far, kv params %s): %s: %s",
                    worker_id, flight.request_id, flight.replays, len(flight.tokens),
                    sorted(kv_transfer_params or {}), type(e).__name__, str(e).splitlines()[-1:],
                )
            raise
        finally:
            await outputs.aclose()
            flight.workers.discard(worker_id)

    async def _check_engine(self, worker_id: str) -> None:
        """After a failed step: a worker whose engine is now unhealthy is replaced (one that
        recovered keeps serving, and may take the replay)."""
        handle = self.membership.healthy_handle(worker_id)
        if handle is None:
            return
        try:
            health = await asyncio.wait_for(aref(handle.actor.health.remote()),
                                            self.config.registry.heartbeat_timeout_s)
        except WORKER_LOST:
            self.membership.mark_dead(worker_id)
            return
        except Exception:  # noqa: BLE001 - a slow answer: the health loop decides
            return
        if not health.get("healthy", True):
            self.membership.retire_unhealthy(worker_id, str(health.get("error", "")))

    async def _replacement(self, role: str, flight: Flight) -> str:
        """Another healthy worker of ``role`` for a request whose worker died; when none is
        left but a replacement is starting (``replace_failed``), the request waits for it."""
        deadline = time.monotonic() + REPLACEMENT_WAIT_S
        while flight.replays <= MAX_REPLAYS and not flight.aborted:
            healthy = [h.worker_id for h in self.membership.live(role)]
            if healthy:
                return min(healthy, key=self.flights.num_on)
            left = deadline - time.monotonic()
            if not self.membership.replacing or left <= 0:
                break
            await asyncio.wait(set(self.membership.replacing), timeout=left)
        raise NoHealthyWorkerError(f"no healthy {role} worker left for {flight.request_id}")

    async def _abort_flight(self, flight: Flight) -> None:
        for worker_id in list(flight.workers) or list(self.membership.workers):
            handle = self.membership.healthy_handle(worker_id)
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.actor.abort.remote(flight.request_id)


def _early_handoff(out: RequestOutput) -> bool:
    """A layer-wise streamed offer: KV params before the request's first token."""
    return (
        out.kv_transfer_params is not None
        and not out.finished
        and not out.outputs[0].token_ids
    )


class _EarlyDecode:
    """A decode stream opened before its prefill stream ended (layer-wise KV streaming): its
    deltas are buffered until the prefill stream's first token has gone to the client."""

    def __init__(self, stream: AsyncIterator[RequestOutput]) -> None:
        self._queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(stream))

    async def _pump(self, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait(out)
            self._queue.put_nowait(None)
        except Exception as e:  # noqa: BLE001 - raised to the consumer
            self._queue.put_nowait(e)

    @property
    def done(self) -> bool:
        return self._task.done()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[RequestOutput]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def close(self) -> None:
        """Stop the stream (its request was aborted on the workers first)."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def _outcome(placement: Placement) -> str:
    """How the router placed a request, for ``router_decisions_total{outcome}``."""
    if placement.skip_remote_prefill:
        return "local_prefill"
    if placement.fallback:
        return "load_fallback"
    return "prefix_hit" if placement.cached_tokens > 0 else "prefix_miss"


def _once(out: RequestOutput, flight: Flight) -> RequestOutput:
    """The sample's prompt logprobs reach the client once: from the prefill worker, or from
    the worker that computed the prompt after a loss; a replay's second copy is dropped."""
    if out.prompt_logprobs is not None:
        if flight.sent_prompt_logprobs:
            out.prompt_logprobs = None
        flight.sent_prompt_logprobs = True
    return out
