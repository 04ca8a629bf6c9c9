"""Step stages: one batched model step at a time over every request that is generating.

Between steps the worker takes what arrived (without waiting while anything is active), lets the
``Stepper`` decide who leaves and who joins, runs the model's batched ``admit`` for the newcomers
and one batched ``step`` for the group the ``Stepper`` picks, and sends each output on as a part
of its request. A call that raises is re-run on halves until the request that fails it is alone:
only that one fails. The model's calls run in order on the stage's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from ...batching import Request
from ...channels import EMPTY, END
from ...executors import ThreadWorker
from ..context import StageContext
from ..stepper import Slot, Stepper

__all__ = ["run_stepped"]


async def run_stepped(ctx: StageContext, worker: ThreadWorker) -> None:
    """Run the step stage until its input has ended and every request has finished."""
    stepper = Stepper(ctx.stage.step)  # type: ignore[arg-type]  # a Stepping once validated
    ctx.probe.stepping = stepper.counters
    call = _Model(ctx, worker)
    ended = False
    try:
        while True:
            ended = _arrivals(ctx, stepper, ended, call)
            if stepper.idle:
                if ended:
                    return
                await ctx.inbox.ready()  # nothing to step: wait for a request
                continue
            await _leave(ctx, stepper, call)
            joined = stepper.join()
            if joined:
                await _admit(ctx, stepper, call, joined)
            group = stepper.group(ready=lambda s: s.req.stream.has_credit())
            if group:
                await _step(ctx, stepper, call, group)
            elif stepper.active:
                await _wait_credit_or_input(ctx, stepper)
    finally:
        for slot in [*stepper.active, *stepper.waiting]:  # a forced stop: the ledger ends them
            slot.req.stream.abandon()
        call.left_all()
        ctx.outbox.sender_done()


class _Model:
    """``await call(method, states, slots)``: the model's ``method`` on the stage's thread.

    While tracing, each call is a batch span (``asyncnn.batch.reason``: admit, step or evict)
    linked to the requests of ``slots``, current while the method runs; and each request has a
    stage span from its arrival (``arrived``) to when it leaves the stage (``left``: before
    its stream ends, so it ends inside the request's span)."""

    def __init__(self, ctx: StageContext, worker: ThreadWorker) -> None:
        self.ctx, self.worker, self.tracing = ctx, worker, ctx.tracing
        self.spans: dict[int, tuple[Any, float]] = {}  # request id -> its open stage span

    def _run(self, method: str, arg: list[Any]) -> Any:
        fn = getattr(self.ctx.stage.fn, method)
        if self.ctx.stage.inference_mode:
            import torch

            with torch.inference_mode():
                return fn(arg)
        return fn(arg)

    async def __call__(self, method: str, arg: list[Any], slots: Sequence[Slot]) -> Any:
        tracing, name = self.tracing, self.ctx.name
        if tracing is None:
            return await self.worker.run(self._run, (method, arg))
        span = tracing.open_batch(name, [s.req for s in slots], method)
        run = tracing.within(tracing.context_of(span), self._run)
        t0 = time.perf_counter()
        try:
            out = await self.worker.run(run, (method, arg))
        except Exception as exc:
            tracing.close_batch(span, name, [], time.perf_counter() - t0, exc)
            raise
        tracing.close_batch(span, name, [], time.perf_counter() - t0)
        return out

    def queue(self, method: str, arg: list[Any], n: int) -> None:
        """Queue ``method`` on the stage's thread without waiting for it; a failure is counted
        (``n`` requests) by the stage."""
        probe = self.ctx.probe

        def reported(fut: asyncio.Future[Any]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None:
                probe.failed(exc, n)

        self.worker.run(self._run, (method, arg)).add_done_callback(reported)

    def arrived(self, req: Request) -> None:
        if self.tracing is not None:
            self.spans[req.id] = (self.tracing.open(self.ctx.name, [req]), time.perf_counter())

    def left(self, req: Request) -> None:
        self._close(req.id)

    def left_all(self) -> None:
        for rid in list(self.spans):
            self._close(rid)

    def _close(self, rid: int) -> None:
        opened = self.spans.pop(rid, None)
        if opened is not None:
            self.tracing.close(opened[0], time.perf_counter() - opened[1])


def _arrivals(ctx: StageContext, stepper: Stepper, ended: bool, call: _Model) -> bool:
    """Offer what arrived to the stepper (no waiting); True once the input has ended."""
    while not ended:
        env = ctx.inbox.poll()
        if env is EMPTY:
            break
        if env is END:
            return True
        for one in env.split():
            (req,) = one.requests
            if not ctx.ledger.alive(req, ctx.probe):
                continue
            stream = ctx.start_stream(req)
            call.arrived(req)
            try:
                stepper.offer(req, one.payload)
            except Exception as exc:  # the key or cost function raised on this input
                call.left(req)
                ctx.part_failed(stream, exc)
    return ended


async def _leave(ctx: StageContext, stepper: Stepper, call: _Model) -> None:
    """Requests that ended early leave (their parts in flight dropped); active ones are evicted."""
    waiting, active = stepper.leave_ended()
    for slot in (*waiting, *active):
        call.left(slot.req)
        ctx.ledger.abandon(slot.req)
    await _evict(ctx, call, active)


async def _evict(ctx: StageContext, call: _Model, slots: Sequence[Slot]) -> None:
    """The model's ``evict`` for requests that left. Nobody waits for its result: untraced, it
    is queued on the stage's thread (which runs calls in order, so it runs before the next
    admit or step) and the loop goes on; a failure is counted by the stage."""
    if not slots or not hasattr(ctx.stage.fn, "evict"):
        return
    states = [s.state for s in slots]
    if call.tracing is None:
        call.queue("evict", states, len(slots))
        return
    try:
        await call("evict", states, slots)
    except Exception as exc:  # the requests have ended; the stage reports the failure
        ctx.probe.failed(exc, len(slots))


async def _admit(ctx: StageContext, stepper: Stepper, call: _Model, joined: list[Slot]) -> None:
    """The model's batched admit for the newcomers, one key at a time."""
    keys: dict[Any, list[Slot]] = {}
    for slot in joined:
        keys.setdefault(slot.key, []).append(slot)
    for group in keys.values():
        failed = await _bisect(ctx, call, "admit", group, [s.payload for s in group], _take_states)
        stepper.remove(failed)


def _take_states(ctx: StageContext, group: Sequence[Slot], result: Any) -> None:
    states = list(result) if isinstance(result, list | tuple) else None
    if states is None or len(states) != len(group):
        raise TypeError(
            f"stage {ctx.name!r}: admit(inputs) must return a list of one state per input; it "
            f"returned {type(result).__name__} for {len(group)} input(s)"
        )
    for slot, state in zip(group, states, strict=True):
        slot.state = state


async def _step(ctx: StageContext, stepper: Stepper, call: _Model, group: list[Slot]) -> None:
    """One batched step of ``group``: each output is sent on; the done ones leave."""
    outs: list[tuple[Slot, Any, bool]] = []

    def take(ctx: StageContext, part: Sequence[Slot], result: Any) -> None:
        outputs, done = _outputs(ctx, part, result)
        outs.extend(zip(part, outputs, done, strict=True))

    t0 = time.perf_counter()
    ctx.probe.begin(t0)
    try:
        failed = await _bisect(ctx, call, "step", group, [s.state for s in group], take)
    finally:
        ctx.probe.end(t0)
    ctx.probe.timed_call(time.perf_counter() - t0, len(group))
    ctx.probe.batches += 1
    stepper.remove(failed)
    finished = stepper.stepped([o[0] for o in outs], [o[2] for o in outs])
    for slot, value, last in outs:
        stream = slot.req.stream
        if slot.req.future.done():
            continue  # ended while the step ran: it leaves before the next one
        await ctx.send_part(stream, value)
        if last:
            call.left(slot.req)  # before the request can end
            stream.end()
    await _evict(ctx, call, [*finished, *failed])


def _outputs(ctx: StageContext, group: Sequence[Slot], result: Any) -> tuple[list[Any], list[bool]]:
    try:
        outputs, done = result
        outputs, done = list(outputs), [bool(d) for d in done]
    except (TypeError, ValueError):
        outputs, done = [], []
    if len(outputs) != len(group) or len(done) != len(group):
        raise TypeError(
            f"stage {ctx.name!r}: step(states) must return (outputs, done), one of each per "
            f"state; it returned {type(result).__name__} for {len(group)} state(s)"
        )
    return outputs, done


async def _bisect(
    ctx: StageContext,
    call: _Model,
    method: str,
    group: Sequence[Slot],
    args: list[Any],
    take: Callable[[StageContext, Sequence[Slot], Any], None],
) -> list[Slot]:
    """``take`` the result of the model's ``method`` over ``group``; when it raises, run it on
    halves until the failing request is alone, and end that one with a ``StageError``. Returns
    the requests that failed."""
    try:
        take(ctx, group, await call(method, args, group))
        return []
    except Exception as exc:
        if len(group) == 1:
            if method != "evict":
                call.left(group[0].req)
            ctx.part_failed(group[0].req.stream, exc)
            return list(group)
        ctx.probe.retries += 1
    half = len(group) // 2
    first = await _bisect(ctx, call, method, group[:half], args[:half], take)
    return first + await _bisect(ctx, call, method, group[half:], args[half:], take)


async def _wait_credit_or_input(ctx: StageContext, stepper: Stepper) -> None:
    """Every active request waits for its reader: wait for a reader, or for a new request."""
    wake = asyncio.get_running_loop().create_future()
    for slot in stepper.active:
        slot.req.stream.notify(wake)
    arrival = asyncio.ensure_future(ctx.inbox.ready())
    try:
        await asyncio.wait([wake, arrival], return_when=asyncio.FIRST_COMPLETED)
    finally:
        arrival.cancel()
        if not wake.done():
            wake.cancel()
