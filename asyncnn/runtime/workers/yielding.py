"""Generator stages: each input runs a generator whose outputs go on as parts of its request.

A reader task takes envelopes from the inbox and starts one driver task per request; at most
``workers`` drivers run their generator at once (a semaphore), and a driver waiting for its
reader to take a part (no credit) gives its place up, so a slow reader pauses only its own
request. A driver asks its generator for one part at a time: on the loop for an async generator,
on the stage's threads for a sync one (so its ``finally`` runs there too). Each part enters the
ledger as a request of its own (``streams.PartStream`` puts them back in order at the caller),
and is sent on; the driver stops at the generator's end, at its error (the request fails after
the parts before it), or when the request ended early (cancelled, failed downstream): then the
generator is closed and the parts still in flight are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from ...batching import Request
from ...channels import END
from ...errors import describe
from ...executors import ThreadWorker
from ...streams import PartStream
from ..context import StageContext, next_live
from ..supervisor import Supervisor

log = logging.getLogger("asyncnn")

__all__ = ["run_yielding"]

_DONE: Any = object()  # a generator's end, as a value that crosses threads


async def run_yielding(ctx: StageContext, sup: Supervisor, worker: ThreadWorker | None) -> None:
    """The stage's reader: one driver per request, ``ctx.workers`` generating at once."""
    slots = asyncio.Semaphore(ctx.workers)
    try:
        while (env := await next_live(ctx)) is not END:
            for one in env.split():  # one request per envelope (a merged batch is split)
                (req,) = one.requests
                await slots.acquire()  # waiting for input holds none: a paused driver resumes
                ctx.outbox.open(1)  # the driver sends; registered before this task can finish
                sup.spawn(f"{ctx.name}:gen{req.id}", _drive, ctx, req, one.payload, slots, worker)
    finally:
        ctx.outbox.sender_done()


async def _drive(
    ctx: StageContext,
    req: Request,
    payload: Any,
    slots: asyncio.Semaphore,
    worker: ThreadWorker | None,
) -> None:
    """Run one request's generator to its end (or the request's), holding a slot while it
    computes."""
    stream = ctx.start_stream(req)
    span = _GenSpan(ctx, req, stream, worker is None)
    step, close = _stepper(ctx, payload, worker, span.context)
    holding, forced = True, False
    try:
        while not req.future.done():
            if not stream.has_credit():
                slots.release()
                holding = False
                await stream.wait_credit()  # until the reader takes a part, or leaves
                await slots.acquire()
                holding = True
                continue
            try:
                part = await step()
            except Exception as exc:
                span.end()
                ctx.part_failed(stream, exc)
                return
            if part is _DONE:
                span.end()  # before the request can end
                stream.end()
                return
            if req.future.done():  # ended while the generator computed: drop the part
                return
            ctx.probe.batches += 1
            await ctx.send_part(stream, part)
    except anyio.get_cancelled_exc_class():
        forced = True  # a forced stop: nothing more may be awaited here
        raise
    finally:
        if req.future.done() and not stream.complete:
            ctx.ledger.abandon(req)
        if not forced:  # (after a forced stop the generator is closed when it is collected)
            await close()
        span.end()
        span.detach()
        if holding:
            slots.release()
        ctx.outbox.sender_done()


class _GenSpan:
    """While tracing: one request's stage span at a generator stage, from its arrival to its
    generator's end, with the parts it made; its context is current while the generator runs
    (attached to the driver's task for an async generator, which runs in that task)."""

    __slots__ = ("context", "spans", "started", "stream", "token", "tracing")

    def __init__(self, ctx: StageContext, req: Request, stream: PartStream, in_task: bool) -> None:
        self.tracing, self.stream, self.context, self.token = ctx.tracing, stream, None, None
        self.spans = [] if ctx.tracing is None else ctx.tracing.open(ctx.name, [req])
        if self.spans:
            self.context = ctx.tracing.context_of(self.spans[0][1])
            if in_task:
                self.token = ctx.tracing.attach(self.context)
        self.started = time.perf_counter()

    def end(self) -> None:
        if self.spans:
            took = time.perf_counter() - self.started
            self.tracing.close(self.spans, took, **{"asyncnn.parts": self.stream.produced})
            self.spans = []

    def detach(self) -> None:
        if self.token is not None:
            self.tracing.detach(self.token)
            self.token = None


def _stepper(
    ctx: StageContext, payload: Any, worker: ThreadWorker | None, context: Any = None
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``step()``: the generator's next output (``_DONE`` at its end); ``close()``: close it,
    where it runs. The generator is created by the first step (on its thread for a sync one).
    ``context``: while tracing, the stage span's, current on the thread while a sync
    generator runs (an async one runs in the driver's task, which attached it)."""
    fn = ctx.stage.fn
    args = tuple(payload) if ctx.join is not None else (payload,)  # a join spreads its parts
    if worker is None:
        agen = fn(*args)

        async def step_async() -> Any:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return _DONE

        async def close_async() -> None:
            try:
                await agen.aclose()
            except Exception as exc:  # the request already ended: say so, end nothing else
                _close_failed(ctx.name, exc)

        return step_async, close_async

    inference = ctx.stage.inference_mode
    gen: list[Any] = []

    def advance() -> Any:
        if not gen:
            gen.append(fn(*args))
        try:
            if inference:
                import torch

                with torch.inference_mode():
                    return next(gen[0])
            return next(gen[0])
        except StopIteration:
            return _DONE

    def close_here() -> None:
        if gen:
            gen[0].close()

    if context is not None:
        advance = ctx.tracing.within(context, advance)
        close_here = ctx.tracing.within(context, close_here)

    async def close_there() -> None:
        if gen:
            try:
                await worker.run(close_here, ())
            except Exception as exc:  # the request already ended: say so, end nothing else
                _close_failed(ctx.name, exc)

    return (lambda: worker.run(advance, ())), close_there


def _close_failed(stage: str, exc: Exception) -> None:
    log.warning(
        "stage %r: closing a generator raised %s (its request had already ended; a generator "
        "must let GeneratorExit end it: no yield or raise in its clean-up)",
        stage,
        describe(exc),
    )
