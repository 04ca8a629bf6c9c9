"""Batching stages (``batch=Batching(...)``): a former, and per worker a runner and a completer.

The former files arrivals into a clock-free :class:`~asyncnn.batcher.Batcher` and releases a
batch (full, delay, or drain) only when a runner is free, so batches grow under load. A runner
collates, calls, checks rows and splits on the stage's executor; when a merged batch raises it
bisects until the failing request is alone. Outputs go through the placed stages' completer.
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
from ...batching import Batching, Envelope
from ...batchrun import collate, finish, run_batch
from ...channels import EMPTY, END, Channel
from ...devices import Completion, Device, open_device
from ...errors import WorkerLost
from ...executors import ThreadWorker
from ...pacing import Pacer
from ...padding import pad_signature, padded_length, request_length
from ...payload import RowMismatch, batch_key, concat_rows, count_rows, split_rows
from ..context import StageContext
from ..probe import StageProbe
from .placed import Launched

__all__ = ["Paced", "batch_call", "file_request", "run_former", "run_runner"]

_NEVER_RERUN = (RowMismatch, WorkerLost)

# items -> (merged output, rows per item, each item's part, completion or None)
BatchCall = Callable[[list[Item]], Awaitable[tuple[Any, list[int], list[Any], Any]]]


def _key(spec: Batching, payload: Any) -> tuple[Any, int, int | None]:
    """(what must match to share a batch, rows, length along pad_dim) of one request."""
    if spec.collate is not None:
        return None, 1, None  # hooks: any payload, one row per request
    if spec.pad is None:
        key, rows = batch_key(payload)  # signature first: its message says what a stage takes
        return key, rows, None
    length = request_length(spec, payload)
    return (pad_signature(spec, payload), spec.bucket(length)), count_rows(payload), length


def file_request(ctx: StageContext, batcher: Batcher, env: Envelope, now: float) -> None:
    """Put an arriving envelope's requests into the batcher (or fail the unbatchable)."""
    spec = ctx.stage.batch
    assert spec is not None
    try:
        key, total, length = _key(spec, env.payload)
    except (TypeError, ValueError) as exc:
        ctx.fail(env.requests, exc, f"cannot batch this request: {exc}")
        return
    if total == 0:
        ctx.fail(env.requests, ValueError("0 rows"), "got a request with 0 rows (dim 0 is 0)")
        return
    alive, probe = ctx.ledger.alive, ctx.probe
    paced = batcher.pacer is not None
    if paced:
        batcher.pacer.arrivals.add(now, total)
    need = None  # a call of one request
    if env.rows is None:
        req = env.requests[0]
        if paced:
            need = _paced_need(ctx, batcher, total, req.priority)
        if alive(req, probe, need):
            batcher.add(Item(req, env.payload, 0, total, now, length), key)
        return
    start = 0
    for req, n in zip(env.requests, env.rows, strict=True):
        if paced:
            need = _paced_need(ctx, batcher, n, req.priority)
        if alive(req, probe, need):
            batcher.add(Item(req, env.payload, start, start + n, now, length), key)
        start += n


def _paced_need(ctx: StageContext, batcher: Batcher, rows: int, priority: int) -> float:
    """The time a request of ``rows`` rows must have left to be filed into a paced stage's
    batch. Paced, it is filed when a runner is free, into the batch about to form: it needs
    time for that batch's call, not a call of its own, and that batch takes what waits behind
    it too (a row each at least). A call's time spreads around its estimate (the tracked
    ``service.slow``: 1.2-1.3x on a loaded 2-core VM), so one filed on the mean misses in
    flight about half the time, its row spent. When a request of its own class (or a more
    urgent one) waits that this batch has no room for, that one takes the row instead: the
    request must have time for a slow call. When none does, its row would go unused or to a
    less urgent class: the mean will do."""
    spec, inbox, probe = batcher.spec, ctx.inbox, ctx.probe
    filed = batcher.pending_rows + rows
    batch = min(spec.max_size, filed + len(inbox))
    spare = filed + inbox.waiting_upto(priority) > spec.max_size
    return probe.need(batch, max(1.0, probe.service.slow) if spare else 1.0)


