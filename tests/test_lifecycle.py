"""Start and stop from any task, restart after close, and failures that reach aclose()."""

import asyncio
import sys
import threading

import anyio
import pytest
import pytest_asyncio
import torch
from anyio import wait_all_tasks_blocked

from asyncnn import AsyncnnError, Pipeline, PipelineClosed, Stage

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def inc(x):
    return x + 1


def double(x):
    return x * 2


@pytest_asyncio.fixture
async def pipe():
    # The natural fixture: pytest-asyncio runs its setup and teardown in different tasks.
    async with Pipeline([inc, Stage(double)]) as p:
        yield p


async def test_a_function_scoped_fixture_serves(pipe):
    assert await pipe.send(1) == 4


async def test_a_function_scoped_fixture_serves_again(pipe):
    assert [y async for y in pipe.stream(range(3))] == [2, 4, 6]
    assert pipe.stats().run == 1


async def test_start_and_aclose_from_different_tasks():
    pipe = Pipeline([inc, Stage(double)])
    await asyncio.create_task(pipe.start())
    assert pipe.state == "running"
    assert await asyncio.create_task(pipe.send(3)) == 8
    await asyncio.create_task(pipe.aclose())
    assert pipe.state == "closed"
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncnn:")]


async def test_aenter_then_aclose_without_aexit_stops_everything():
    pipe = Pipeline([inc, Stage(double)])
    with anyio.CancelScope():  # the enclosing scope must still exit cleanly
        await pipe.__aenter__()
        assert await pipe.send(0) == 2
        await pipe.aclose()
    assert pipe.state == "closed"


async def test_cancelling_the_task_that_started_it_does_not_stop_it():
    pipe = Pipeline([inc])
    started = asyncio.Event()

    async def service():
        await pipe.start()
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(service())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pipe.send(1) == 2  # the pipeline's tasks are not the starter's
    await pipe.aclose()


async def test_cancelling_start_itself_leaves_nothing_running():
    pipe = Pipeline([Stage(double)])
    task = asyncio.create_task(pipe.start())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_all_tasks_blocked()
    assert pipe.state in ("new", "closed")
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncnn:")]
    async with pipe:  # and it can still be started
        assert await pipe.send(2) == 4


async def test_a_runtime_failure_outside_async_with_reaches_every_request_and_aclose(
    monkeypatch, caplog
):
    from tests.fakes import break_worker_after_one_call

    break_worker_after_one_call(monkeypatch, "held")
    gate = asyncio.Event()

    async def held(x):
        await gate.wait()
        return x

    pipe = Pipeline([held, inc])
    await pipe.start()
    futs = [pipe.submit_nowait(i) for i in range(3)]
    await wait_all_tasks_blocked()
    gate.set()  # nobody is inside `async with`: the failure must still be seen
    await asyncio.wait(futs)
    for f in futs:
        assert isinstance(f.exception(), PipelineClosed)
        assert isinstance(f.exception().__cause__, TypeError)
    assert pipe.state == "closed"
    with pytest.raises(PipelineClosed):
        await pipe.send(1)
    with pytest.raises(BaseExceptionGroup) as info:
        await pipe.aclose()
    assert info.group_contains(TypeError, match="runtime bug")
    await pipe.aclose()  # raised once; closing again is quiet
    assert "pipeline runtime failed" in caplog.text


async def test_a_closed_pipeline_restarts_as_a_fresh_run():
    pipe = Pipeline([inc, Stage(double, name="d")])
    async with pipe:
        assert await pipe.send(1) == 4
        first = pipe.stats()
    assert first.run == 1 and first.completed == 1
    await pipe.start()
    with pytest.raises(AsyncnnError, match="already running"):
        await pipe.start()
    assert [await pipe.send(i) for i in range(3)] == [2, 4, 6]
    st = pipe.stats()
    assert st.run == 2 and st.admitted == 3 and st["d"].items == 3  # counters start afresh
    await pipe.aclose()


async def test_every_stage_off_the_loop_runs_in_inference_mode():
    first = torch.nn.Linear(4, 4)
    second = torch.nn.Linear(4, 2)

    def head(h):  # a plain function that calls a module on a module stage's output
        return second(h)

    async with Pipeline([Stage(first), Stage(head)]) as pipe:
        y = await pipe.send(torch.randn(3, 4))
    assert y.shape == (3, 2)


async def test_a_stage_can_opt_out_of_inference_mode_for_autograd():
    w = torch.nn.Parameter(torch.ones(2))

    def grad_of(x):
        loss = (w * x).sum()
        (g,) = torch.autograd.grad(loss, w)
        return g

    async with Pipeline([Stage(grad_of, inference_mode=False)]) as pipe:
        g = await pipe.send(torch.tensor([3.0, 4.0]))
    assert g.tolist() == [3.0, 4.0]
    async with Pipeline([Stage(grad_of)]) as pipe:  # the default: no graph is recorded
        with pytest.raises(Exception, match=r"does not require grad|inference"):
            await pipe.send(torch.tensor([3.0, 4.0]))


async def test_a_timeout_says_where_the_request_was():
    async def slow(x):
        await asyncio.sleep(5)
        return x

    async with Pipeline([inc, Stage(slow, name="slow")]) as pipe:
        with pytest.raises(TimeoutError, match=r"timed out after 0\.05 s: it was in stage 'slow'"):
            await pipe.send(1, timeout=0.05)
        await pipe.aclose(timeout=0)
