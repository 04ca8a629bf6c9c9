"""Generator stages: a request's parts, streamed in order, stopped early, paced by their reader."""

import asyncio
import contextlib
import threading

import anyio
import pytest
import torch

from asyncnn import Batching, Graph, GraphError, Pipeline, Stage, StageError

pytestmark = pytest.mark.hang_guard(20)


async def agen(n):
    for i in range(n):
        yield i


def sgen(n):
    yield from range(n)


async def until(cond):
    """Wait (5 s at most) for state that other tasks or a stage thread change."""
    with anyio.fail_after(5):
        while not cond():  # noqa: ASYNC110 - polled: a thread may change it
            await asyncio.sleep(0.001)


async def times_ten(x):
    return x * 10


@pytest.mark.parametrize("gen", [agen, sgen], ids=["async-on-loop", "sync-on-thread"])
async def test_parts_come_in_order_and_send_collects_them(gen):
    async with Pipeline([Stage(gen), Stage(times_ten)]) as pipe:
        assert [p async for p in pipe.send_stream(5)] == [0, 10, 20, 30, 40]
        assert await pipe.send(3) == [0, 10, 20]
        assert await pipe.send(0) == []  # no parts: an empty list, not a hang
        assert [p async for p in pipe.send_stream(0)] == []
        stats = pipe.stats()
    assert stats.in_flight == 0 and stats.failed == 0


async def test_a_generator_after_an_ordinary_stage_and_before_a_batched_one():
    def double_rows(x):
        yield x
        yield x * 2

    model = Stage(lambda t: t + 1, name="model", batch=Batching(max_size=8, max_delay=0.005))
    async with Pipeline(
        [Stage(lambda n: torch.full((1, 2), float(n))), Stage(double_rows), model]
    ) as pipe:
        outs = await asyncio.gather(*(pipe.send(n) for n in range(6)))
        stats = pipe.stats()
    for n, parts in enumerate(outs):
        assert [p.tolist() for p in parts] == [[[n + 1.0] * 2], [[2 * n + 1.0] * 2]]
    assert stats["model"].mean_batch_size > 1  # parts of different requests batched


async def test_parts_keep_their_order_through_a_stage_that_finishes_them_out_of_order():
    async def jitter(x):
        await asyncio.sleep(0.02 if x % 2 == 0 else 0.0)  # even parts overtaken by odd ones
        return x

    async with Pipeline([Stage(agen), Stage(jitter, workers=4)]) as pipe:
        assert [p async for p in pipe.send_stream(8)] == list(range(8))


async def test_many_streams_at_once_each_get_their_own_parts():
    async def tagged(x):
        for i in range(x % 5):
            await asyncio.sleep(0)
            yield (x, i)

    async with Pipeline([Stage(tagged, workers=3)]) as pipe:

        async def read(x):
            return [p async for p in pipe.send_stream(x, buffer=2)]

        outs = await asyncio.gather(*(read(x) for x in range(40)))
    assert outs == [[(x, i) for i in range(x % 5)] for x in range(40)]


@pytest.mark.parametrize("on_thread", [False, True], ids=["async", "sync-on-thread"])
async def test_leaving_early_closes_the_generator_and_frees_its_slot(on_thread):
    closed = []
    made = []
    where = []

    def sync_forever(x):
        try:
            i = 0
            while True:
                made.append(i)
                yield i
                i += 1
        finally:
            closed.append(x)
            where.append(threading.current_thread().name)

    async def async_forever(x):  # the same, on the loop: closing it closes the sync one
        inner = sync_forever(x)
        try:
            for i in inner:
                yield i
        finally:
            inner.close()

    fn = sync_forever if on_thread else async_forever
    async with Pipeline([Stage(fn, workers=1)]) as pipe:
        async with contextlib.aclosing(pipe.send_stream("a", buffer=2)) as parts:
            async for p in parts:
                if p == 3:
                    break
        await until(lambda: closed)
        produced = len(made)
        # The one worker slot is free again: another request runs to its end.
        got = []
        async with contextlib.aclosing(pipe.send_stream("b", buffer=2)) as parts:
            async for p in parts:
                got.append(p)
                if len(got) == 2:
                    break
        assert got == [0, 1]
        await until(lambda: len(closed) == 2)
        stats = pipe.stats()
    assert closed == ["a", "b"]
    assert produced <= 3 + 1 + 2 + 1  # read 4, at most buffer + one computing more
    if on_thread:
        assert all(name.startswith("asyncnn:") for name in where)  # closed on its thread
    assert stats.cancelled >= 2 and stats.in_flight == 0


async def test_cancelling_the_reader_ends_the_request_everywhere():
    closed = asyncio.Event()

    async def slow(x):
        try:
            for i in range(1000):
                await asyncio.sleep(0.001)
                yield i
        finally:
            closed.set()

    async with Pipeline([Stage(slow), Stage(times_ten)]) as pipe:

        async def reader():
            async for _ in pipe.send_stream(1):
                pass

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with anyio.fail_after(5):
            await closed.wait()
        await until(lambda: pipe.stats().in_flight == 0)