class Paced:
    """The state of a ``max_delay="auto"`` former, shared with the stage's runners: a runner
    about to wait for work makes the decision the former would make once woken (file what
    waits, ask the pacer, release), at once, instead of a loop trip later for the former and
    another for itself."""

    __slots__ = ("batcher", "batches", "closed", "ctx", "now")

    def __init__(
        self, ctx: StageContext, batches: Channel[Batch], now: Callable[[], float] | None = None
    ) -> None:
        spec = ctx.stage.batch
        assert spec is not None
        pacer = Pacer(spec.max_size, ctx.workers, spec.target_latency, ctx.probe.service)
        self.ctx, self.batches, self.batcher = ctx, batches, Batcher(spec, pacer)
        self.now = now or asyncio.get_running_loop().time
        self.closed = False  # the input has ended

    def form(self, idle: bool) -> bool:
        """File what waits (when a runner is idle) and hand the batch due now (if any) to the
        runners' slot; True when one went."""
        if idle and not self.closed:
            self.closed = _pull(self.ctx, self.batcher, self.now)
        if not self.batches.has_room():
            return False
        return _release(self.ctx.probe, self.batcher, self.batches, self.now(), self.closed, idle)


async def run_former(
    ctx: StageContext,
    batches: Channel[Batch],
    clock: Callable[[], float] | None = None,
    paced: Paced | None = None,
) -> None:
    """Form batches: pull arrivals, release on size, delay or drain, when the slot before the
    runners is free (``max_delay="auto"``: see ``_run_paced``; ``paced``: its state, shared
    with the runners)."""
    spec = ctx.stage.batch
    assert spec is not None
    inbox, probe = ctx.inbox, ctx.probe
    now = clock or asyncio.get_running_loop().time
    if spec.auto:
        try:
            await _run_paced(ctx, batches, paced or Paced(ctx, batches, now))
        finally:
            batches.close()
        return
    batcher = Batcher(spec)
    closed = False
    try:
        while True:
            closed = _pull(ctx, batcher, now) or closed
            if not batches.has_room():
                await batches.wait_room()  # every runner is busy: arrivals wait in the inbox
                continue
            if _release(probe, batcher, batches, now(), closed, idle=True):
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


def _pull(ctx: StageContext, batcher: Batcher, now: Callable[[], float]) -> bool:
    """File what waits in the inbox, up to a full batch; True once the input has ended."""
    spec, inbox = batcher.spec, ctx.inbox
    while batcher.pending_rows < spec.max_size:
        env = inbox.poll()
        if env is EMPTY:
            return False
        if env is END:
            return True
        file_request(ctx, batcher, env, now())
    return False


async def _run_paced(ctx: StageContext, batches: Channel[Batch], paced: Paced) -> None:
    """``max_delay="auto"``: while every runner is busy, arrivals wait in the inbox (a ranked
    queue once requests are urgent), so that the batch formed when a runner is free holds the
    most urgent requests of that moment; then the pacer decides whether to wait for more. A
    runner about to wait forms its batch itself (``Paced.form``) or, when the pacer says wait,
    nudges the inbox; the former decides on arrivals, nudges and the pacer's next look."""
    inbox, batcher = ctx.inbox, paced.batcher
    while True:
        idle = batches.receivers_waiting()
        if paced.form(idle):
            continue
        if not batches.has_room():  # form() filed what waits, and had no slot to release into
            await batches.wait_room()
            continue
        if paced.closed:
            return  # drained: pop(draining=True) left nothing behind
        recheck = batcher.next_deadline() if idle else None
        with anyio.move_on_after(math.inf if recheck is None else max(0.0, recheck - paced.now())):
            # Busy: only a runner going idle (its nudge) matters. Idle and waiting for more
            # rows: an arrival, a nudge or the pacer's next look.
            await inbox.wake_up(always=not idle)


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


def _release(
    probe: StageProbe,
    batcher: Batcher,
    batches: Channel[Batch],
    now: float,
    draining: bool,
    idle: bool,
) -> bool:
    """Hand the batch due now (if any) to the runners' slot, counted; True when one went."""
    batch = batcher.pop(now, draining=draining, idle=idle)
    if batch is None:
        return False
    _dispatch(probe, batcher, batch, now)
    batches.send_nowait(batch)
    return True


def _dispatch(probe: StageProbe, batcher: Batcher, batch: Batch, now: float) -> None:
    """Count a released batch: why, its requests' slack, and whether a more urgent request
    stays behind (in another bucket: it could not share this batch)."""
    probe.formed(batch.rows, batch.reason)
    if not batcher.ranked:
        return
    worst = 0
    for item in batch.items:
        req = item.request
        if req.deadline is not None:
            probe.slack.add(max(0.0, req.deadline - now))
        worst = max(worst, req.priority)
    if batcher.most_urgent() < worst:
        probe.inversions += 1


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
    probe.active += 1
    try:
        out, rows, parts, done = await call(items)
    except Exception as exc:
        probe.active -= 1
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
    await launched.send(Launched(env, out, Completion(None) if done is None else done, t0, traced))
