"""Plain stages: one call per envelope, on the loop, inline, on the stage's threads, or on Ray.

The hot path of the runtime: one receive, one liveness check, one call and one send per item;
the receive and the send inline their channel's common case (no method call per item: a hop
of a chain of cheap stages costs ~25% less; see ``channels``).
The executor was chosen once, as ``invoke``; loop and inline stages time one call in
``LOOP_SAMPLE`` (timing costs more than such a call), the others every call.
"""

from __future__ import annotations

import time
from types import CoroutineType
from typing import Any

from anyio import WouldBlock

from ...batching import Envelope
from ...channels import EMPTY, END, Channel
from ...executors import Invoke, returned_coroutine
from ..context import StageContext, send_on

__all__ = ["run_plain"]


async def run_plain(
    ctx: StageContext, invoke: Invoke, sample: int, sync: bool, carries: bool = False
) -> None:
    """Run one worker of a plain stage until its inbox ends.

    ``sample``: calls between timed calls (0: time every call); ``sync``: the function is sync
    (a coroutine it returns is a mistake, reported as such); ``carries``: ``invoke`` takes a
    ``tracing.Carried`` payload (the stage span's context for the call).
    """
    inbox, outbox, ledger, probe = ctx.inbox, ctx.outbox, ctx.ledger, ctx.probe
    poll, wait_next, live = inbox.poll, inbox.next, ledger.live
    single = outbox.single
    chan = single if type(single) is Channel else None
    tracing = ctx.tracing
    if tracing is not None:
        sample = 0  # every call timed: each request's stage span needs its call's time
    tick = 0
    try:
        while True:
            # ``inbox.poll()`` inlined for its common case (an item buffered, nobody to let in
            # behind it; ``_buf`` is read each time: ``rank()`` replaces it).
            buf = inbox._buf
            if buf and not inbox._overflow and not inbox._putters:
                env = buf.popleft()
            else:
                env = poll()
                if env is EMPTY:
                    env = await wait_next()
                if env is END:
                    return
            reqs = env.requests
            # Inlined for the common case (one live request, no deadline); ledger.live does
            # the rest.
            n = len(reqs)
            if n != 1 or reqs[0].future.done() or reqs[0].deadline is not None:
                if not live(env, probe):
                    continue
                n = len(env.requests)
            tick -= 1
            try:
                if tick >= 0 and probe.observe is None:
                    out = await invoke(env.payload)
                else:
                    tick = sample
                    out = await _timed(ctx, invoke, env, n, carries)
                if sync and type(out) is CoroutineType:
                    raise returned_coroutine(ctx.name, out)
            except Exception as exc:
                ctx.fail(env.requests, exc)
                continue
            probe.items += n
            probe.batches += 1
            env.payload = out
            # ``chan.send_nowait(env)`` inlined for its common case: below its peak depth (so
            # below capacity: no new peak, and no overflow, which waits only behind a full
            # buffer), no receiver to wake, open.
            if (
                chan is not None
                and len(chan._buf) < chan._peak
                and not chan._getters
                and not chan._watchers
            ):
                if not chan._closed:
                    chan._buf.append(env)
                    continue
            if single is not None:
                try:
                    single.send_nowait(env)
                    continue
                except WouldBlock:
                    pass
            await send_on(ctx, env)
    finally:
        outbox.sender_done()


async def _timed(ctx: StageContext, invoke: Invoke, env: Envelope, n: int, carries: bool) -> Any:
    """One call, timed (and traced: the stage spans are open while it runs)."""
    probe, tracing, now = ctx.probe, ctx.tracing, time.perf_counter
    spans = None if tracing is None else tracing.open(ctx.name, env.requests)
    t0 = now()
    probe.begin(t0)
    try:
        if spans is not None and carries:
            out = await invoke(tracing.carry(spans, env.payload))
        else:
            out = await invoke(env.payload)
    except BaseException:
        probe.end(t0)
        if spans is not None:
            tracing.close(spans, now() - t0)
        raise
    probe.end(t0)
    took = now() - t0
    probe.timed_call(took, n)
    if spans is not None:
        tracing.close(spans, took)
    return out
