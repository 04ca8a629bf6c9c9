"""Shutdown under load: close while thousands of requests are in flight and stages are busy.

Every request resolves within the bound, no task or thread survives, and asyncio logs no
"exception was never retrieved"."""

import asyncio
import logging
import threading

import anyio
import pytest
import torch

from asyncnn import Batching, Pipeline, PipelineClosed, Stage

N = 3000


def busy(x):
    return torch.ones(32, 32).matmul(torch.ones(32, 32)).sum() * 0 + x


async def hop(x):
    await asyncio.sleep(0)
    return x


def make():
    return Pipeline(
        [
            Stage(hop, workers=4),
            Stage(busy, workers=2),
            Stage(lambda t: t, name="batched", batch=Batching(max_size=64, max_delay=0.001)),
            Stage(hop, name="out"),
        ],
        queue_size=256,
    )


def x_of(i):
    return torch.full((1, 1), float(i))


def runtime_tasks():
    return [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("asyncnn:")]


def runtime_threads():
    return [t for t in threading.enumerate() if t.name.startswith("asyncnn:")]


async def start_callers(pipe):
    outcomes = {}

    async def caller(i):
        try:
            y = await pipe.send(x_of(i))
            outcomes[i] = "ok" if float(y) == i else "WRONG"
        except PipelineClosed:
            outcomes[i] = "closed"
        except asyncio.CancelledError:
            outcomes[i] = "cancelled"
            raise

    tasks = [asyncio.ensure_future(caller(i)) for i in range(N)]
    for _ in range(50):  # let the pipeline fill up and get busy
        await asyncio.sleep(0)
    return tasks, outcomes


def check(pipe, tasks, outcomes):
    assert all(t.done() for t in tasks)
    assert (
        len(outcomes) + sum(t.cancelled() and i not in outcomes for i, t in enumerate(tasks)) >= N
    )
    assert "WRONG" not in outcomes.values()
    st = pipe.stats()
    assert st.in_flight == 0 and st.admitted == st.completed + st.failed + st.cancelled
    assert not runtime_tasks(), runtime_tasks()
    assert not runtime_threads(), runtime_threads()


@pytest.fixture
def no_unretrieved(caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    assert "exception was never retrieved" not in caplog.text


async def test_normal_exit_drains_every_request(no_unretrieved):
    pipe = make()
    async with pipe:
        tasks, outcomes = await start_callers(pipe)
        admitted_before = pipe.stats().admitted
    # Leaving the block drained: every admitted request finished with its result; callers
    # still waiting for admission were refused with PipelineClosed.
    await asyncio.gather(*tasks)
    st = pipe.stats()
    assert st.admitted >= admitted_before > 0
    assert st.completed == st.admitted and st.failed == 0
    assert list(outcomes.values()).count("ok") == st.admitted
    check(pipe, tasks, outcomes)


async def test_aclose_timeout_bounds_the_close(no_unretrieved):
    pipe = make()
    async with pipe:
        tasks, outcomes = await start_callers(pipe)
        await pipe.aclose(timeout=0.01)
        # aclose returned while stages were still busy: everything in flight ended now.
        assert pipe.state == "closed" and pipe.stats().in_flight == 0
        await asyncio.gather(*tasks, return_exceptions=True)
    assert "closed" in outcomes.values()
    check(pipe, tasks, outcomes)


async def test_cancelling_the_owner_task(no_unretrieved):
    pipe = make()
    state = {}
    loaded = asyncio.Event()

    async def owner():
        async with pipe:
            state["tasks"], state["outcomes"] = await start_callers(pipe)
            loaded.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(owner())
    await loaded.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with anyio.fail_after(5):
        await asyncio.gather(*state["tasks"], return_exceptions=True)
    check(pipe, state["tasks"], state["outcomes"])


async def test_an_exception_inside_async_with(no_unretrieved):
    pipe = make()
    state = {}
    with pytest.raises(RuntimeError, match="app crashed"):
        async with pipe:
            state["tasks"], state["outcomes"] = await start_callers(pipe)
            raise RuntimeError("app crashed")
    with anyio.fail_after(5):
        await asyncio.gather(*state["tasks"], return_exceptions=True)
    check(pipe, state["tasks"], state["outcomes"])


@pytest.mark.gpu
async def test_close_under_load_with_cuda_stages(no_unretrieved):
    model = torch.nn.Linear(256, 256).cuda()
    pipe = Pipeline(
        [Stage(model, device="cuda:0", batch=Batching(max_size=64, max_delay=0.001))],
        queue_size=256,
    )
    outcomes = {}

    async def caller(i):
        try:
            await pipe.send(torch.randn(1, 256))
            outcomes[i] = "ok"
        except PipelineClosed:
            outcomes[i] = "closed"

    async with pipe:
        tasks = [asyncio.ensure_future(caller(i)) for i in range(N)]
        for _ in range(50):
            await asyncio.sleep(0)
        await pipe.aclose(timeout=0.01)
        await asyncio.gather(*tasks)
    assert set(outcomes.values()) <= {"ok", "closed"} and len(outcomes) == N
    assert not runtime_threads()
