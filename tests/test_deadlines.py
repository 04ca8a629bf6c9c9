"""Deadlines, priorities and admission control end to end, through the public API only."""

import asyncio
import math
import os
import sys
import threading
import time

import anyio
import numpy as np
import pytest
import torch

from asyncnn import Batching, Graph, Overloaded, Pipeline, PipelineFull, Stage
from asyncnn.metrics import collector
from asyncnn.runtime.supervisor import ACCELERATOR_NICE, Supervisor


def prometheus_text(pipe):
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector(pipe))
    return generate_latest(registry).decode()


async def until(cond):
    with anyio.fail_after(5):
        while not cond():  # noqa: ASYNC110 - polled: a thread may change it
            await asyncio.sleep(0.001)


def gated(name, seen):
    """An async stage that records what it computes and holds its first call on a gate."""
    gate = asyncio.Event()

    async def fn(x):
        seen.append(x)
        if len(seen) == 1:
            await gate.wait()
        return x

    return Stage(fn, name=name, workers=1), gate


def recorder(name, seen):
    def fn(x):
        seen.append(x)
        return x

    return Stage(fn, name=name, executor="inline")


async def test_priority_orders_every_queue_and_survives_every_hop():
    first, second, third = [], [], []
    a, gate = gated("a", first)
    b_seen = []
    b, gate_b = gated("b", b_seen)
    async with Pipeline([a, b, recorder("c", third)]) as pipe:
        blocker = asyncio.ensure_future(pipe.send(-1))
        await until(lambda: first == [-1])
        sends = [asyncio.ensure_future(pipe.send(i, priority=1)) for i in range(5)]
        sends += [asyncio.ensure_future(pipe.send(10 + i, priority=0)) for i in range(5)]
        await asyncio.sleep(0.01)
        gate.set()  # stage a now serves its queue; b holds its first call, so b's queue fills
        await until(lambda: len(first) == 11)
        gate_b.set()
        assert sorted(await asyncio.gather(blocker, *sends)) == sorted(
            [-1, *range(5), *range(10, 15)]
        )
        second = b_seen
    urgent_first = [10, 11, 12, 13, 14, 0, 1, 2, 3, 4]
    assert first[1:] == urgent_first
    assert second[1:] == urgent_first
    assert third[1:] == urgent_first


async def test_an_urgent_request_passes_a_full_queue_behind_the_input_fan_out():
    # The input goes to two stages (a join after): an input task sends each request to both.
    # With stage a's queue full of normal requests and the input task holding one more, an
    # urgent request goes straight into a's queue (it outranks what waits there) and is
    # computed next, not after the requests that were ahead of it in admission.
    seen, beside = [], []
    a, gate = gated("a", seen)
    g = Graph()
    x = g.input()
    joined = g.add(
        Stage(lambda p, q: p, name="join", executor="inline"),
        g.add(a, x),
        g.add(recorder("b", beside), x),
    )
    g.output(joined)
    async with Pipeline(g, queue_size=2) as pipe:
        blocker = asyncio.ensure_future(pipe.send(-1))
        await until(lambda: seen == [-1])
        normal = [asyncio.ensure_future(pipe.send(i, priority=1)) for i in range(6)]
        await until(lambda: beside == [-1, 0, 1])  # 0, 1 in a's queue; the input task holds 2
        await asyncio.sleep(0.01)
        urgent = asyncio.ensure_future(pipe.send(100, priority=0))
        await until(lambda: 100 in beside)  # it went past admission's queue
        gate.set()
        assert await urgent == 100
        assert await asyncio.gather(blocker, *normal) == [-1, *range(6)]
        stats = pipe.stats()
    assert seen == [-1, 100, 0, 1, 2, 3, 4, 5]
    assert stats.completed == 8 and stats.in_flight == 0


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_an_urgent_request_is_not_held_back_by_a_stage_blocked_on_a_full_next_queue(kind):
    # a -> b, b holding its first call: b's queue fills with normal requests and a's worker
    # waits with one more in hand. An urgent request arriving at a lets that one past b's
    # bound and goes through a at once, so b computes it next (it came after three of them).
    seen = []
    b, gate = gated("b", seen)

    async def a_async(x):
        return x

    a = Stage(a_async if kind == "async" else (lambda x: x), name="a", workers=1)
    async with Pipeline([a, b], queue_size=2) as pipe:
        blocker = asyncio.ensure_future(pipe.send(-1))
        await until(lambda: seen == [-1])
        normal = [asyncio.ensure_future(pipe.send(i, priority=1)) for i in range(6)]
        await until(lambda: pipe.stats()["b"].queue_depth == 2)
        await asyncio.sleep(0.02)  # a's worker waits for room with its next output in hand
        urgent = asyncio.ensure_future(pipe.send(100, priority=0))
        await until(lambda: pipe.stats()["b"].queue_depth >= 4)  # past the bound: 2 + 100
        gate.set()
        assert await urgent == 100
        assert await asyncio.gather(blocker, *normal) == [-1, *range(6)]
    assert seen[:2] == [-1, 100] and sorted(seen[2:]) == list(range(6))


