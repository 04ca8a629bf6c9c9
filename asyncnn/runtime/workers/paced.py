"""The former of a ``max_delay="auto"`` batching stage: batches formed when a runner is free,
from the most urgent requests of that moment, released as the :class:`~asyncnn.pacing.Pacer`
decides; a runner about to wait forms its own (:class:`Paced`, the state they share)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import anyio

from ...batcher import Batch, Batcher
from ...channels import Channel
from ...pacing import Pacer
from ..context import StageContext
from .filing import Doomed, pull, release

__all__ = ["ENDS_A_TURN", "Paced", "run_paced"]

ENDS_A_TURN = 32  # doomed requests ended in one loop callback


class Paced:
    """The state of a ``max_delay="auto"`` former, shared with the stage's runners: a runner
    about to wait for work makes the decision the former would make once woken (file what
    waits, ask the pacer, release), at once, instead of a loop trip later for the former and
    another for itself.

    Requests found without time for the batch (hopeless) are ended a few at a time by loop
    callbacks (``ENDS_A_TURN``), not on the spot: under overload a pull passes over a hundred
    or more, and ending each there (its exception, its caller's wake-up queued) held the loop
    3-5 ms in one go while the runner waited for its batch and the deadline timer for the
    loop. They are still in flight meanwhile (a forced stop ends them like any other)."""

    __slots__ = ("batcher", "batches", "closed", "ctx", "doomed", "ending", "now")

    def __init__(
        self, ctx: StageContext, batches: Channel[Batch], now: Callable[[], float] | None = None
    ) -> None:
        spec = ctx.stage.batch
        assert spec is not None
        pacer = Pacer(spec.max_size, ctx.workers, spec.target_latency, ctx.probe.service)
        self.ctx, self.batches, self.batcher = ctx, batches, Batcher(spec, pacer)
        ctx.held = self.batcher
        self.now = now or asyncio.get_running_loop().time
        self.closed = False  # the input has ended
        self.doomed: Doomed = Doomed()
        self.ending = False  # a callback ending the doomed is scheduled

    def form(self, idle: bool) -> bool:
        """File what waits (when a runner is idle) and hand the batch due now (if any) to the
        runners' slot; True when one went."""
        if idle and not self.closed:
            self.closed = pull(self.ctx, self.batcher, self.now, self.doomed)
            if self.doomed and not self.ending:
                self.ending = True
                asyncio.get_running_loop().call_soon(self.end_some)
        if not self.batches.has_room():
            return False
        return release(self.ctx.probe, self.batcher, self.batches, self.now(), self.closed, idle)

    def end_some(self) -> None:
        """End up to ``ENDS_A_TURN`` doomed requests (``TimeoutError``, counted as the stage's
        miss; one that ended meanwhile is only dropped) and come back on the loop's next turn
        while more wait, so that timers and wake-ups due run between."""
        doomed, alive, probe = self.doomed, self.ctx.ledger.alive, self.ctx.probe
        for _ in range(min(ENDS_A_TURN, len(doomed))):
            req, need = doomed.popleft()
            alive(req, probe, need)
        if doomed:
            asyncio.get_running_loop().call_soon(self.end_some)
        else:
            self.ending = False


async def run_paced(ctx: StageContext, batches: Channel[Batch], paced: Paced) -> None:
    """While every runner is busy, arrivals wait in the inbox (a ranked queue once requests are
    urgent), so that the batch formed when a runner is free holds the most urgent requests of
    that moment; then the pacer decides whether to wait for more. A runner about to wait forms
    its batch itself (``Paced.form``) or, when the pacer says wait, nudges the inbox; the
    former decides on arrivals, nudges and the pacer's next look."""
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
