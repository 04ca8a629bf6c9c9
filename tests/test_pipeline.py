import asyncio
import logging
import sys
import threading

import anyio
import pytest
import torch
from anyio import wait_all_tasks_blocked

from asyncnn import (
    AsyncnnError,
    Graph,
    Pipeline,
    PipelineClosed,
    PipelineFull,
    Stage,
    StageError,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def inc(x):
    return x + 1


def double(x):
    return x * 2


def check_counts(pipe, *, in_flight=0):
    st = pipe.stats()
    assert st.admitted == st.completed + st.failed + st.cancelled + st.in_flight
    assert st.in_flight == in_flight
    return st


async def test_send_through_a_chain_of_every_executor():
    pipe = Pipeline([Stage(inc), Stage(double, workers=2), Stage(str, executor="inline")])
    async with pipe:
        assert await pipe.send(1) == "4"
        st = check_counts(pipe)
    assert st["inc"].items == 1 and st["double"].items == 1 and st["str"].items == 1
    assert st.completed == 1


async def test_payloads_are_any_python_object():
    pipe = Pipeline([Stage(lambda d: {**d, "seen": True})])
    async with pipe:
        assert await pipe.send({"a": 1}) == {"a": 1, "seen": True}
        t = torch.arange(6).reshape(2, 3)
        assert await Pipeline_identity_send(t) is not None


async def Pipeline_identity_send(x):
    async def ident(v):
        return v

    async with Pipeline([ident]) as p:
        return await p.send(x)


async def test_module_runs_on_thread_under_inference_mode():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["inference"] = torch.is_inference_mode_enabled()
            seen["thread"] = threading.current_thread().name
            return x * 2

    async with Pipeline([Probe()]) as pipe:
        out = await pipe.send(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0))
    assert seen["inference"] is True
    assert seen["thread"].startswith("asyncnn:Probe")


async def test_stream_sync_and_async_iterables_in_order():
    async def agen():
        for i in range(50):
            yield i

    async with Pipeline([inc, double]) as pipe:
        assert [y async for y in pipe.stream(range(300))] == [(i + 1) * 2 for i in range(300)]
        assert [y async for y in pipe.stream(agen())] == [(i + 1) * 2 for i in range(50)]
        unordered = [y async for y in pipe.stream(range(100), ordered=False)]
        assert sorted(unordered) == [(i + 1) * 2 for i in range(100)]
        check_counts(pipe)


async def test_stream_order_survives_out_of_order_workers():
    # Each call releases only when the next one has started: workers finish in reverse pairs.
    gates = [threading.Event() for _ in range(41)]

    def slow_then_fast(i):
        if i % 2 == 0:
            gates[i + 1].wait(5)  # even items wait for their odd successor to finish first
        else:
            gates[i].set()
        return i

    async with Pipeline([Stage(slow_then_fast, workers=2)], queue_size=4) as pipe:
        out = [y async for y in pipe.stream(range(40))]
    assert out == list(range(40))


async def test_stream_unordered_yields_completion_order():
    release = asyncio.Event()

    async def hold_first(i):
        if i == 0:
            await release.wait()
        return i

    async with Pipeline([Stage(hold_first, workers=4)]) as pipe:
        got = []
        async for y in pipe.stream(range(4), ordered=False):
            got.append(y)
            if len(got) == 3:
                release.set()
    assert got[-1] == 0 and sorted(got) == [0, 1, 2, 3]


async def test_stage_error_fails_only_that_request():
    def picky(x):
        if x == 3:
            raise ValueError("three is bad")
        return x

    async with Pipeline([inc, Stage(picky, name="picky"), inc]) as pipe:
        with pytest.raises(StageError) as info:
            await pipe.send(2)
        assert info.value.stage == "picky"
        assert isinstance(info.value.__cause__, ValueError)
        assert "picky" in str(info.value) and "three is bad" in str(info.value)
        assert await pipe.send(5) == 7
        results = [y async for y in pipe.stream(range(6), return_exceptions=True)]
        assert isinstance(results[2], StageError)
        assert [r for i, r in enumerate(results) if i != 2] == [2, 3, 5, 6, 7]
        st = check_counts(pipe)
        assert st.failed == 2 and st["picky"].failures == 2


