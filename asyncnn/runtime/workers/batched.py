"""Batching stages (``batch=Batching(...)``): a former, and per worker a runner and a completer.

The former files arrivals into a clock-free :class:`~asyncnn.batcher.Batcher` and releases a
batch (full, delay, or drain) only when a runner is free, so batches grow under load. A runner
collates, calls, checks rows and splits on the stage's executor; when a merged batch raises it
bisects until the failing request is alone. Outputs go through the placed stages' completer.
How arrivals are filed and batches released is ``filing``'s; ``max_delay="auto"``'s former is
``paced``'s.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ...batcher import Batch, Batcher, Item
from ...batching import Envelope
from ...batchrun import collate, finish, run_batch
from ...channels import END, Channel
from ...devices import Completion, Device, open_device
from ...errors import WorkerLost
from ...executors import ThreadWorker
from ...padding import padded_length
from ...payload import RowMismatch, concat_rows, split_rows
from ..context import StageContext
from ..probe import StageProbe
from .filing import file_request, pull, release
from .paced import Paced, run_paced
from .placed import Launched, hand_on_now

__all__ = ["batch_call", "run_former", "run_runner"]

_NEVER_RERUN = (RowMismatch, WorkerLost)

# items -> (merged output, rows per item, each item's part, completion or None)
BatchCall = Callable[[list[Item]], Awaitable[tuple[Any, list[int], list[Any], Any]]]


async def run_former(
    ctx: StageContext,
    batches: Channel[Batch],
    clock: Callable[[], float] | None = None,
    paced: Paced | None = None,
) -> None:
    """Form batches: pull arrivals, release on size, delay or drain, when the slot before the
    runners is free (``max_delay="auto"``: see ``paced.run_paced``; ``paced``: its state, shared
    with the runners)."""
    spec = ctx.stage.batch
    assert spec is not None
    inbox, probe = ctx.inbox, ctx.probe
    now = clock or asyncio.get_running_loop().time
    if spec.auto:
        try:
            await run_paced(ctx, batches, paced or Paced(ctx, batches, now))
        finally:
            batches.close()
        return
    batcher = ctx.held = Batcher(spec, need=functools.partial(_slow_call, probe))
    closed = False
    try:
        while True:
            closed = pull(ctx, batcher, now) or closed
            if not batches.has_room():
                await batches.wait_room()  # every runner is busy: arrivals wait in the inbox
                continue
            if release(probe, batcher, batches, now(), closed, idle=True):
                continue
            if closed:
                return  # drained: pop(draining=True) left nothing behind
            deadline = batcher.next_deadline()
            with anyio.move_on_after(math.inf if deadline is None else max(0.0, deadline - now())):
                env = await inbox.next()
                if env is END:
                    closed = True
                else:
                    file_request(ctx, batcher, env, now())
    finally:
        batches.close()


def _slow_call(probe: StageProbe, rows: float) -> float | None:
    """Seconds a call of ``rows`` takes at its slow end (9 calls in 10 take less); None until
    the stage's calls are measured."""
    service = probe.service
    return probe.need(rows, max(1.0, service.slow)) if service.ready else None


def _open_batch(ctx: StageContext, items: list[Item], reason: str, box: list[Any] | None) -> Any:
    """The batch's span, linked to its requests (size, why released, device, padding waste);
    the stage's function runs in its context (``box``)."""
    spec = ctx.stage.batch
    assert spec is not None
    rows = sum(i.rows for i in items)
    attrs: dict[str, Any] = {"asyncnn.batch.rows": rows}
    if ctx.device is not None:
        attrs["asyncnn.device"] = str(ctx.device)
    if spec.pad is not None:
        lengths = [i.length or 0 for i in items]
        padded = spec.padded(max(lengths)) * rows
        real = sum(i.rows * n for i, n in zip(items, lengths, strict=True))
        attrs["asyncnn.batch.padding_waste"] = 1.0 - real / padded if padded else 0.0
    span = ctx.tracing.open_batch(ctx.name, [i.request for i in items], reason, **attrs)
    if box is not None:
        box[0] = ctx.tracing.context_of(span)
    return span


def batch_call(
    ctx: StageContext,
    worker: ThreadWorker | None,
    device: Device | None,
    box: list[Any] | None = None,
) -> BatchCall:
    """How this stage runs one batch, chosen once per worker. ``box``: while tracing, the
    context the stage's function runs in (the batch span's, set by the runner per call)."""
    spec = ctx.stage.batch
    assert spec is not None
    name, call = ctx.name, ctx.call
    if ctx.join is not None:  # a batching join gets its merged parts as one tuple
        joined = call
        call = lambda parts: joined(*parts)  # noqa: E731
    if box is not None and ctx.stage.runs_on != "ray":
        call = ctx.tracing.boxed(call, box, ctx.stage.runs_on == "loop")
    launch = None if device is None else functools.partial(_launch_on, device, ctx.to_host)

    def ranges(items: list[Item]) -> list[tuple[Any, int, int]]:
        return [(i.source, i.start, i.stop) for i in items]

    if worker is not None:
        run = worker.run
        return lambda items: run(run_batch, (name, call, ranges(items), spec, launch))

    async def remote(items: list[Item]) -> tuple[Any, list[int], list[Any], Any]:
        # One remote call per batch; collated on the replica, split here. While tracing, the
        # batch span's context crosses as a W3C carrier.
        if box is None:
            result = await ctx.pool.call("run_batch", ranges(items), spec)
        else:
            carrier = ctx.tracing.carrier(box[0])
            result = await ctx.pool.call("run_batch_traced", carrier, ranges(items), spec)
        rows = [i.rows for i in items]
        lengths = None if spec.pad is None else [i.length or 0 for i in items]
        target = 0 if lengths is None else padded_length(spec, lengths)
        return (*finish(name, result, rows, spec, lengths, target), None)

    async def on_loop(items: list[Item]) -> tuple[Any, list[int], list[Any], Any]:
        payload, rows, lengths, target = collate(ranges(items), spec)
        if spec.collate is not None or sum(rows) <= spec.max_size:
            result = await call(payload)
        else:
            result = concat_rows([await call(p) for p in split_rows(payload, spec.max_size)])
        return (*finish(name, result, rows, spec, lengths, target), None)

    async def inline(items: list[Item]) -> tuple[Any, list[int], list[Any], Any]:
        return run_batch(name, call, ranges(items), spec)

    runs_on = ctx.stage.runs_on
    return remote if runs_on == "ray" else on_loop if runs_on == "loop" else inline


