"""run_plain driven on its own: pre-filled inbox, real ledger, collecting outputs."""

import anyio
import pytest

from asyncnn.batching import Envelope
from asyncnn.errors import StageError
from asyncnn.executors import invoker
from asyncnn.runtime.workers.plain import run_plain
from tests.workers.helpers import admit, drained, feed, make_ctx


async def add_one(x):
    return x + 1


def picky(x):
    if x == 1:
        raise ValueError("one is not allowed")
    return x * 10


async def run(ctx, sample=0, sync=False):
    ctx.outbox.open(1)
    await run_plain(ctx, invoker(ctx.call, ctx.stage.runs_on), sample, sync)


async def test_dead_requests_are_skipped_and_the_rest_are_computed_once():
    ctx = make_ctx(add_one)
    reqs = [admit(ctx, i) for i in range(3)]
    reqs[1].future.cancel()
    feed(ctx.inbox, *(Envelope(i, [r]) for i, r in enumerate(reqs)))
    await run(ctx)
    out = drained(ctx.outbox.channels[0])
    assert [(e.payload, e.requests) for e in out] == [(1, [reqs[0]]), (3, [reqs[2]])]
    assert ctx.probe.items == 2 and ctx.ledger.counters.cancelled == 1


async def test_a_failure_fails_only_its_envelope():
    ctx = make_ctx(picky, executor="inline")
    reqs = [admit(ctx, i) for i in range(3)]
    feed(ctx.inbox, *(Envelope(i, [r]) for i, r in enumerate(reqs)))
    await run(ctx, sync=True)
    out = drained(ctx.outbox.channels[0])
    assert [e.payload for e in out] == [0, 20]
    err = reqs[1].future.exception()
    assert isinstance(err, StageError) and err.stage == "picky"
    assert ctx.probe.failures == 1 and ctx.ledger.counters.failed == 1


async def test_the_last_of_several_workers_closes_the_outputs_once():
    ctx = make_ctx(add_one, outs=2)
    feed(ctx.inbox, Envelope(1, [admit(ctx, 0)]))
    ctx.outbox.open(2)
    invoke = invoker(ctx.call, "loop")
    await run_plain(ctx, invoke, 0, False)
    assert not any(ch.closed for ch in ctx.outbox.channels)  # another worker may still send
    await run_plain(ctx, invoke, 0, False)
    a, b = (drained(ch) for ch in ctx.outbox.channels)
    assert [e.payload for e in a] == [2] == [e.payload for e in b]
    assert a[0] is not b[0]  # fan-out: each consumer owns its envelope


async def test_loop_stages_time_one_call_in_64():
    ctx = make_ctx(add_one)
    feed(ctx.inbox, *(Envelope(i, [admit(ctx, i)]) for i in range(128)))
    await run(ctx, sample=63)
    assert ctx.probe.timed == 2 and ctx.probe.items == 128
    assert len(drained(ctx.outbox.channels[0])) == 128


async def test_a_sync_function_that_returns_a_coroutine_is_named():
    async def helper(x):
        return x

    def wrong(x):
        return helper(x)

    ctx = make_ctx(wrong, executor="inline")
    r = admit(ctx, 0)
    feed(ctx.inbox, Envelope(1, [r]))
    await run(ctx, sync=True)
    with pytest.raises(StageError, match=r"returned a coroutine.*async def"):
        r.future.result()


async def test_a_thread_stage_runs_on_its_worker():
    from asyncnn.executors import ThreadWorker

    ctx = make_ctx(picky)
    worker = ThreadWorker("unit", __import__("asyncio").get_running_loop())
    try:
        feed(ctx.inbox, *(Envelope(i, [admit(ctx, i)]) for i in (2, 3)))
        ctx.outbox.open(1)
        with anyio.fail_after(5):
            await run_plain(ctx, invoker(ctx.call, "thread", worker=worker), 0, True)
    finally:
        worker.stop()
        await worker.wait_stopped(5)
    assert [e.payload for e in drained(ctx.outbox.channels[0])] == [20, 30]
    assert ctx.probe.timed == 2
