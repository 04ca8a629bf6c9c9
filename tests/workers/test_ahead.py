"""run_ahead driven on its own: pre-filled inbox, real ledger and threads, collecting outputs."""

import asyncio

import pytest

from asyncnn.batching import Envelope
from asyncnn.errors import StageError
from asyncnn.executors import ThreadWorker
from asyncnn.runtime.workers.ahead import run_ahead
from tests.workers.helpers import FirstHeld, admit, drained, feed, make_ctx


def picky(x):
    if x == 1:
        raise ValueError("one is not allowed")
    return x * 10


async def run(ctx, threads=1, join=False):
    pool = ThreadWorker("t", asyncio.get_running_loop(), threads)
    ctx.outbox.open(1)
    try:
        await run_ahead(ctx, pool, join)
    finally:
        pool.stop()
        await pool.wait_stopped(5)
    return drained(ctx.outbox.channels[0])


async def test_outputs_keep_the_order_handed_over_and_a_failure_fails_only_its_envelope():
    ctx = make_ctx(picky)
    reqs = [admit(ctx, i) for i in range(5)]
    feed(ctx.inbox, *(Envelope(i, [r]) for i, r in enumerate(reqs)))
    out = await run(ctx)
    assert [(e.payload, e.requests) for e in out] == [
        (0, [reqs[0]]),
        (20, [reqs[2]]),
        (30, [reqs[3]]),
        (40, [reqs[4]]),
    ]
    err = reqs[1].future.exception()
    assert isinstance(err, StageError) and err.stage == "picky"
    assert ctx.probe.items == 4 and ctx.probe.failures == 1 and ctx.probe.active == 0
    assert ctx.probe.timed == 4  # every call that ran is timed


async def test_a_request_cancelled_before_its_call_starts_is_never_computed():
    gate = FirstHeld()
    ctx = make_ctx(gate)
    reqs = [admit(ctx, i) for i in range(3)]
    feed(ctx.inbox, *(Envelope(i, [r]) for i, r in enumerate(reqs)))
    worker = asyncio.ensure_future(run(ctx))
    assert await asyncio.to_thread(gate.started.wait, 5)
    reqs[1].future.cancel()  # handed over behind call 0 (AHEAD = 1), not started
    gate.release.set()
    out = await worker
    assert [e.payload for e in out] == [0, 2] and gate.seen == [0, 2]
    assert ctx.ledger.counters.cancelled == 1


async def test_a_join_payload_is_spread_into_the_call():
    ctx = make_ctx(lambda a, b: a + b)
    feed(ctx.inbox, Envelope((1, 2), [admit(ctx, 0)]))
    out = await run(ctx, threads=2, join=True)
    assert [e.payload for e in out] == [3]


@pytest.mark.parametrize("ended", [1, 2])
async def test_a_merged_envelope_queued_behind_a_call_is_skipped_once_all_its_requests_ended(ended):
    gate = FirstHeld()
    ctx = make_ctx(gate)
    first, pair = admit(ctx, 0), [admit(ctx, 1), admit(ctx, 2)]
    feed(ctx.inbox, Envelope(0, [first]), Envelope(5, pair))
    worker = asyncio.ensure_future(run(ctx))
    assert await asyncio.to_thread(gate.started.wait, 5)
    for req in pair[:ended]:  # handed over behind call 0, not started
        req.future.cancel()
    gate.release.set()
    out = await worker
    if ended == 2:  # skipped, and both counted as cancelled here
        assert gate.seen == [0] and [e.payload for e in out] == [0]
        assert ctx.ledger.counters.cancelled == 2
    else:  # one request still waits for the call's result: it is computed and sent on (the
        # next boundary drops the cancelled one, as after any call)
        assert gate.seen == [0, 5] and [e.payload for e in out] == [0, 5]
        assert pair[1] in out[1].requests
