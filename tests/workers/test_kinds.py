"""The placed completer, the batch former, join collectors, the input task and the sinks."""

import asyncio

import anyio
import torch

from asyncnn import Batching
from asyncnn.batcher import Batch
from asyncnn.batching import Envelope
from asyncnn.channels import Channel
from asyncnn.runtime.joins import PartTable
from asyncnn.runtime.workers.batched import run_former
from asyncnn.runtime.workers.edges import Router, Sink, run_collector, run_input
from asyncnn.runtime.workers.placed import Launched, run_complete
from tests.workers.helpers import admit, drained, feed, make_ctx


def ident(x):
    return x


class FakeCompletion:
    """Not done until the test says so; ``wait`` is what the waiter thread would run."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.released = False

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def wait(self) -> None:  # never called on the loop: the fake waiter awaits the event
        raise AssertionError

    def release(self) -> None:
        self.released = True


class FakeWaiter:
    def run(self, fn, args):
        return fn.__self__.event.wait()


async def test_the_completer_keeps_launch_order_whatever_order_calls_finish_in():
    ctx = make_ctx(ident)
    launched = Channel[Launched](4)
    first, second = FakeCompletion(), FakeCompletion()
    reqs = [admit(ctx, i) for i in range(2)]
    feed(launched, Launched(Envelope(None, [reqs[0]]), "A", first, 0.0), close=False)
    launched.send_nowait(Launched(Envelope(None, [reqs[1]]), "B", second, 0.0))
    launched.close()
    ctx.outbox.open(1)
    ctx.probe.active = 2
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_complete, ctx, FakeWaiter(), launched, True)
        second.event.set()  # the second call finishes first
        await anyio.wait_all_tasks_blocked()
        assert len(ctx.outbox.channels[0]) == 0  # still waiting for the first
        first.event.set()
    out = drained(ctx.outbox.channels[0])
    assert [e.payload for e in out] == ["A", "B"]
    assert first.released and second.released
    assert ctx.probe.active == 0 and ctx.probe.items == 2 and ctx.probe.timed == 2


async def test_the_former_releases_full_batches_then_drains_on_a_manual_clock():
    ctx = make_ctx(ident, batch=Batching(max_size=2, max_delay=10.0))
    now = [0.0]
    batches = Channel[Batch](8)
    rows = [torch.zeros(1, 3) for _ in range(3)]
    reqs = [admit(ctx, i) for i in range(3)]
    reqs[2].future.cancel()  # dead before it is filed: never batched
    feed(ctx.inbox, *(Envelope(x, [r]) for x, r in zip(rows, reqs, strict=True)))
    await run_former(ctx, batches, clock=lambda: now[0])
    got = drained(batches)
    assert [(b.reason, [i.request.id for i in b.items]) for b in got] == [("full", [0, 1])]
    assert {k: n for k, n in ctx.probe.released.items() if n} == {"full": 1}
    assert ctx.ledger.counters.cancelled == 1


async def test_the_former_releases_on_delay_by_its_clock():
    ctx = make_ctx(ident, batch=Batching(max_size=4, max_delay=1.0))
    now = [0.0]
    batches = Channel[Batch](8)
    feed(ctx.inbox, Envelope(torch.zeros(1, 3), [admit(ctx, 0)]), close=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_former, ctx, batches, lambda: now[0])
        await anyio.wait_all_tasks_blocked()
        assert len(batches) == 0  # nothing due at t=0
        now[0] = 5.0
        ctx.inbox.send_nowait(Envelope(torch.zeros(1, 3), [admit(ctx, 1)]))  # wakes the former
        await anyio.wait_all_tasks_blocked()
        ctx.inbox.close()
    (batch,) = drained(batches)
    assert batch.reason == "delay" and [i.request.id for i in batch.items] == [0, 1]


async def test_collectors_match_parts_by_request_and_the_last_one_closes_the_work():
    ctx = make_ctx(lambda a, b: a, ports=2, name="join")
    a, b, dead = (admit(ctx, i) for i in range(3))
    dead.future.cancel()
    feed(ctx.ports[0], Envelope("a0", [a]), Envelope("b0", [b]), Envelope("d0", [dead]))
    feed(ctx.ports[1], Envelope("b1", [b]), Envelope("a1", [a]))
    ctx.inbox.add_senders(2)
    await run_collector(ctx, 0, ctx.ports[0])
    assert not ctx.inbox.closed
    await run_collector(ctx, 1, ctx.ports[1])
    work = drained(ctx.inbox)
    assert [(e.payload, e.requests) for e in work] == [(("b0", "b1"), [b]), (("a0", "a1"), [a])]
    assert len(ctx.join) == 0 and ctx.ledger.counters.cancelled == 1


async def test_the_input_task_splits_micro_batches_and_the_sink_reassembles_them():
    from asyncnn.runtime.context import Outbox
    from asyncnn.runtime.ledger import Ledger
    from asyncnn.runtime.probe import StageProbe

    led = Ledger()
    admission, first = Channel(4, "input"), Channel(8, "first")
    loop = asyncio.get_running_loop()
    from asyncnn.batching import Request

    req = Request(0, loop.create_future())
    led.admit(req)
    feed(admission, Envelope(torch.arange(5.0), [req]))
    outbox = Outbox([first], [False], StageProbe("input"))
    outbox.open(1)
    await run_input(admission, Router(outbox), led, microbatch=2)
    chunks = drained(first)
    assert [e.chunk for e in chunks] == [(0, 3), (1, 3), (2, 3)]
    done = Channel[None](1, "sinks")
    done.add_senders(1)
    sink = Sink(led, 0, None, 1, PartTable(led), done)
    sink.add_senders(1)
    for env in reversed(chunks):  # chunks may arrive in any order
        assert not req.future.done()
        sink.send_nowait(env)
    assert torch.equal(req.future.result(), torch.arange(5.0))
    assert led.counters.completed == 1 and len(led) == 0
    assert not done.closed
    sink.sender_done()
    assert done.closed and not sink.has_room()


async def test_a_sink_with_several_outputs_ends_a_request_once_all_arrived():
    from asyncnn.batching import Request
    from asyncnn.runtime.ledger import Ledger

    led = Ledger()
    req = Request(0, asyncio.get_running_loop().create_future())
    led.admit(req)
    outs, done = PartTable(led), Channel[None](1, "sinks")
    done.add_senders(2)
    sinks = [Sink(led, port, outs, 2, None, done) for port in (0, 1)]
    for sink in sinks:
        sink.add_senders(1)
    await sinks[1].send(Envelope("right", [req]))
    sinks[1].sender_done()
    assert not req.future.done() and not done.closed
    sinks[0].send_nowait(Envelope("left", [req]))
    assert req.future.result() == ("left", "right") and not done.closed
    sinks[0].sender_done()
    assert done.closed and led.counters.completed == 1


async def test_the_runner_bisects_a_failing_batch_so_only_the_guilty_request_fails():
    from asyncnn.batcher import Item
    from asyncnn.errors import StageError
    from asyncnn.runtime.workers.batched import run_runner

    async def model(x):
        if (x < 0).any():
            raise ValueError("negative row")
        return x * 2

    ctx = make_ctx(model, batch=Batching(max_size=8))
    reqs = [admit(ctx, i) for i in range(5)]
    reqs[4].future.cancel()  # cancelled while its batch waited: never computed
    rows = [torch.full((1, 2), -1.0 if i == 2 else float(i)) for i in range(5)]
    batches, launched = Channel[Batch](2), Channel[Launched](16)
    items = [Item(r, x, 0, 1, 0.0) for r, x in zip(reqs, rows, strict=True)]
    feed(batches, Batch(items, "full"))
    await run_runner(ctx, None, batches, launched)
    done = drained(launched)
    got = {
        r.id: part for job in done for r, part in zip(job.env.requests, job.env.parts, strict=True)
    }
    assert sorted(got) == [0, 1, 3]  # the guilty one and the cancelled one are not passed on
    for rid, part in got.items():
        assert torch.equal(part, rows[rid] * 2)
    err = reqs[2].future.exception()
    assert isinstance(err, StageError) and "negative row" in str(err)
    assert ctx.probe.retries >= 2 and ctx.probe.batches == 1 and ctx.probe.rows == 4
    assert ctx.ledger.counters.cancelled == 1 and ctx.ledger.counters.failed == 1


async def test_an_idle_paced_runner_forms_its_own_batch_without_the_former():
    """``max_delay="auto"``: a runner about to wait makes the former's decision itself, so its
    next batch needs no loop trip to the former (no former runs here at all)."""
    from asyncnn.runtime.workers.batched import run_runner
    from asyncnn.runtime.workers.paced import Paced

    async def model(x):
        return x + 1

    ctx = make_ctx(model, batch=Batching(max_size=2, max_delay="auto"))
    batches, launched = Channel[Batch](1), Channel[Launched](16)
    now = [0.0]
    paced = Paced(ctx, batches, lambda: now[0])
    reqs = [admit(ctx, i) for i in range(4)]
    feed(ctx.inbox, *(Envelope(torch.full((1, 2), float(i)), [r]) for i, r in enumerate(reqs)))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_runner, ctx, None, batches, launched, paced)
            await anyio.wait_all_tasks_blocked()  # two full batches, both formed by the runner
            assert len(launched) == 2 and paced.closed  # it also saw the input end
            batches.close()
    jobs = drained(launched)
    assert [[r.id for r in job.env.requests] for job in jobs] == [[0, 1], [2, 3]]
    assert {k: n for k, n in ctx.probe.released.items() if n} == {"full": 2}


async def test_a_paced_former_ends_the_hopeless_a_few_at_a_time_after_the_batch_goes():
    """Requests without time for the batch about to form are put aside while it forms and are
    ended (TimeoutError, the stage's miss) by loop callbacks, ``ENDS_A_TURN`` at a time; one
    that ends otherwise meanwhile (its caller cancelled) is only dropped."""
    from asyncnn.batching import Request
    from asyncnn.runtime.workers.paced import ENDS_A_TURN, Paced

    ctx = make_ctx(ident, batch=Batching(max_size=2, max_delay="auto"))
    for _ in range(8):
        ctx.probe.service.observe(2, 1.0)  # a call of 2 rows takes a second
    now = [0.0]
    ctx.ledger.clock = lambda: now[0]
    loop = asyncio.get_running_loop()

    def admit_by(rid, deadline):
        req = Request(rid, loop.create_future(), None, deadline, 0, 0.0)
        ctx.ledger.admit(req)
        return req

    doomed = [admit_by(i, 0.5) for i in range(2 * ENDS_A_TURN + 2)]  # 0.5 s left: hopeless
    live = [admit_by(100 + i, 100.0) for i in range(2)]
    feed(ctx.inbox, *(Envelope(torch.ones(1, 2), [r]) for r in [*doomed, *live]), close=False)
    batches = Channel[Batch](1)
    paced = Paced(ctx, batches, lambda: now[0])
    assert paced.form(idle=True)  # the batch goes first, holding the two with time
    assert [i.request.id for i in batches.poll().items] == [100, 101]
    assert len(paced.doomed) == len(doomed) and not any(r.future.done() for r in doomed)
    doomed[-1].future.cancel()  # its caller left before it was ended
    await asyncio.sleep(0)  # one turn of the loop: one callback
    assert sum(r.future.done() for r in doomed[:-1]) == ENDS_A_TURN
    for _ in range(3):
        await asyncio.sleep(0)
    assert not paced.doomed and not paced.ending
    for r in doomed[:-1]:
        assert isinstance(r.future.exception(), TimeoutError)
        assert "(hopeless)" in str(r.future.exception())
    assert ctx.probe.misses == {"expired": 0, "hopeless": len(doomed) - 1}
    counts = ctx.ledger.counters
    assert (counts.timed_out, counts.cancelled) == (len(doomed) - 1, len(doomed))
    assert len(ctx.ledger) == 2  # only the two in the batch are still in flight