def _launch_on(
    device: Device, to_host: bool, call: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[Any, Completion]:
    return device.launch(call, args, to_host)


async def run_runner(
    ctx: StageContext,
    worker: ThreadWorker | None,
    batches: Channel[Batch],
    launched: Channel[Launched],
    paced: Paced | None = None,
) -> None:
    """Run formed batches on the stage's executor; hand each output to the completer.
    ``paced``: a ``max_delay="auto"`` former's state: the runner forms its own next batch."""
    probe, alive, spec = ctx.probe, ctx.ledger.alive, ctx.stage.batch
    assert spec is not None
    try:
        device = None
        if ctx.device is not None:
            assert worker is not None
            device = await worker.run(open_device, (ctx.device, ctx.stage.fn))
        # While tracing, the function runs in its batch span's context.
        box = [None] if ctx.tracing is not None else None
        call = batch_call(ctx, worker, device, box)
        nudge = ctx.inbox.nudge if spec.auto else None
        while True:
            if nudge is not None and not len(batches):
                # The pacer releases on an idle runner: decide now, or wake the former to.
                if paced is None or not paced.form(idle=True):
                    nudge()
            batch = await batches.next()
            if batch is END:
                break
            # Cancelled, or out of time while waiting: not computed. No other request can take
            # a dropped one's row now, so only one that even a fast call would leave late goes.
            need = probe.need(batch.rows, min(1.0, probe.service.fast))
            items = [i for i in batch.items if alive(i.request, probe, need)]
            if items:
                probe.batches += 1
                probe.rows += sum(i.rows for i in items)
                if spec.pad is not None:
                    probe.count_tokens(items, spec)
                await _run_items(ctx, call, items, launched, reason=batch.reason, box=box)
    finally:
        launched.close()


async def _run_items(
    ctx: StageContext,
    call: BatchCall,
    items: list[Item],
    launched: Channel[Launched],
    budget: list[int] | None = None,
    reason: str = "retry",
    box: list[Any] | None = None,
) -> None:
    """Run ``items`` as one call; when it raises, bisect (within ``budget``: re-runs left for
    this batch, from ``max_retries``) so that only the failing requests fail."""
    spec, probe = ctx.stage.batch, ctx.probe
    assert spec is not None
    if budget is None:
        budget = [spec.max_retries if spec.max_retries is not None else -1]
    span = None if ctx.tracing is None else _open_batch(ctx, items, reason, box)
    t0 = time.perf_counter()
    probe.begin(t0)
    try:
        out, rows, parts, done = await call(items)
    except Exception as exc:
        probe.end(t0)
        if span is not None:
            ctx.tracing.close_batch(span, ctx.name, [], time.perf_counter() - t0, exc)
        if len(items) > 1 and spec.isolate_failures and not isinstance(exc, _NEVER_RERUN):
            # Bisect: rerun each half until the failing request is alone. A RowMismatch is the
            # stage itself being wrong: no retry helps. A lost worker's call may have run: it
            # must not run twice.
            if budget[0] == 0:
                probe.retries_exhausted += 1  # the rest of this part fails as a whole
            else:
                mid = len(items) // 2
                for half in (items[:mid], items[mid:]):
                    live = [i for i in half if ctx.ledger.alive(i.request)]
                    if live and budget[0] != 0:
                        budget[0] -= 1
                        probe.retries += 1
                        await _run_items(ctx, call, live, launched, budget, box=box)
                    elif live:
                        probe.retries_exhausted += 1
                        ctx.fail([i.request for i in live], exc)
                return
        ctx.fail([i.request for i in items], exc)
        return
    probe.items += len(items)
    env = Envelope(out, [i.request for i in items], None, rows, parts)
    traced = None
    if span is not None:
        # The batch span ends when the batch is done: now, or (on a device) at its completion.
        traced = functools.partial(ctx.tracing.close_batch, span, ctx.name, env.requests)
        if done is None:
            traced(time.perf_counter() - t0)
            traced = None
    job = Launched(env, out, Completion(None) if done is None else done, t0, traced)
    if not hand_on_now(ctx, launched, job):
        await launched.send(job)
