"""Plain stages on their own threads, with calls queued ahead.

A worker that hands a thread one call and waits for its result leaves the thread idle for a
loop trip after every call: the result goes back to the loop, the worker wakes, sends it on,
takes the next item and hands it over, and the thread wakes again. That trip is short on an
idle loop and long on a busy one (and on Linux 6.6+ a woken loop may wait out a compute
thread's time slice: ~5 ms). Here a stage's threads share one queue of calls, and each worker
keeps ``AHEAD`` more calls queued there while its first runs (when the items are already
waiting), so a thread that finishes a call starts the next at once, and a queued call goes to
whichever thread is free first, never behind one slow call. A worker sends its outputs on in
the order it handed the calls over.

A worker holds at most ``AHEAD + 1`` items (counted in the pipeline's capacity). A queued
item's liveness was checked when it was handed over; a request cancelled while queued is
skipped by the thread when its call's future was cancelled, and a deadline that passes while it
waits ends the request by its timer. Service times are counted from when a call could start
(its hand-over, or the end of the worker's call before it), so the stage's estimates leave out
most of the wait behind other calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import CoroutineType
from typing import Any

from ...batching import Envelope
from ...channels import EMPTY, END
from ...executors import SKIPPED, ThreadWorker, returned_coroutine
from ..context import StageContext

__all__ = ["AHEAD", "run_ahead"]

AHEAD = 1  # calls queued on the thread behind the running one


async def run_ahead(ctx: StageContext, threads: ThreadWorker, join: bool) -> None:
    """Run one worker of a sync plain stage on the stage's threads until its inbox ends.
    ``join``: the payload is a join's tuple of parts, spread into the call."""
    inbox, ledger, probe, outbox = ctx.inbox, ctx.ledger, ctx.probe, ctx.outbox
    run, call = threads.run, ctx.call
    held: deque[tuple[Envelope, int, asyncio.Future[Any], float]] = deque()
    ended = False
    last_done = 0.0  # when the previous call's result came back
    try:
        while True:
            # Hand over what waits, up to AHEAD calls behind the first; wait for an item only
            # when nothing is held.
            while not ended and len(held) <= AHEAD:
                env = inbox.poll()
                if env is EMPTY:
                    if held:
                        break
                    env = await inbox.next()
                if env is END:
                    ended = True
                    break
                if not ledger.live(env, probe):
                    continue
                reqs = env.requests
                # One request: the thread skips the call if it ended (cancelled, out of time)
                # while the call waited.
                fut = run(
                    call,
                    env.payload if join else (env.payload,),
                    reqs[0].future if len(reqs) == 1 else None,
                )
                probe.active += 1
                held.append((env, len(reqs), fut, time.perf_counter()))
            if not held:
                return  # ended, and every call's output sent
            env, n, fut, handed = held[0]
            try:
                out = await fut
            except Exception as exc:
                out = _Failed(exc)
            held.popleft()
            probe.active -= 1
            done = time.perf_counter()
            took, last_done = done - max(handed, last_done), done
            if out is SKIPPED:
                ledger.live(env)  # drops (and counts) the request that ended
                continue
            if type(out) is _Failed:
                ctx.fail(env.requests, out.exc)
                continue
            probe.timed_call(took, n)
            if type(out) is CoroutineType:
                ctx.fail(env.requests, returned_coroutine(ctx.name, out))
                continue
            probe.items += n
            probe.batches += 1
            env.payload = out
            await outbox.send(env)  # no wait while there is room (a thread call costs far more)
    finally:
        for _, _, fut, _ in held:  # stopped early: the threads skip what they have not started
            fut.cancel()
        outbox.sender_done()


class _Failed:
    """A call's exception, held apart from results (a stage may return an exception)."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