async def test_stream_raises_the_first_failure():
    async def boom(x):
        if x == 2:
            raise RuntimeError("nope")
        return x

    async with Pipeline([boom]) as pipe:
        got = []
        with pytest.raises(StageError, match="nope"):
            async for y in pipe.stream(range(5)):
                got.append(y)
        assert got == [0, 1]
        assert await pipe.send(9) == 9


async def test_stream_input_error_propagates():
    def bad_inputs():
        yield 1
        raise KeyError("source broke")

    async with Pipeline([inc]) as pipe:
        got = []
        with pytest.raises(KeyError, match="source broke"):
            async for y in pipe.stream(bad_inputs()):
                got.append(y)
        assert got == [2]


async def test_fan_out_fan_in_join_receives_parts_of_the_same_request():
    async def left(x):
        await asyncio.sleep(0)  # finish in a different order than right
        return ("L", x)

    def right(x):
        return ("R", x)

    g = Graph()
    x = g.input()
    a = g.add(Stage(inc), x)
    b = g.add(Stage(left), a)
    c = g.add(Stage(right, workers=3), a)
    d = g.add(Stage(lambda p, q: (p, q), name="join"), b, c)
    g.output(d)
    async with Pipeline(g) as pipe:
        outs = [y async for y in pipe.stream(range(200))]
        check_counts(pipe)
    assert outs == [(("L", i + 1), ("R", i + 1)) for i in range(200)]


async def test_several_outputs_return_a_tuple():
    g = Graph()
    x = g.input()
    b = g.add(Stage(inc), x)
    c = g.add(Stage(double), x)
    g.output(b, c)
    async with Pipeline(g) as pipe:
        assert await pipe.send(5) == (6, 10)


async def test_failing_branch_fails_the_request_and_frees_the_join():
    def fails_on_odd(x):
        if x % 2:
            raise ValueError("odd")
        return x

    g = Graph()
    x = g.input()
    b = g.add(Stage(fails_on_odd, name="strict"), x)
    c = g.add(Stage(inc), x)
    d = g.add(Stage(lambda p, q: p + q, name="join"), b, c)
    g.output(d)
    async with Pipeline(g) as pipe:
        res = [y async for y in pipe.stream(range(20), return_exceptions=True)]
        st = check_counts(pipe)
        # That the failed requests left no part parked in the join: tests/unit/test_joins.py.
    for i, r in enumerate(res):
        if i % 2:
            assert isinstance(r, StageError) and r.stage == "strict"
        else:
            assert r == 2 * i + 1
    assert st.failed == 10 and st.completed == 10


async def test_backpressure_submit_waits_and_submit_nowait_sheds():
    gate = asyncio.Event()

    async def held(x):
        await gate.wait()
        return x

    async with Pipeline([held], queue_size=2) as pipe:
        futs = [pipe.submit_nowait(i) for i in range(2)]  # in the queue
        await wait_all_tasks_blocked()  # the worker took one: one slot free again
        futs.append(pipe.submit_nowait(2))
        with pytest.raises(PipelineFull, match="queue_size"):
            pipe.submit_nowait(3)
        admitted = asyncio.Event()

        async def waiter():
            futs.append(await pipe.submit(3))
            admitted.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert not admitted.is_set()
            gate.set()
        assert [await f for f in futs] == [0, 1, 2, 3]


async def test_stream_keeps_a_bounded_number_in_flight():
    peak = 0

    async def watch(x):
        nonlocal peak
        peak = max(peak, pipe.stats().in_flight)
        return x

    pipe = Pipeline([watch, inc], queue_size=4)
    async with pipe:
        n = sum([1 async for _ in pipe.stream(range(5000))])
    assert n == 5000
    # The graph's capacity: (admission + 2 stage inputs + 1 output) queues of 4, + 2 workers.
    assert peak <= 4 * 4 + 2


async def test_closed_pipeline_refuses_work():
    pipe = Pipeline([inc])
    with pytest.raises(PipelineClosed, match="async with"):
        await pipe.send(1)
    async with pipe:
        pass
    with pytest.raises(PipelineClosed):
        await pipe.send(1)
    with pytest.raises(PipelineClosed):
        pipe.submit_nowait(1)
    async with pipe:  # a closed pipeline starts again, as a fresh run
        assert await pipe.send(1) == 2
        with pytest.raises(AsyncnnError, match="already running"):
            await pipe.start()
    assert pipe.stats().run == 2 and pipe.stats().completed == 1


