"""Events, stats, Prometheus, graph export and the stall watchdog."""

import asyncio
import itertools
import logging
import threading
import urllib.request

import pytest
import torch
from anyio import wait_all_tasks_blocked

import asyncnn
from asyncnn import Batching, Graph, Pipeline, Stage
from asyncnn.events import Watchdog


async def inc(x):
    return x + 1


def picky(x):
    if x == 3:
        raise ValueError("no threes")
    return x


async def test_scripted_run_emits_events_in_order():
    seen = []
    pipe = Pipeline([Stage(inc), Stage(picky)])
    sub = pipe.events.subscribe(seen.append)
    async with pipe:
        assert await pipe.send(0) == 1
        with pytest.raises(asyncnn.StageError):
            await pipe.send(2)
    kinds = [e.kind for e in seen]
    assert kinds[:2] == ["stage_started", "stage_started"]
    assert [e.stage for e in seen[:2]] == ["inc", "picky"]
    assert kinds[2:] == [
        "batch_done",  # inc(0)
        "batch_done",  # picky(1)
        "batch_done",  # inc(2)
        "request_failed",  # picky(3)
        "pipeline_closed",
    ]
    done = seen[2]
    assert done.stage == "inc" and done.size == 1 and done.seconds >= 0
    failed = seen[5]
    assert failed.stage == "picky" and failed.error == "ValueError" and failed.requests == 1
    closed = seen[-1]
    assert closed.stage is None and (closed.admitted, closed.completed, closed.failed) == (2, 1, 1)
    assert all(a.time <= b.time for a, b in itertools.pairwise(seen))
    with pytest.raises(AttributeError, match="has no field 'nope'"):
        _ = done.nope
    sub.unsubscribe()


async def test_batch_formed_reasons_and_kind_filter():
    seen = []
    pipe = Pipeline([Stage(lambda x: x, name="m", batch=Batching(max_size=2, max_delay=30))])
    pipe.events.subscribe(seen.append, kinds=["batch_formed"])
    async with pipe:
        futs = [pipe.submit_nowait(torch.zeros(1, 1)) for _ in range(3)]
        await asyncio.gather(*futs[:2])
    await asyncio.gather(*futs)
    assert [(e.kind, e.size, e.reason) for e in seen] == [
        ("batch_formed", 2, "full"),
        ("batch_formed", 1, "drain"),
    ]


async def test_unsubscribe_stops_delivery_and_turns_hooks_off():
    seen = []
    pipe = Pipeline([inc])
    async with pipe:
        with pipe.events.subscribe(seen.append, kinds="batch_done"):
            assert pipe.events.active
            await pipe.send(1)
        assert not pipe.events.active
        await pipe.send(2)
    assert len(seen) == 1


async def test_async_callback_and_bad_callbacks_do_not_break_the_pipeline(caplog):
    got = []

    async def on_event(ev):
        await asyncio.sleep(0)
        got.append(ev.kind)

    def broken(ev):
        raise RuntimeError("listener bug")

    pipe = Pipeline([inc])
    pipe.events.subscribe(on_event, kinds="batch_done")
    pipe.events.subscribe(broken, kinds="batch_done")
    with caplog.at_level(logging.ERROR, logger="asyncnn"):
        async with pipe:
            assert await pipe.send(1) == 2
    assert got == ["batch_done"]
    assert "listener bug" in caplog.text


async def test_listener_with_a_full_buffer_drops_the_oldest_and_counts():
    pipe = Pipeline([inc])
    listener = pipe.events.listen(kinds="batch_done", buffer=3)
    async with pipe:
        for i in range(10):
            await pipe.send(i)
    got = [ev async for ev in listener]  # ends when the pipeline closes, whatever the kinds
    assert listener.dropped == 7
    assert len(got) == 3


async def test_listener_ends_when_the_pipeline_closes():
    pipe = Pipeline([inc])
    listener = pipe.events.listen()
    kinds = []

    async def read():
        async for ev in listener:
            kinds.append(ev.kind)

    async with pipe:
        reader = asyncio.ensure_future(read())
        await pipe.send(1)
    await reader
    assert kinds[0] == "stage_started" and kinds[-1] == "pipeline_closed"


def test_unknown_event_kind():
    with pytest.raises(ValueError, match="unknown event kind"):
        Pipeline([inc]).events.subscribe(print, kinds=["batch_dnoe"])


async def test_backpressure_event_and_blocked_time():
    gate = asyncio.Event()
    seen = []

    async def held(x):
        await gate.wait()
        return x

    pipe = Pipeline([Stage(inc, name="fast"), Stage(held, name="slow")], queue_size=1)
    pipe.events.subscribe(seen.append, kinds="backpressure")
    async with pipe:
        futs = [await pipe.submit(i) for i in range(4)]
        await wait_all_tasks_blocked()
        gate.set()
        await asyncio.gather(*futs)
        st = pipe.stats()
    assert seen and seen[0].stage == "fast" and seen[0].seconds > 0
    assert st["fast"].blocked_seconds > 0


