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
item's liveness was checked when it was handed over; a call whose requests all ended while it
waited (cancelled, or ended by their deadline's timer) is skipped by the thread, which answers
``SKIPPED`` (as before, a merged envelope with one request left is computed). Each call is
timed on the thread that runs it, so the stage's service times leave out the wait in the queue.
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
from ..context import StageContext, send_on

__all__ = ["AHEAD", "run_ahead"]

AHEAD = 1  # calls queued on the thread behind the running one


async def run_ahead(ctx: StageContext, threads: ThreadWorker, join: bool) -> None:
    """Run one worker of a sync plain stage on the stage's threads until its inbox ends.
    ``join``: the payload is a join's tuple of parts, spread into the call."""
    inbox, ledger, probe, outbox = ctx.inbox, ctx.ledger, ctx.probe, ctx.outbox
    run, call = threads.run, ctx.call
    held: deque[tuple[Envelope, int, asyncio.Future[Any]]] = deque()
    head = 0.0  # when the first held call started: it counts as running, the rest wait
    ended = False

    def held_above(priority: int) -> bool:  # a call this worker holds is more urgent
        return any(e.requests[0].priority < priority for e, _, _ in held)

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
                # The thread skips the call if its requests ended (cancelled, out of time)
                # while it waited.
                args = env.payload if join else (env.payload,)
                fut = run(_clocked, (call, args), reqs[0].future if len(reqs) == 1 else _All(reqs))
                if not held:
                    head = time.perf_counter()
                    probe.begin(head)
                held.append((env, len(reqs), fut))
            if not held:
                return  # ended, and every call's output sent
            env, n, fut = held.popleft()
            try:
                done = await fut  # (output, seconds) from ``_clocked``, or SKIPPED
            except Exception as exc:
                done = exc
            probe.end(head)
            if held:  # the next call starts as this one ends (its thread takes it at once)
                head = time.perf_counter()
                probe.begin(head)
            if isinstance(done, Exception):
                ctx.fail(env.requests, done)
                continue
            if done is SKIPPED:
                ledger.live(env)  # drops (and counts) the request that ended
                continue
            out, took = done
            probe.timed_call(took, n)
            if type(out) is CoroutineType:
                ctx.fail(env.requests, returned_coroutine(ctx.name, out))
                continue
            probe.items += n
            probe.batches += 1
            env.payload = out
            # No wait while there is room (a thread call costs far more).
            await send_on(ctx, env, held_above)
    finally:
        for _, _, fut in held:  # stopped early: the threads skip what they have not started
            fut.cancel()
        outbox.sender_done()


class _All:
    """``done()`` once every request of a merged envelope has ended (read by the thread)."""

    __slots__ = ("reqs",)

    def __init__(self, reqs: list[Any]) -> None:
        self.reqs = reqs

    def done(self) -> bool:
        return all(r.future.done() for r in self.reqs)


def _clocked(call: Any, args: tuple[Any, ...]) -> tuple[Any, float]:
    """``call(*args)`` and the seconds it took, timed on the thread that ran it."""
    t0 = time.perf_counter()
    out = call(*args)
    return out, time.perf_counter() - t0
