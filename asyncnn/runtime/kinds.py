"""Stage kinds: how each kind of stage is started. Adding a kind is a module and a line here.

A kind's ``start(ctx, sup)`` registers the stage's sending tasks on its outbox (so its output
channels end themselves) and spawns its tasks through the supervisor; it runs synchronously,
before any task can finish.
"""

from __future__ import annotations

from collections.abc import Callable

from ..batcher import Batch
from ..channels import Channel
from ..executors import invoker
from ..stage import Stage
from .context import StageContext
from .probe import LOOP_SAMPLE
from .supervisor import Supervisor
from .workers.ahead import AHEAD, run_ahead
from .workers.batched import run_former, run_runner
from .workers.edges import run_collector
from .workers.paced import Paced
from .workers.placed import launched_channel, run_complete, run_launch
from .workers.plain import run_plain
from .workers.stepped import run_stepped
from .workers.yielding import run_yielding

__all__ = ["KINDS", "calls_ahead", "kind_of", "queues_ahead", "start_stage"]

StageKind = Callable[[StageContext, Supervisor], None]


def kind_of(stage: Stage) -> str:
    """The kind that runs ``stage``: decided once, from its declaration."""
    if stage.step is not None:
        return "stepped"
    if stage.yields:
        return "yielding"
    if stage.batch is not None:
        return "batched"
    if stage.device is not None:
        return "placed"
    return "plain"


def queues_ahead(stage: Stage) -> bool:
    """A plain stage on its own threads keeps calls queued on them ahead of the running ones
    (``workers.ahead``). ``_start_plain`` still runs it one call at a time while tracing (its
    spans follow one call at a time); the capacity counts the queued calls either way."""
    return stage.runs_on == "thread" and kind_of(stage) == "plain"


def calls_ahead(stage: Stage) -> int:
    """Items a stage's workers hold queued on their threads, besides the calls they run (for
    the pipeline's capacity)."""
    return int(stage.workers) * AHEAD if queues_ahead(stage) else 0


def _start_plain(ctx: StageContext, sup: Supervisor) -> None:
    runs_on, name = ctx.stage.runs_on, ctx.name
    sample = LOOP_SAMPLE - 1 if runs_on in ("loop", "inline") else 0
    ctx.outbox.open(ctx.workers)
    if queues_ahead(ctx.stage) and ctx.tracing is None:
        # One queue of calls for all the stage's threads: a call queued ahead goes to whichever
        # thread is free first, never behind one slow call.
        threads = sup.thread(name, threads=ctx.workers)
        for w in range(ctx.workers):
            sup.spawn(f"{name}:{w}", run_ahead, ctx, threads, ctx.join is not None)
        return
    for w in range(ctx.workers):
        worker = sup.thread(f"{name}:{w}") if runs_on == "thread" else None
        call, carries, join = ctx.call, ctx.tracing is not None, ctx.join is not None
        if carries and runs_on != "ray":
            # The function runs with its stage span current (spans it makes are children); a
            # join's parts are spread by the carrying call.
            call = ctx.tracing.carrying(call, runs_on == "loop", join)
        invoke = invoker(call, runs_on, join=join and not carries, worker=worker, pool=ctx.pool)
        if carries and runs_on == "ray":
            invoke = ctx.tracing.remote(ctx.pool, join)  # the context travels with each call
        sup.spawn(f"{name}:{w}", run_plain, ctx, invoke, sample, runs_on != "loop", carries)


def _start_placed(ctx: StageContext, sup: Supervisor) -> None:
    name = ctx.name
    ctx.outbox.open(ctx.workers)  # the completers send
    for w in range(ctx.workers):
        worker = sup.thread(f"{name}:{w}", accelerator=ctx.accelerated)
        waiter = sup.thread(f"{name}:{w}:wait", compute=False)
        launched = launched_channel(ctx, w)
        sup.spawn(f"{name}:{w}:launch", run_launch, ctx, worker, launched)
        sup.spawn(f"{name}:{w}:complete", run_complete, ctx, waiter, launched, True)


def _start_batched(ctx: StageContext, sup: Supervisor) -> None:
    name = ctx.name
    # Formed batches wait here for a free runner; one slot keeps batches forming late (and
    # large) while every runner is busy.
    batches = Channel[Batch](1, f"{name}.batches")
    # Paced (max_delay="auto"): the former's state is shared, so an idle runner forms its own.
    paced = Paced(ctx, batches) if ctx.stage.batch is not None and ctx.stage.batch.auto else None
    sup.spawn(f"{name}:form", run_former, ctx, batches, None, paced)
    ctx.outbox.open(ctx.workers)
    runs_on = ctx.stage.runs_on
    for w in range(ctx.workers):
        worker = (
            sup.thread(f"{name}:{w}", accelerator=ctx.accelerated) if runs_on == "thread" else None
        )
        waiter = sup.thread(f"{name}:{w}:wait", compute=False) if ctx.device is not None else None
        launched = launched_channel(ctx, w)
        sup.spawn(f"{name}:{w}:run", run_runner, ctx, worker, batches, launched, paced)
        sup.spawn(f"{name}:{w}:complete", run_complete, ctx, waiter, launched, False)


def _start_yielding(ctx: StageContext, sup: Supervisor) -> None:
    name = ctx.name
    ctx.outbox.open(1)  # the reader; each request's driver registers itself as it starts
    threads = sup.thread(name, threads=ctx.workers) if ctx.stage.runs_on == "thread" else None
    sup.spawn(f"{name}:read", run_yielding, ctx, sup, threads)


def _start_stepped(ctx: StageContext, sup: Supervisor) -> None:
    ctx.outbox.open(1)
    sup.spawn(
        f"{ctx.name}:step", run_stepped, ctx, sup.thread(ctx.name, accelerator=ctx.accelerated)
    )


KINDS: dict[str, StageKind] = {
    "plain": _start_plain,
    "placed": _start_placed,
    "batched": _start_batched,
    "yielding": _start_yielding,
    "stepped": _start_stepped,
}


def start_stage(ctx: StageContext, sup: Supervisor) -> None:
    """Start ``ctx``'s stage: its join collectors, then the tasks of its kind."""
    if ctx.join is not None:
        ctx.inbox.add_senders(len(ctx.ports))
        for port, ch in enumerate(ctx.ports):
            sup.spawn(f"{ctx.name}:join{port}", run_collector, ctx, port, ch)
    KINDS[kind_of(ctx.stage)](ctx, sup)