async def test_stats_figures():
    def work(x):
        return torch.ones(64, 64) @ torch.ones(64, 64)

    pipe = Pipeline([Stage(work, name="work"), Stage(inc, name="light")])
    async with pipe:
        async for _ in pipe.stream(range(50)):
            pass
        st = pipe.stats()
    w = st["work"]
    assert w.items == 50 and w.batches == 50 and w.running == 0
    assert 0 < w.busy_fraction <= 1.5
    assert 0 < w.latency_p50 <= w.latency_p90 <= w.latency_p99
    assert st["light"].latency_p50 > 0  # sampled on the loop, still there
    assert st.admitted == st.completed == 50 and st.in_flight == 0


def test_latency_histogram_quantiles():
    from asyncnn.runtime.probe import LatencyHistogram

    h = LatencyHistogram()
    for ms in range(1, 101):
        h.add(ms / 1000)
    assert h.quantile(0.5) == pytest.approx(0.050, rel=0.1)
    assert h.quantile(0.99) == pytest.approx(0.099, rel=0.1)
    assert LatencyHistogram().quantile(0.5) == 0.0


async def test_prometheus_text_parses():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    pipe = Pipeline([Stage(inc, name="a"), Stage(picky, name="b")])
    async with pipe:
        await pipe.send(0)
        with pytest.raises(asyncnn.StageError):
            await pipe.send(2)
        registry = CollectorRegistry()
        registry.register(asyncnn.metrics.collector(pipe))
        text = generate_latest(registry).decode()
        server = asyncnn.metrics.serve_prometheus(pipe, port=0)
        try:
            assert server.url.startswith("http://127.0.0.1:")
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(server.url).read())
        finally:
            server.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    items = {
        s.labels["stage"]: s.value
        for s in families["asyncnn_stage_items"].samples
        if s.name.endswith("_total")
    }
    assert items == {"a": 2.0, "b": 1.0}
    outcomes = {
        s.labels["outcome"]: s.value
        for s in families["asyncnn_requests"].samples
        if s.name.endswith("_total")
    }
    assert outcomes == {"admitted": 2.0, "completed": 1.0, "failed": 1.0, "cancelled": 0.0}
    assert "asyncnn_stage_latency_seconds" in families
    assert "asyncnn_stage_items_total" in body.decode()


def test_mermaid_and_dot_for_a_dag():
    g = Graph()
    x = g.input()
    a = g.add(Stage(inc, name="embed"), x)
    b = g.add(Stage(torch.nn.ReLU(), name="left", device="cpu", workers=2), a)
    c = g.add(Stage(lambda v: v, name="right", batch=Batching(max_size=32, max_delay=0.002)), a)
    d = g.add(Stage(lambda p, q: p, name="join"), b, c)
    g.output(d)
    pipe = Pipeline(g, queue_size=8)
    mm = pipe.to_mermaid()
    assert mm.startswith("flowchart LR")
    assert "input([input])" in mm and "output([output])" in mm
    assert "left<br/>thread x2<br/>cpu" in mm and "batch 32 / 2 ms" in mm
    for edge in (
        "input -->|q8| s0",
        "s0 -->|q8| s1",
        "s0 -->|q8| s2",
        "s1 -->|q8| s3",
        "s2 -->|q8| s3",
        "s3 -->|q8| output",
    ):
        assert edge in mm, edge
    dot = pipe.to_dot()
    assert dot.startswith("digraph asyncnn {") and dot.rstrip().endswith("}")
    assert 's3 -> output [label="q8"];' in dot and "join" in dot


def test_watchdog_decides_with_an_injected_clock():
    wd = Watchdog(2.0)
    assert not wd.check(now=0.0, progress=5, in_flight=3)
    assert not wd.check(now=1.9, progress=5, in_flight=3)
    assert wd.check(now=2.0, progress=5, in_flight=3)  # no progress for 2 s with work waiting
    assert not wd.check(now=9.0, progress=5, in_flight=3)  # reported once per stall
    assert not wd.check(now=9.5, progress=6, in_flight=3)  # progress resets it
    assert not wd.check(now=20.0, progress=6, in_flight=0)  # idle is not a stall
    with pytest.raises(ValueError):
        Watchdog(0)


async def test_watchdog_names_the_stage_that_hangs(caplog):
    release = threading.Event()

    def hangs(x):
        release.wait(10)
        return x

    pipe = Pipeline([Stage(inc, name="front"), Stage(hangs, name="stuck")], stall_timeout=0.05)
    listener = pipe.events.listen(kinds="stall")
    with caplog.at_level(logging.WARNING, logger="asyncnn"):
        async with pipe:
            fut = pipe.submit_nowait(1)
            stall = await listener.__anext__()
            release.set()
            assert await fut == 2
    assert stall.stage == "stuck" and stall.where == "running in the stage"
    assert stall.input_empty is True and stall.output_full is False
    assert "stage 'stuck' holds the oldest request" in caplog.text


async def test_watchdog_names_an_async_stage_that_hangs():
    release = asyncio.Event()

    async def hangs(x):
        await release.wait()
        return x

    pipe = Pipeline([Stage(inc, name="front"), Stage(hangs, name="waits")], stall_timeout=0.05)
    listener = pipe.events.listen(kinds="stall")
    async with pipe:
        fut = pipe.submit_nowait(1)
        stall = await listener.__anext__()
        release.set()
        assert await fut == 2
    assert stall.stage == "waits" and stall.calls_running == 1