async def test_a_slow_reader_pauses_only_its_own_request():
    async def counter(x):
        for i in range(50):
            yield i

    async with Pipeline([Stage(counter, workers=1)]) as pipe:
        slow = pipe.send_stream("slow", buffer=2)
        assert await slow.__anext__() == 0  # then it stops reading: its generator pauses
        # With one worker slot, another request still runs to its end.
        with anyio.fail_after(5):
            assert await pipe.send("fast") == list(range(50))
        rest = [p async for p in slow]
    assert rest == list(range(1, 50))


async def test_an_error_in_the_generator_comes_after_the_parts_before_it():
    async def two_then_fail(x):
        yield 1
        yield 2
        if x == 0:
            raise ValueError("bad input")

    async with Pipeline([Stage(two_then_fail, name="gen"), Stage(times_ten)]) as pipe:
        got = []
        with pytest.raises(StageError, match="bad input") as info:
            async for p in pipe.send_stream(0):
                got.append(p)
        assert got == [10, 20] and info.value.stage == "gen"
        with pytest.raises(StageError, match="bad input"):
            await pipe.send(0)
        assert await pipe.send(1) == [10, 20]  # other requests carry on
        stats = pipe.stats()
    assert stats["gen"].failures == 2


async def test_a_part_failing_downstream_fails_its_request_and_stops_its_generator(caplog):
    import gc
    import logging

    caplog.set_level(logging.ERROR, logger="asyncio")
    stopped = asyncio.Event()

    async def many(x):
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0)
        finally:
            stopped.set()

    async def picky(x):
        if x == 3:
            raise KeyError(x)
        return x

    async with Pipeline([Stage(many), Stage(picky, name="picky")]) as pipe:
        got = []
        with pytest.raises(StageError) as info:
            async for p in pipe.send_stream(0, buffer=4):
                got.append(p)
        assert got == [0, 1, 2] and info.value.stage == "picky"
        with anyio.fail_after(5):
            await stopped.wait()
        await until(lambda: pipe.stats().in_flight == 0)
    del info
    gc.collect()  # the request's future holds the same error: raised once, never "unretrieved"
    assert "never retrieved" not in caplog.text


async def test_a_pipeline_without_a_generator_streams_its_one_result():
    async with Pipeline([Stage(times_ten)]) as pipe:
        assert [p async for p in pipe.send_stream(2)] == [20]


async def test_closing_the_pipeline_drains_streams_to_their_end():
    async with Pipeline([Stage(sgen), Stage(times_ten)]) as pipe:
        futs = [asyncio.ensure_future(pipe.send(n)) for n in range(10)]
        await asyncio.sleep(0)
    assert [f.result() for f in futs] == [[i * 10 for i in range(n)] for n in range(10)]


def test_generator_graphs_that_cannot_match_their_parts_are_refused():
    g = Graph()
    x = g.input()
    a = g.add(Stage(agen, name="a"), x)
    b = g.add(Stage(lambda v: v, name="b"), x)
    g.add(Stage(lambda p, q: p, name="join"), a, b)
    g.output(g._nodes[-1])
    with pytest.raises(GraphError, match="joins a branch after generator stage 'a'"):
        Pipeline(g)
    with pytest.raises(GraphError, match="one generator per path"):
        Pipeline([Stage(agen, name="a"), Stage(sgen, name="b")])
    g = Graph()
    x = g.input()
    g.output(g.add(Stage(agen, name="a"), x), g.add(Stage(times_ten), x))
    with pytest.raises(GraphError, match="outputs mix"):
        Pipeline(g)
    with pytest.raises(GraphError, match="microbatch does not mix with generator stages"):
        Pipeline([Stage(agen)], microbatch=2)


async def test_buffer_must_be_a_whole_number():
    async with Pipeline([Stage(agen)]) as pipe:
        with pytest.raises(ValueError, match="buffer=0"):
            pipe.send_stream(1, buffer=0)


@pytest.mark.parametrize("kind", ["generator", "step"])
async def test_a_send_timeout_ends_a_streaming_request_and_its_generation(kind):
    from asyncnn import Stepping

    closed = []  # set from the loop (the generator) or from the stage thread (evict)

    async def slow(x):
        try:
            while True:
                await asyncio.sleep(0.005)
                yield x
        finally:
            closed.append(x)

    class Forever:
        def admit(self, inputs):
            return [{"x": x} for x in inputs]

        def step(self, states):
            threading.Event().wait(0.005)
            return [s["x"] for s in states], [False] * len(states)

        def evict(self, states):
            closed.extend(s["x"] for s in states)

    stage = Stage(slow) if kind == "generator" else Stage(Forever(), step=Stepping())
    async with Pipeline([stage]) as pipe:
        with pytest.raises(TimeoutError):
            await pipe.send(1, timeout=0.05)
        await until(lambda: closed == [1] and pipe.stats().in_flight == 0)
        stats = pipe.stats()
    assert stats.cancelled == 1 and stats.completed == 0
