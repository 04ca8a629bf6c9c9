"""Placed stages (``device=``): hand each call to the device, complete it in launch order.

Two tasks per worker, joined by a bounded ``launched`` channel of at most ``max_inflight`` calls:
the launcher puts work on the device's streams without waiting for it; the completer awaits each
call's completion (a CUDA event, waited on a waiter thread: the loop never synchronises) and
passes the output on. A call counts as running (``probe.active``) from launch to completion.
Batching stages reuse the completer.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

from ...batching import Envelope
from ...channels import END, Channel
from ...devices import Completion, Device, open_device
from ...executors import ThreadWorker
from ..context import StageContext, next_live

__all__ = ["Launched", "hand_on_now", "launched_channel", "run_complete", "run_launch", "settle"]


class Launched(NamedTuple):
    """A call handed to a device (or a remote replica) and not yet completed."""

    env: Envelope
    out: Any
    done: Completion
    started: float
    traced: Any = None  # while tracing: called with the call's seconds when it completes


def launched_channel(ctx: StageContext, w: int) -> Channel[Launched]:
    return Channel(ctx.stage.max_inflight, f"{ctx.name}:{w}:inflight")


async def run_launch(ctx: StageContext, worker: ThreadWorker, launched: Channel[Launched]) -> None:
    """Part one: open the device on the stage's thread, then launch each envelope's call."""
    assert ctx.device is not None
    probe, join, to_host, call = ctx.probe, ctx.join is not None, ctx.to_host, ctx.call
    tracing = ctx.tracing
    try:
        device: Device = await worker.run(open_device, (ctx.device, ctx.stage.fn))
        while (env := await next_live(ctx)) is not END:
            args = env.payload if join else (env.payload,)
            traced, run = None, call
            if tracing is not None:  # the stage spans are open while the call runs
                spans = tracing.open(ctx.name, env.requests)
                traced = functools.partial(
                    tracing.close, spans, **{"asyncnn.device": str(ctx.device)}
                )
                if spans:
                    run = tracing.within(tracing.context_of(spans[0][1]), call)
            t0 = time.perf_counter()
            probe.begin(t0)
            try:
                out, done = await worker.run(device.launch, (run, args, to_host))
            except Exception as exc:
                probe.end(t0)
                if traced is not None:
                    traced(time.perf_counter() - t0)
                ctx.fail(env.requests, exc)
                continue
            # At most max_inflight on the device's streams.
            await launched.send(Launched(env, out, done, t0, traced))
    finally:
        launched.close()


async def run_complete(
    ctx: StageContext, waiter: ThreadWorker | None, launched: Channel[Launched], counts: bool
) -> None:
    """Part two: await each call's completion in launch order, then send its output on.

    ``counts``: count items and calls here (a batching stage counts when it runs instead)."""
    probe = ctx.probe
    try:
        while (job := await launched.next()) is not END:
            env, _, done, t0, traced = job
            if not done.done:  # a non-blocking query; the blocking wait is the waiter's
                assert waiter is not None
                try:
                    await waiter.run(done.wait, ())
                except Exception as exc:  # an asynchronous CUDA error surfaces here
                    probe.end(t0)
                    if traced is not None:
                        traced(time.perf_counter() - t0)
                    ctx.fail(env.requests, exc)
                    continue
            await ctx.outbox.send(settle(ctx, job, counts))
    finally:
        ctx.outbox.sender_done()


def settle(ctx: StageContext, job: Launched, counts: bool) -> Envelope:
    """A call whose completion is done: released, timed and counted; its envelope, holding the
    output, to send on."""
    env, out, done, t0, traced = job
    probe = ctx.probe
    done.release()
    probe.end(t0)
    # From launch to completion: on a device, calls in flight overlap, so busy time can
    # exceed wall time per worker (a busy fraction above 1 means overlap).
    took = time.perf_counter() - t0
    probe.timed_call(took, len(env.requests))
    if traced is not None:
        traced(took)
    if counts:
        probe.items += len(env.requests)
        probe.batches += 1
    env.payload = out
    return env


def hand_on_now(ctx: StageContext, launched: Channel[Launched], job: Launched) -> bool:
    """Send a finished call's output on at once, as the completer would, when nothing can
    order it behind (the completer waits with nothing in hand) and its one consumer takes it
    without waiting (a sink, a batching stage with room; a channel with a slot for each
    request of a batch split for it); True when it went.

    Through the completer, a CPU batch's requests ended a loop trip after their runner had
    formed and started its next batch: under overload that pull files a hundred requests,
    and every caller waited 1-2.5 ms more for an answer already computed."""
    single = ctx.outbox.single
    if single is None or not job.done.done or len(launched) or not launched.receivers_waiting():
        return False
    parts = job.env.parts
    if parts is not None and not ctx.outbox.merged[0]:
        # Split into one envelope per request (a join's port, a stage that does not batch):
        # when its channel has a slot for each, all of them at once.
        if type(single) is not Channel or single.room() < len(parts):
            return False
        single.extend_nowait(settle(ctx, job, False).split())
        return True
    if not single.has_room():
        return False
    single.send_nowait(settle(ctx, job, False))
    return True