async def test_exit_drains_in_flight_requests():
    async def slowish(x):
        await asyncio.sleep(0)
        return x

    pipe = Pipeline([slowish, double, slowish])
    async with pipe:
        futs = [await pipe.submit(i) for i in range(100)]
    assert [f.result() for f in futs] == [2 * i for i in range(100)]
    assert check_counts(pipe).completed == 100


async def test_aclose_timeout_ends_the_rest_with_pipeline_closed():
    gate = threading.Event()

    def stuck(x):
        gate.wait(5)
        return x

    pipe = Pipeline([Stage(stuck)], queue_size=8)
    async with pipe:
        futs = [pipe.submit_nowait(i) for i in range(5)]
        await wait_all_tasks_blocked()
        closing = asyncio.ensure_future(pipe.aclose(timeout=0.05))
        await asyncio.wait(futs)  # every request ends although the stage is stuck
        gate.set()
        await closing
    for f in futs:
        with pytest.raises(PipelineClosed):
            f.result()
    st = check_counts(pipe)
    assert st.failed == 5


async def test_aclose_from_the_host_task_then_exit_is_a_noop():
    pipe = Pipeline([inc])
    async with pipe:
        assert await pipe.send(1) == 2
        await pipe.aclose()
        assert pipe.state == "closed"
    assert pipe.state == "closed"


async def test_exception_in_body_ends_every_request():
    gate = asyncio.Event()

    async def held(x):
        await gate.wait()
        return x

    pipe = Pipeline([held])
    futs = []
    with pytest.raises(KeyError):
        async with pipe:
            futs = [pipe.submit_nowait(i) for i in range(3)]
            await wait_all_tasks_blocked()
            raise KeyError("user bug")
    for f in futs:
        assert f.done()
        if not f.cancelled():
            assert isinstance(f.exception(), PipelineClosed)
    check_counts(pipe)


async def test_cancelling_the_owner_ends_every_request():
    gate = asyncio.Event()

    async def held(x):
        await gate.wait()
        return x

    pipe = Pipeline([held])
    futs = []
    with anyio.move_on_after(0.05):
        async with pipe:
            futs = [pipe.submit_nowait(i) for i in range(3)]
            await asyncio.Event().wait()
    assert pipe.state == "closed"
    assert all(f.done() for f in futs)
    check_counts(pipe)


async def test_runtime_failure_cancels_everything_and_fails_pending(monkeypatch):
    from tests.fakes import break_worker_after_one_call

    break_worker_after_one_call(monkeypatch, "held")
    gate = asyncio.Event()

    async def held(x):
        await gate.wait()
        return x

    pipe = Pipeline([held, inc])
    futs = []
    with pytest.raises(BaseExceptionGroup) as info:
        async with pipe:
            futs = [pipe.submit_nowait(i) for i in range(3)]
            await wait_all_tasks_blocked()
            gate.set()
            await asyncio.Event().wait()  # the crash must cancel us, not hang
    assert info.group_contains(TypeError, match="runtime bug")
    for f in futs:
        assert isinstance(f.exception(), PipelineClosed)
    check_counts(pipe)


async def test_no_never_retrieved_warning_and_threads_stop(caplog):
    import gc

    def boom(x):
        raise ValueError("x")

    caplog.set_level(logging.ERROR, logger="asyncio")
    async with Pipeline([Stage(boom, workers=3)]) as pipe:
        for i in range(5):
            with pytest.raises(StageError):
                await pipe.send(i)
    gc.collect()  # an unretrieved exception is reported when its future is collected
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncnn:")]


async def test_stats_snapshot():
    pipe = Pipeline([Stage(inc, name="a"), Stage(double, name="b", workers=2)], queue_size=3)
    async with pipe:
        for i in range(4):
            await pipe.send(i)
        st = pipe.stats()
    assert list(st) == ["a", "b"]
    assert st["b"].items == 4 and st["b"].workers == 2 and st["b"].runs_on == "thread"
    assert st["a"].queue_capacity == 3
    with pytest.raises(KeyError, match="no stage named 'zz'"):
        st["zz"]


def test_runs_on_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with Pipeline([inc, double]) as pipe:
            return [y async for y in pipe.stream(range(10))]

    assert uvloop.run(main()) == [(i + 1) * 2 for i in range(10)]