async def test_a_lower_number_is_more_urgent_and_negative_priorities_work():
    seen = []
    a, gate = gated("a", seen)
    async with Pipeline([a]) as pipe:
        blocker = asyncio.ensure_future(pipe.send("first"))
        await until(lambda: seen == ["first"])
        calls = [asyncio.ensure_future(pipe.send(p, priority=p)) for p in (3, 0, -2, 1)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(blocker, *calls)
    assert seen == ["first", -2, 0, 1, 3]


async def test_earliest_deadline_first_within_a_class():
    seen = []
    a, gate = gated("a", seen)
    async with Pipeline([a]) as pipe:
        blocker = asyncio.ensure_future(pipe.send("first"))
        await until(lambda: seen == ["first"])
        calls = [asyncio.ensure_future(pipe.send(t, timeout=t)) for t in (9.0, 3.0, 5.0)]
        calls.append(asyncio.ensure_future(pipe.send("none")))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(blocker, *calls)
    assert seen == ["first", 3.0, 5.0, 9.0, "none"]


async def test_a_request_past_its_deadline_never_reaches_compute_through_a_join_and_a_batch():
    computed = {"b": [], "c": [], "d": []}
    gate = threading.Event()

    def a(x):
        if x[0, 0].item() == 0:
            gate.wait(5)
        return x

    def branch(name):
        def fn(x):
            computed[name].extend(x[:, 0].tolist())
            return x

        return Stage(fn, name=name)

    def d(p, q):
        computed["d"].extend(p[:, 0].tolist())
        return p + q

    g = Graph()
    x = g.input()
    ha = g.add(Stage(a, name="a"), x)
    hb = g.add(branch("b"), ha)
    hc = g.add(branch("c"), ha)
    hd = g.add(Stage(d, name="d", batch=Batching(max_size=8, max_delay=0.001)), hb, hc)
    g.output(hd)
    async with Pipeline(g) as pipe:
        held = asyncio.ensure_future(pipe.send(torch.zeros(1, 2)))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(
            TimeoutError, match=r"timed out after 0\.05 s: it was queued for stage 'a'"
        ):
            await pipe.send(torch.ones(1, 2), timeout=0.05)
        waited = time.monotonic() - t0
        gate.set()
        assert (await held).sum().item() == 0
        ok = await pipe.send(torch.full((1, 2), 2.0), timeout=5)
        assert ok[0, 0].item() == 4.0
        stats = pipe.stats()
    assert waited < 1.0  # ended at its deadline, not when the held call let go
    assert 1.0 not in computed["b"] + computed["c"] + computed["d"]
    assert computed["d"] == [0.0, 2.0]
    assert stats.timed_out == 1 and stats.cancelled == 1 and stats.completed == 2


async def test_a_stage_ends_a_request_whose_time_left_is_below_its_service_time():
    def slow(x):
        time.sleep(0.02)
        return x

    async with Pipeline([Stage(slow, name="slow", executor="thread")]) as pipe:
        for i in range(10):  # the stage learns it needs ~20 ms a call
            await pipe.send(i)
        blocked = pipe.submit_nowait(100)  # occupies the stage ~20 ms
        await until(lambda: pipe.stats()["slow"].running == 1)
        with pytest.raises(TimeoutError, match=r"stage 'slow' \((expired|hopeless)\)"):
            await pipe.send(1, timeout=0.025)
        await blocked
        st = pipe.stats()["slow"]
    assert st.items == 11  # the late request was not computed
    assert sum(st.deadline_misses.values()) == 1


async def test_a_fixed_max_delay_longer_than_a_timeout_does_not_hold_the_request_to_death():
    # max_delay=2 s is the most a batch is held for more to arrive: a lone request with a
    # 0.3 s timeout is released for its deadline (before any call is measured: at once; after:
    # once holding it longer would cost the call it needs), not held until it times out.
    spec = Batching(max_size=8, max_delay=20.0)
    async with Pipeline([Stage(lambda t: t * 2, name="double", batch=spec)]) as pipe:
        assert torch.equal(await pipe.send(torch.ones(1, 2), timeout=0.3), torch.full((1, 2), 2.0))
        for _ in range(10):  # full batches: the stage measures its calls
            await asyncio.gather(*(pipe.send(torch.ones(1, 2)) for _ in range(8)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert torch.equal(await pipe.send(torch.ones(1, 2), timeout=1.0), torch.full((1, 2), 2.0))
        took = loop.time() - start
        st = pipe.stats()["double"]
    assert took > 0.5  # held for more to arrive while it could afford to (~0.95 s)
    assert st.released_deadline == 2 and st.released_full == 10


async def test_submit_nowait_and_submit_end_their_futures_at_the_deadline():
    seen = []
    a, gate = gated("a", seen)
    async with Pipeline([a]) as pipe:
        blocker = asyncio.ensure_future(pipe.send(0))
        await until(lambda: seen == [0])
        fut = pipe.submit_nowait(1, timeout=0.02, priority=2)
        fut2 = await pipe.submit(2, timeout=0.02)
        with pytest.raises(TimeoutError):
            await fut
        with pytest.raises(TimeoutError):
            await fut2
        gate.set()
        await blocker
        assert pipe.stats().timed_out == 2
    assert seen == [0]


async def test_a_streams_timeout_ends_it_after_the_parts_delivered():
    async def parts(x):
        for i in range(100):
            yield i
            await asyncio.sleep(0.01)

    async with Pipeline([Stage(parts)]) as pipe:
        got = []
        with pytest.raises(TimeoutError):
            async for p in pipe.send_stream(0, timeout=0.1):
                got.append(p)
        assert 1 <= len(got) < 100 and got == list(range(len(got)))
        await until(lambda: pipe.stats().in_flight == 0)
        assert pipe.stats().timed_out == 1


async def test_max_in_flight_refuses_with_overloaded_and_retry_after():
    seen = []
    a, gate = gated("a", seen)
    async with Pipeline([a], max_in_flight=3) as pipe:
        held = [asyncio.ensure_future(pipe.send(i)) for i in range(3)]
        await until(lambda: seen == [0])
        with pytest.raises(Overloaded, match="max_in_flight=3") as info:
            await pipe.send(9)
        assert isinstance(info.value, PipelineFull) and info.value.retry_after > 0
        with pytest.raises(Overloaded):
            pipe.submit_nowait(9)
        gate.set()
        assert await asyncio.gather(*held) == [0, 1, 2]
        assert await pipe.send(3) == 3
        st = pipe.stats()
    assert st.overloaded == 2 and st.admitted == 4


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_stream_waits_its_turn_under_max_in_flight_instead_of_failing(ordered):
    # stream() sized its window by the queues (64 here), past max_in_flight: its 5th item was
    # refused and the stream ended with Overloaded. Now it waits for room, alone or while
    # other callers hold the slots.
    def work(x):
        time.sleep(0.001)
        return x * 2

    async with Pipeline([Stage(work, name="w", workers=2)], max_in_flight=4, queue_size=64) as pipe:
        got = [y async for y in pipe.stream(range(30), ordered=ordered)]
        assert sorted(got) == [2 * i for i in range(30)]

        async def other_caller(k):  # sends while the stream runs: may be refused, never hangs
            for _ in range(20):
                try:
                    assert await pipe.send(1000 + k) == 2 * (1000 + k)
                except Overloaded:
                    await asyncio.sleep(0.001)

        others = [asyncio.ensure_future(other_caller(k)) for k in range(3)]
        got = [y async for y in pipe.stream(range(50), ordered=ordered)]
        await asyncio.gather(*others)
        assert sorted(got) == [2 * i for i in range(50)]
        if ordered:
            assert got == [2 * i for i in range(50)]
        assert pipe.stats().in_flight == 0


async def test_overloaded_at_once_when_the_work_ahead_cannot_finish_by_the_deadline():
    def slow(x):
        time.sleep(0.01)  # at most 100 requests/s
        return x

    async with Pipeline([Stage(slow, name="slow", executor="thread")], max_in_flight=1000) as pipe:
        warm = [asyncio.ensure_future(pipe.send(i)) for i in range(20)]
        await asyncio.gather(*warm)  # the pipeline has measured how fast requests end
        backlog = [asyncio.ensure_future(pipe.send(i)) for i in range(30)]
        await asyncio.sleep(0.06)  # a rate sample while busy
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="past its deadline") as info:
            await pipe.send(99, timeout=0.05)  # 20+ ahead at <= 100/s: >= 0.2 s
        assert time.monotonic() - t0 < 0.05  # refused at once, not after queueing
        assert info.value.retry_after > 0
        assert await pipe.send(7, timeout=60) == 7  # a loose deadline is admitted
        await asyncio.gather(*backlog)


async def test_admission_counts_the_full_batch_an_urgent_request_would_ride_in():
    """Behind a batching stage busy with full batches, an urgent request (nothing as urgent
    ahead of it) still rides in a full batch's call: with less time than that call it is
    refused at once, not admitted to end hopeless. An idle stage would run it alone: the
    same timeout is then admitted and answered."""

    def model(x):
        time.sleep(0.003 * x.shape[0])  # a full batch of 16: ~48 ms; one row: ~3 ms
        return x + 1

    spec = Batching(max_size=16, max_delay="auto")
    stage = Stage(model, name="m", batch=spec, executor="thread")
    async with Pipeline([stage], max_in_flight=1000) as pipe:
        row = torch.zeros(1, 2)
        alone = [await pipe.send(row) for _ in range(10)]  # measured: one row a call
        assert all(torch.equal(y, row + 1) for y in alone)
        backlog = [asyncio.ensure_future(pipe.send(row, priority=1)) for _ in range(200)]
        await asyncio.gather(*backlog[:176])  # 11 full batches measured; 24 still in flight
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="past its deadline"):
            await pipe.send(row, timeout=0.02, priority=0)  # less than a full batch's call
        assert time.monotonic() - t0 < 0.02  # refused at once
        await asyncio.gather(*backlog)
        await asyncio.sleep(0.1)  # idle again: the next request runs alone
        assert torch.equal(await pipe.send(row, timeout=0.02, priority=0), row + 1)


async def test_auto_batching_answers_correctly_and_says_why_it_released():
    def model(x):
        return x * 2

    spec = Batching(max_size=16, max_delay="auto")
    async with Pipeline([Stage(model, name="m", batch=spec)]) as pipe:
        xs = [torch.full((1, 3), float(i)) for i in range(200)]
        ys = await asyncio.gather(*(pipe.send(x, timeout=5) for x in xs))
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(y, x * 2)
        st = pipe.stats()["m"]
        text = prometheus_text(pipe)
    reasons = (
        st.released_full,
        st.released_preferred,
        st.released_deadline,
        st.released_idle,
        st.released_delay,
        st.released_drain,
    )
    assert sum(reasons) == st.batches and st.rows == 200
    assert st.slack_p99 > 0 and st.priority_inversions == 0
    assert 'asyncnn_stage_released_batches_total{reason="idle",stage="m"}' in text
    assert 'asyncnn_stage_deadline_misses_total{reason="expired",stage="m"}' in text
    assert "asyncnn_requests_timed_out_total 0.0" in text
    assert "asyncnn_requests_overloaded_total 0.0" in text
    # Slack at dispatch, a histogram: every request had at most its 5 s left, none 1 ms or less.
    assert "# TYPE asyncnn_stage_slack_seconds histogram" in text
    assert 'asyncnn_stage_slack_seconds_bucket{le="5",stage="m"} 200.0' in text
    assert 'asyncnn_stage_slack_seconds_bucket{le="0.001",stage="m"} 0.0' in text
    assert 'asyncnn_stage_slack_seconds_count{stage="m"} 200.0' in text
    assert st.slack_count == 200 and 0 < st.slack_sum <= 200 * 5


async def test_bad_timeouts_and_priorities_are_refused_before_admission():
    async with Pipeline([recorder("a", [])]) as pipe:
        with pytest.raises(TypeError, match="priority=True"):
            await pipe.send(1, priority=True)
        with pytest.raises(ValueError, match="timeout=-1"):
            await pipe.send(1, timeout=-1)
        for priority in (2**31, -(2**31) - 1, 10**400):  # aging could not count such levels
            with pytest.raises(ValueError, match="out of range"):
                await pipe.send(1, priority=priority)
        assert pipe.stats().admitted == 0
        assert await pipe.send(1, priority=-(2**31)) == await pipe.send(2, priority=2**31 - 1) - 1
        for priority in (None, 0.0, False):  # the default is the int 0, not whatever is falsy
            with pytest.raises(TypeError, match="whole number"):
                await pipe.send(1, priority=priority)
        assert await pipe.send(3, priority=np.int64(1), timeout=np.float32(5.0)) == 3  # numpy's
    with pytest.raises(ValueError, match="aging"):
        Pipeline([recorder("a", [])], aging=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        Pipeline([recorder("a", [])], max_in_flight=0)


def far_off_pipelines():
    """Every stage kind a deadline passes through: plain, fixed and paced batching, a join."""
    auto = Batching(max_size=8, max_delay="auto")
    yield Pipeline([Stage(lambda t: t + 1, name="plain")], max_in_flight=64)
    yield Pipeline([Stage(lambda t: t + 1, name="fixed", batch=Batching(max_size=8))])
    yield Pipeline([Stage(lambda t: t + 1, name="auto", batch=auto)], max_in_flight=64)
    g = Graph()
    x = g.input()
    a = g.add(Stage(lambda t: t + 1, name="a", batch=auto), x)
    b = g.add(Stage(lambda t: t * 0, name="b"), x)
    g.output(g.add(Stage(lambda p, q: p + q, name="join"), a, b))
    yield Pipeline(g, max_in_flight=64)


async def test_an_infinite_or_far_off_timeout_never_breaks_the_pipeline():
    # timeout=math.inf means no deadline (as for asyncio and anyio); a finite one ~forever
    # away is a deadline like any other. Either once ended the run for every request (a
    # stage's slack histogram and the pacer took the time left as a number of buckets / rows).
    for pipe in far_off_pipelines():
        async with pipe:
            for timeout in (math.inf, 1e300, sys.float_info.max):
                xs = [torch.full((1, 2), float(i)) for i in range(20)]
                sent = [pipe.send(x, timeout=timeout, priority=i % 2) for i, x in enumerate(xs)]
                for x, y in zip(xs, await asyncio.gather(*sent), strict=True):
                    assert torch.equal(y, x + 1)
            assert await pipe.send(torch.zeros(1, 2), timeout=5.0) is not None
            st = pipe.stats()
        assert st.completed == st.admitted == 61 and st.timed_out == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
async def test_compute_threads_yield_the_cpu_to_the_loop():
    def priority(x):
        tid = threading.get_native_id()
        return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)

    base = priority(0)
    async with Pipeline([Stage(priority, executor="thread")]) as pipe:  # default: niceness + 10
        assert await pipe.send(0) == (base[0], min(19, base[1] + 10))
    async with Pipeline([Stage(priority, executor="thread")], compute_nice="idle") as pipe:
        assert await pipe.send(0) == (os.SCHED_IDLE, base[1])
    async with Pipeline([Stage(priority, executor="thread")], compute_nice=0) as pipe:
        assert await pipe.send(0) == base
    assert priority(0) == base  # the loop's thread is left alone
    for bad in (-1, "low", True, 2.5):
        with pytest.raises(ValueError, match="compute_nice"):
            Pipeline([Stage(priority)], compute_nice=bad)


async def test_threads_that_feed_an_accelerator_are_never_in_the_idle_class():
    """A launching thread in the idle class would wait behind every busy thread while the
    device starves: under ``"idle"`` it gets a niceness instead (decided by the supervisor)."""

    async with anyio.create_task_group() as tg:
        sup = Supervisor(tg, None, "idle")
        cpu, accel = sup.thread("cpu"), sup.thread("gpu", accelerator=True)
        waiter = sup.thread("wait", compute=False)
        await sup.stop_threads(5.0)
    assert [cpu._nice, accel._nice, waiter._nice] == ["idle", ACCELERATOR_NICE, 0]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_many_deadlines_each_end_their_request_at_its_own_time(loop_kind):
    """One timer serves every deadline of a run: requests held at a gate end in deadline order,
    none before its deadline (uvloop: within its millisecond timers), the rest unaffected."""
    timeouts = [0.05, 0.01, 0.03, 0.02, 0.04]

    async def main():
        seen = []
        a, gate = gated("a", seen)
        loop = asyncio.get_running_loop()
        ended = {}
        async with Pipeline([a], queue_size=16) as pipe:
            blocker = asyncio.ensure_future(pipe.send("first"))
            await until(lambda: seen == ["first"])

            async def one(i, seconds):
                start = loop.time()
                with pytest.raises(TimeoutError):
                    await pipe.send(i, timeout=seconds)
                ended[i] = loop.time() - start

            free = asyncio.ensure_future(pipe.send("no deadline"))
            with anyio.fail_after(5):
                await asyncio.gather(*(one(i, t) for i, t in enumerate(timeouts)))
            gate.set()
            assert await blocker == "first" and await free == "no deadline"
            assert pipe.stats().timed_out == len(timeouts)
        return ended

    if loop_kind == "uvloop":
        ended = pytest.importorskip("uvloop").run(main())
        early = 0.0015  # its clock and timers count whole milliseconds
    else:
        ended = asyncio.run(main())
        early = 0.0
    order = sorted(range(len(timeouts)), key=lambda i: ended[i])
    assert order == sorted(range(len(timeouts)), key=lambda i: timeouts[i])
    for i, t in enumerate(timeouts):
        assert ended[i] >= t - early
