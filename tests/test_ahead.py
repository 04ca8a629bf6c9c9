"""Thread stages queue a call ahead: the thread goes on to the next call without the loop, and a
request that ends while its call waits on the thread is never computed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from asyncnn import Pipeline, Stage
from tests.workers.helpers import FirstHeld


async def _started(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 5), "the first call never started"


async def test_a_thread_stage_starts_its_next_call_while_the_loop_is_busy():
    first, release = threading.Event(), threading.Event()
    started: dict[int, float] = {}

    def f(i):
        started[i] = time.perf_counter()
        if i == 0:
            first.set()
            release.wait(5)
        return i

    async with Pipeline([Stage(f)]) as pipe:
        # Both wait in the inbox when the worker first runs: it hands both over at once.
        futs = [pipe.submit_nowait(i) for i in range(2)]
        await _started(first)
        release.set()
        time.sleep(0.3)  # noqa: ASYNC251  # the loop is busy: only the thread can start call 1
        busy_until = time.perf_counter()
        assert [await fut for fut in futs] == [0, 1]
    assert started[1] < busy_until


@pytest.mark.parametrize("end", ["cancel", "deadline"])
async def test_a_request_that_ends_while_its_call_waits_on_the_thread_is_not_computed(end):
    f = FirstHeld()
    async with Pipeline([Stage(f, name="f")]) as pipe:
        # Both wait in the stage's inbox when its worker first runs: it hands both over (the
        # one with a deadline in a less urgent class, so that it waits behind the first).
        head = pipe.submit_nowait(0)
        if end == "cancel":
            queued = pipe.submit_nowait(1)
        else:
            queued = pipe.submit_nowait(1, timeout=0.1, priority=1)
        await _started(f.started)
        if end == "cancel":
            queued.cancel()
        else:
            with pytest.raises(TimeoutError):
                await queued
        tail = await pipe.submit(2)
        f.release.set()
        assert await head == 0 and await tail == 2
        stats = pipe.stats()
    assert f.seen == [0, 2]
    assert stats.admitted == 3 and stats.completed == 2
    assert stats.cancelled == 1


async def test_a_slow_call_does_not_hold_up_the_calls_queued_behind_it():
    """Workers share their threads' queue: a call queued ahead goes to whichever thread is free,
    not behind the slow call of the worker that handed it over."""
    release = threading.Event()

    def f(i):
        if i == 0:
            release.wait(5)
        return i

    async with Pipeline([Stage(f, workers=2)], queue_size=4) as pipe:
        head = await pipe.submit(0)
        rest = [await pipe.submit(i) for i in range(1, 6)]
        assert [await fut for fut in rest] == [1, 2, 3, 4, 5]  # while call 0 still runs
        release.set()
        assert await head == 0
