"""What one running stage works with: its inbox, its outbox, the ledger and its probe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from anyio import WouldBlock

from ..batching import Envelope, Request
from ..channels import EMPTY, END, Channel, ChannelStatistics
from ..stage import Stage
from ..streams import PartStream
from .ledger import Ledger
from .probe import StageProbe

__all__ = ["Outbox", "Outlet", "StageContext", "next_live", "send_on"]


class Outlet(Protocol):
    """Where an outbox sends: a :class:`~asyncnn.channels.Channel`, or a pipeline output's
    ``Sink`` (which ends requests as they arrive and never waits)."""

    def send_nowait(self, item: Envelope) -> None: ...
    async def send(self, item: Envelope) -> None: ...
    def has_room(self) -> bool: ...
    def takes(self, item: Envelope) -> bool: ...
    def add_senders(self, n: int) -> None: ...
    def sender_done(self) -> None: ...
    def statistics(self) -> ChannelStatistics: ...


class Outbox:
    """Where a stage's outputs go: one channel per consumer.

    A merged batch stays merged for consumers that take it as it is (a batching stage, the sink)
    and is split into one envelope per request for the others; every consumer after the first
    gets its own envelope around the same payload. The channels end themselves: each of the
    stage's sending tasks is registered with ``open(n)`` and calls ``sender_done()`` once.
    """

    __slots__ = ("channels", "merged", "probe", "single")

    def __init__(
        self, channels: Sequence[Outlet], merged: Sequence[bool], probe: StageProbe
    ) -> None:
        self.channels = list(channels)
        self.merged = list(merged)
        self.probe = probe
        # The fast path: one consumer, an unmerged envelope goes to it as it is.
        self.single = self.channels[0] if len(self.channels) == 1 else None

    def open(self, senders: int) -> None:
        for ch in self.channels:
            ch.add_senders(senders)

    def sender_done(self) -> None:
        for ch in self.channels:
            ch.sender_done()

    def has_room(self) -> bool:
        return all(ch.has_room() for ch in self.channels)

    def send_now(self, env: Envelope) -> bool:
        """Send ``env`` (one request's, not a merged batch) to every consumer now when each
        takes it (``Channel.takes``); else send nothing and return False."""
        channels = self.channels
        if not all(ch.takes(env) for ch in channels):
            return False
        for i, ch in enumerate(channels):
            ch.send_nowait(env if i == 0 else Envelope(env.payload, env.requests, env.chunk))
        return True

    async def send(self, env: Envelope) -> None:
        """Send ``env`` to every consumer, waiting for room (counted as backpressure)."""
        t0 = 0.0
        single = self.single is not None
        # Read the fields first: once a consumer holds `env` it may replace its payload.
        payload, requests, chunk, rows, parts = (
            env.payload,
            env.requests,
            env.chunk,
            env.rows,
            env.parts,
        )
        for i, (ch, merged) in enumerate(zip(self.channels, self.merged, strict=True)):
            if parts is None or merged:
                copy = single or i == 0
                envs = [env if copy else Envelope(payload, requests, chunk, rows, parts)]
            else:
                envs = Envelope(payload, requests, chunk, rows, parts).split()
            for e in envs:
                try:
                    ch.send_nowait(e)
                except WouldBlock:
                    if not t0:
                        t0 = time.perf_counter()
                    await ch.send(e)
        if t0:
            self.probe.waited(time.perf_counter() - t0)


@dataclass(eq=False)
class StageContext:
    """One stage at run time. Built by the runtime from the plan and the wiring."""

    stage: Stage
    index: int
    inbox: Channel[Envelope]  # the stage's work: its one port, or the join's merged channel
    ports: list[Channel[Envelope]]  # one per input port (the inbox itself unless a join)
    outbox: Outbox
    ledger: Ledger
    probe: StageProbe
    call: Any  # the stage's function, prepared for where it runs
    to_host: bool = False
    device: torch.device | None = None
    pool: Any = None  # a RayPool for executor="ray" stages, made by prepare()
    workers: int = 1  # worker tasks reading the inbox (a Ray stage: one per call its replicas hold)
    join: Any = None  # a join's PartTable: the parts of each request, matched by id
    tracing: Any = None  # a tracing.Tracing while the pipeline traces, else None
    held: Any = None  # a batching stage's Batcher: requests waiting for their batch to form

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def accelerated(self) -> bool:
        """The stage launches work on an accelerator (its threads keep the device fed)."""
        return self.device is not None and self.device.type != "cpu"

    def fail(
        self, requests: Sequence[Request], cause: Exception, message: str | None = None
    ) -> None:
        """A call of this stage failed: end ``requests`` with a ``StageError`` naming it."""
        self.probe.failed(cause, len(requests))
        self.ledger.fail_stage(self.stage.name, requests, cause, message)

    # -- streaming requests (generator and step stages) ------------------------------------------

    def start_stream(self, req: Request) -> PartStream:
        """The stream of ``req``'s parts from this stage; ``req`` ends once, when every part is
        in (its result: the parts, or None for a reader) or at the first error."""
        stream = req.stream
        if stream is None:  # admitted without one (a caller that collects): keep every part
            stream = req.stream = PartStream()
        stream.on_end = lambda error: self._end_stream(req, stream, error)
        stream.parent = req
        return stream

    async def send_part(self, stream: PartStream, value: Any) -> None:
        """Send one part of ``stream``'s request on, as a request of its own; straight into
        its stream when this stage is the pipeline's only output (``Sink.direct``)."""
        single = self.outbox.single
        if getattr(single, "direct", False):
            self.probe.items += 1
            stream.put(value)
            return
        fut = asyncio.get_running_loop().create_future()
        p = stream.parent  # a part is as urgent as its request
        if p is None:
            part = Request(stream.add_part(fut), fut)
        else:
            part = Request(stream.add_part(fut), fut, None, p.deadline, p.priority, p.since)
            if p.trace is not None:
                part.trace = p.trace.part()  # its stage spans go under the request's span
        self.ledger.admit(part)
        self.probe.items += 1
        env = Envelope(value, [part])
        if single is not None and single.has_room():
            single.send_nowait(env)  # the common case: no coroutine
        else:
            await self.outbox.send(env)

    def part_failed(self, stream: PartStream, cause: Exception) -> None:
        """The stage's function failed for this request: it ends with a ``StageError`` after
        the parts it already made."""
        self.probe.failed(cause, 1)
        stream.end(self.ledger.stage_error(self.name, cause))

    def _end_stream(self, req: Request, stream: PartStream, error: BaseException | None) -> None:
        if error is None:
            self.ledger.complete(req, stream.result())
        else:
            self.ledger.fail(req, error)
            self.ledger.abandon(req)


async def next_live(ctx: StageContext) -> Envelope:
    """The next envelope with a live request for ``ctx``'s stage to compute (ended ones are
    dropped, those out of time ended), or ``END``."""
    inbox, ledger, probe = ctx.inbox, ctx.ledger, ctx.probe
    while True:
        env = inbox.poll()
        if env is EMPTY:
            env = await inbox.next()
        if env is END or ledger.live(env, probe):
            return env


async def send_on(
    ctx: StageContext, env: Envelope, holds_above: Callable[[int], bool] | None = None
) -> None:
    """Send a worker's output ``env`` on (``Outbox.send``). In a ranked pipeline, while its one
    consumer's queue is full and holds it back, an input of a more urgent class waiting for this
    stage (in its queue, or ``holds_above(priority)``: among the calls the worker already holds)
    lets ``env`` past the bound: the worker moves on to that input instead of every worker of
    the stage holding it back behind less urgent outputs (measured: one batch later at the
    next stage, in a tokenize -> model chain at 150% load). What passes so is one output per
    worker for each more urgent input."""
    outbox, inbox = ctx.outbox, ctx.inbox
    chan = outbox.single
    if type(chan) is not Channel or not inbox.ranked:
        await outbox.send(env)
        return
    priority, t0 = env.requests[0].priority, 0.0
    while True:
        try:
            chan.send_nowait(env)
            break
        except WouldBlock:
            pass
        if inbox.holds_above(priority) or (holds_above is not None and holds_above(priority)):
            chan.send_over(env)
            break
        t0 = t0 or time.perf_counter()
        fut = asyncio.get_running_loop().create_future()
        chan.wake_on_room(fut)
        inbox.watch(fut, priority)
        try:
            await fut
        except asyncio.CancelledError:
            chan.pass_room()  # a wake-up for room that raced with the cancellation
            raise
        finally:
            inbox.unwatch(fut)
    if t0:
        ctx.probe.waited(time.perf_counter() - t0)
