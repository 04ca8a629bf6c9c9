"""The edges of the graph: the input task, join collectors, and the sinks that end requests."""

from __future__ import annotations

from typing import Any

from ...batching import Envelope, Request
from ...channels import END, Channel, ChannelStatistics
from ...payload import concat_rows, split_rows
from ..context import Outbox, StageContext
from ..joins import PartTable
from ..ledger import Ledger

__all__ = ["Router", "Sink", "run_collector", "run_input"]


class Router:
    """The input task's state, shared with admission: the envelope it waits to send while a
    first stage's queue is full (``held``). A request of a more urgent class admitted meanwhile
    goes to the first stages at once (``route``) when each takes it (its queue ranks, and it
    outranks what waits there): it does not wait in admission behind a less urgent request
    for room that the next batch formed would not have given it (measured: an urgent request
    reached its batch one batch later, ~10 ms at 150% load, in a graph with a join)."""

    __slots__ = ("held", "outbox")

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.held: Envelope | None = None

    def route(self, env: Envelope) -> bool:
        """Send ``env`` (one request, just admitted) past the held envelope; True when sent."""
        held = self.held
        if held is None or env.requests[0].priority >= held.requests[0].priority:
            return False
        return self.outbox.send_now(env)


async def run_input(
    admission: Channel[Envelope], router: Router, ledger: Ledger, microbatch: int | None
) -> None:
    """Between admission and the first stages: micro-batch splitting and input fan-out."""
    outbox = router.outbox
    try:
        while (env := await admission.next()) is not END:
            if microbatch is None:
                router.held = env
                try:
                    await outbox.send(env)
                finally:
                    router.held = None
                continue
            try:
                parts = split_rows(env.payload, microbatch)
            except Exception as exc:
                for req in env.requests:
                    ledger.fail(req, exc)
                continue
            for i, part in enumerate(parts):
                await outbox.send(Envelope(part, env.requests, (i, len(parts))))
    finally:
        outbox.sender_done()


async def run_collector(ctx: StageContext, port: int, ch: Channel[Envelope]) -> None:
    """One input port of a join: park each request's part until every port has delivered."""
    table: PartTable = ctx.join
    alive, count, work = ctx.ledger.alive, len(ctx.ports), ctx.inbox
    try:
        while (env := await ch.next()) is not END:
            for req in env.requests:
                if not alive(req):
                    continue
                parts = table.offer(req, port, count, env.payload)
                if parts is not None:
                    await work.send(Envelope(tuple(parts), [req], env.chunk))
    finally:
        work.sender_done()


class Sink:
    """Output ``port`` of the pipeline, in the place of a channel: an envelope sent to it ends
    its requests at once, in the sender's task (no queue, no task of its own, never full). It
    matches the outputs of several ports (``outputs``, when ``ports`` > 1) and the micro-batch
    chunks of each request (``chunks``) first. Its senders register as on a channel; when the
    last one is done, the sink counts itself out of ``done``, which closes when every sink has
    (the graph has drained)."""

    __slots__ = (
        "_closed",
        "_senders",
        "chunks",
        "direct",
        "done",
        "ledger",
        "name",
        "outputs",
        "port",
        "ports",
    )

    def __init__(
        self,
        ledger: Ledger,
        port: int,
        outputs: PartTable | None,
        ports: int,
        chunks: PartTable | None,
        done: Channel[None],
    ) -> None:
        self.ledger, self.port, self.outputs, self.ports = ledger, port, outputs, ports
        self.chunks, self.done = chunks, done
        self.name = f"output[{port}]"
        # The only output, nothing to join or put together: a streaming stage sending here
        # puts its parts straight into their stream (``StageContext.send_part``).
        self.direct = outputs is None and chunks is None
        self._senders = 0
        self._closed = False

    def send_nowait(self, env: Envelope) -> None:
        payload, parts, complete = env.payload, env.parts, self.ledger.complete
        if self.outputs is None and self.chunks is None:  # the common case: nothing to join,
            if parts is None:  # and complete() drops ended requests
                for req in env.requests:
                    complete(req, payload)
            else:  # a merged batch: each request its part
                for req, part in zip(env.requests, parts, strict=True):
                    complete(req, part)
            return
        for k, req in enumerate(env.requests):
            self._finish(req, payload if parts is None else parts[k], env.chunk)

    async def send(self, env: Envelope) -> None:
        self.send_nowait(env)

    def _finish(self, req: Request, result: Any, chunk: tuple[int, int] | None) -> None:
        ledger = self.ledger
        if not ledger.alive(req):
            return
        if self.outputs is not None:
            joined = self.outputs.offer(req, self.port, self.ports, result)
            if joined is None:
                return
            result = tuple(joined)
        if self.chunks is not None and chunk is not None:
            index, total = chunk
            pieces = self.chunks.offer(req, index, total, result)
            if pieces is None:
                return
            try:
                result = concat_rows(pieces)
            except Exception as exc:
                ledger.fail(req, exc)
                return
        ledger.complete(req, result)

    def has_room(self) -> bool:
        return not self._closed

    def takes(self, env: Envelope) -> bool:
        return not self._closed

    def add_senders(self, n: int) -> None:
        self._senders += n

    def sender_done(self) -> None:
        self._senders -= 1
        if self._senders <= 0 and not self._closed:
            self._closed = True
            self.done.sender_done()

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(self.name, 0, 0, 0, 0, 0, self._closed)
