"""Cancel a caller of send() at each await point of the request path.

Chain: s0 (async) -> s1 (thread) -> s2 (async). For every point — waiting for admission, queued
before each stage, inside each stage — the cancelled request must be dropped at the next stage
boundary, the other requests must be unaffected, and nothing may leak.
"""

import asyncio
import threading
from collections import defaultdict

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from asyncnn import Pipeline, Stage

BLOCKER, TARGET, AFTER = 100, 200, 300


class Harness:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.seen: dict[int, list[int]] = defaultdict(list)
        self.entered: dict[tuple[int, int], asyncio.Event] = defaultdict(asyncio.Event)
        self.hold: set[tuple[int, int]] = set()
        self.async_gate: dict[tuple[int, int], asyncio.Event] = defaultdict(asyncio.Event)
        self.thread_gate: dict[tuple[int, int], threading.Event] = defaultdict(threading.Event)

    def async_stage(self, i):
        async def fn(v):
            self.seen[i].append(v)
            self.entered[(i, v)].set()
            if (i, v) in self.hold:
                await self.async_gate[(i, v)].wait()
            return v

        return Stage(fn, name=f"s{i}")

    def thread_stage(self, i):
        def fn(v):
            self.seen[i].append(v)
            self.loop.call_soon_threadsafe(self.entered[(i, v)].set)
            if (i, v) in self.hold:
                assert self.thread_gate[(i, v)].wait(10)
            return v

        return Stage(fn, name=f"s{i}")

    def release(self, i, v):
        self.async_gate[(i, v)].set()
        self.thread_gate[(i, v)].set()


POINTS = ["admission"] + [f"{where}:{i}" for i in range(3) for where in ("queued", "inside")]


@pytest.mark.parametrize("point", POINTS)
async def test_cancel_send_at_each_point(point):
    h = Harness()
    pipe = Pipeline([h.async_stage(0), h.thread_stage(1), h.async_stage(2)], queue_size=1)
    async with pipe:
        where, _, idx = point.partition(":")
        futs = []
        if where == "admission":
            # Fill the pipeline with held requests so that TARGET waits to be admitted.
            h.hold.add((0, BLOCKER))
            futs.append(pipe.submit_nowait(BLOCKER))
            await h.entered[(0, BLOCKER)].wait()
            futs.append(pipe.submit_nowait(BLOCKER + 1))  # fills s0's queue
            stage = 0
        elif where == "queued":
            stage = int(idx)
            h.hold.add((stage, BLOCKER))
            futs.append(pipe.submit_nowait(BLOCKER))
            await h.entered[(stage, BLOCKER)].wait()
        else:
            stage = int(idx)
            h.hold.add((stage, TARGET))

        caller = asyncio.ensure_future(pipe.send(TARGET))
        if where == "inside":
            await h.entered[(stage, TARGET)].wait()
        else:
            await wait_all_tasks_blocked()
        assert not caller.done()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller

        for i in range(3):
            h.release(i, BLOCKER)
            h.release(i, TARGET)
        assert await pipe.send(AFTER) == AFTER  # the pipeline keeps serving
        assert [await f for f in futs] == [BLOCKER + k for k in range(len(futs))]

        st = pipe.stats()
        assert st.in_flight == 0
        assert st.admitted == st.completed + st.failed + st.cancelled
        downstream = stage + 1 if where == "inside" else stage
        for i in range(downstream, 3):
            assert TARGET not in h.seen[i], f"cancelled request reached s{i}"
        # Even a caller waiting behind a full first queue was admitted (send() admits at
        # once, past the queue's bound): it is dropped before stage 0 and counted cancelled.
        assert st.cancelled == 1


async def test_cancel_during_forming_stream_leaves_no_request_behind():
    gate = asyncio.Event()

    async def held(x):
        await gate.wait()
        return x

    pipe = Pipeline([held], queue_size=4)
    async with pipe:
        with anyio.move_on_after(0.02):
            async for _ in pipe.stream(range(100)):
                pass
        gate.set()
        assert await pipe.send(1) == 1
        st = pipe.stats()
        assert st.in_flight == 0
        assert st.admitted == st.completed + st.cancelled
