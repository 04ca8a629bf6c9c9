"""OpenTelemetry spans, read back from the SDK's in-memory exporter."""

import asyncio
import threading

import pytest
import torch

from asyncnn import Batching, Graph, Pipeline, PipelineClosed, Stage, StageError

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode


@pytest.fixture
def otel():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def named(spans, prefix):
    return [s for s in spans if s.name.startswith(prefix)]


def children(spans, parent):
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def inc(x):
    return x + 1


async def test_a_chain_request_is_a_child_of_the_callers_span_with_a_span_per_stage(otel):
    tracer, exporter = otel
    pipe = Pipeline(
        [Stage(inc, name="a"), Stage(inc, name="b"), Stage(inc, name="c")], tracing=tracer
    )
    async with pipe:
        with tracer.start_as_current_span("handler") as handler:
            assert await pipe.send(1) == 4
    spans = exporter.get_finished_spans()
    (req,) = named(spans, "asyncnn.request")
    assert req.parent.span_id == handler.get_span_context().span_id
    assert req.status.status_code == StatusCode.OK and req.attributes["asyncnn.outcome"] == "ok"
    stages = children(spans, req)
    assert [s.attributes["asyncnn.stage"] for s in sorted(stages, key=lambda s: s.start_time)] == [
        "a",
        "b",
        "c",
    ]
    for s in stages:
        assert (
            s.attributes["asyncnn.queue_seconds"] >= 0 and s.attributes["asyncnn.run_seconds"] >= 0
        )
        assert req.start_time <= s.start_time <= s.end_time <= req.end_time


async def test_fan_out_and_fan_in_each_branch_has_its_stage_span(otel):
    tracer, exporter = otel
    g = Graph()
    x = g.input()
    a = g.add(Stage(inc, name="a"), x)
    b = g.add(Stage(inc, name="b"), a)
    c = g.add(Stage(inc, name="c"), a)
    d = g.add(Stage(lambda p, q: p + q, name="d"), b, c)
    g.output(d)
    async with Pipeline(g, tracing=tracer) as pipe:
        assert await pipe.send(0) == 4
    spans = exporter.get_finished_spans()
    (req,) = named(spans, "asyncnn.request")
    assert sorted(s.attributes["asyncnn.stage"] for s in children(spans, req)) == [
        "a",
        "b",
        "c",
        "d",
    ]


async def test_a_batch_span_links_every_request_it_carried(otel):
    tracer, exporter = otel
    spec = Batching(max_size=8, max_delay=0.05)
    async with Pipeline([Stage(lambda x: x * 2, name="m", batch=spec)], tracing=tracer) as pipe:
        xs = [torch.full((1, 2), float(i)) for i in range(8)]
        await asyncio.gather(*(pipe.send(x) for x in xs))
    spans = exporter.get_finished_spans()
    reqs = named(spans, "asyncnn.request")
    batches = named(spans, "asyncnn.batch m")
    assert len(reqs) == 8 and batches
    linked = {link.context.span_id for b in batches for link in b.links}
    assert linked == {r.context.span_id for r in reqs}
    assert sum(b.attributes["asyncnn.batch.size"] for b in batches) == 8
    assert all(b.attributes["asyncnn.batch.reason"] in ("full", "delay") for b in batches)
    assert all(len(children(spans, r)) == 1 for r in reqs)  # its stage span


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("cannot print")


async def test_a_batch_whose_exception_cannot_be_printed_is_traced_and_fails_alone(otel):
    # The SDK words a recorded exception: str() raising there ended the run.
    tracer, exporter = otel

    def fails_on_negative(x):
        if (x < 0).any():
            raise Unprintable()
        return x

    spec = Batching(max_size=1, max_delay="auto")
    async with Pipeline([Stage(fails_on_negative, name="m", batch=spec)], tracing=tracer) as pipe:
        with pytest.raises(StageError, match="Unprintable"):
            await pipe.send(-torch.ones(1, 2))
        assert torch.equal(await pipe.send(torch.ones(1, 2)), torch.ones(1, 2))
    failed = [b for b in named(exporter.get_finished_spans(), "asyncnn.batch m") if b.events]
    assert failed and failed[0].status.status_code == StatusCode.ERROR
    assert "Unprintable" in failed[0].events[0].attributes["exception.message"]


async def test_padding_waste_is_on_the_batch_span(otel):
    tracer, exporter = otel
    spec = Batching(max_size=2, max_delay=0.05, pad=0)
    async with Pipeline([Stage(lambda x: x, name="m", batch=spec)], tracing=tracer) as pipe:
        await asyncio.gather(pipe.send(torch.ones(1, 4)), pipe.send(torch.ones(1, 2)))
    (batch,) = named(exporter.get_finished_spans(), "asyncnn.batch")
    assert batch.attributes["asyncnn.batch.padding_waste"] == pytest.approx(0.25)


async def test_outcomes_error_cancelled_timed_out_and_closed(otel):
    tracer, exporter = otel
    gate = threading.Event()

    def work(x):
        if x == "bad":
            raise ValueError("bad input")
        if x == "hold":
            gate.wait(5)
        return x

    pipe = Pipeline([Stage(work, name="w", executor="thread", workers=2)], tracing=tracer)
    async with pipe:
        with pytest.raises(StageError):
            await pipe.send("bad")
        with pytest.raises(TimeoutError):
            await pipe.send("hold", timeout=0.02)
        task = asyncio.ensure_future(pipe.send("hold"))
        await asyncio.sleep(0.02)
        task.cancel()
        stuck = pipe.submit_nowait("hold")
        await pipe.aclose(timeout=0)
        gate.set()
        with pytest.raises(PipelineClosed):
            await stuck
    outcomes = sorted(
        s.attributes["asyncnn.outcome"]
        for s in named(exporter.get_finished_spans(), "asyncnn.request")
    )
    assert outcomes == ["cancelled", "closed", "error", "timed_out"]
    spans = {
        s.attributes["asyncnn.outcome"]: s
        for s in named(exporter.get_finished_spans(), "asyncnn.request")
    }
    err = spans["error"]
    assert err.status.status_code == StatusCode.ERROR and err.attributes["asyncnn.stage"] == "w"
    assert any(e.name == "exception" for e in err.events)
    assert spans["closed"].status.status_code == StatusCode.ERROR


async def test_a_device_stage_on_the_cpu_path_names_its_device(otel):
    tracer, exporter = otel
    model = torch.nn.Linear(2, 2)
    async with Pipeline([Stage(model, name="lin", device="cpu")], tracing=tracer) as pipe:
        await pipe.send(torch.ones(1, 2))
    (stage,) = named(exporter.get_finished_spans(), "asyncnn.stage lin")
    assert stage.attributes["asyncnn.device"] == "cpu"


async def test_no_spans_at_all_when_tracing_is_off(otel):
    tracer, exporter = otel
    async with Pipeline([Stage(inc)]) as pipe:
        with tracer.start_as_current_span("handler"):
            assert await pipe.send(1) == 2
        assert pipe._runtime.ledger.oldest() is None
    assert [s.name for s in exporter.get_finished_spans()] == ["handler"]


def test_a_bad_tracing_option_is_refused():
    with pytest.raises(TypeError, match="tracing="):
        Pipeline([Stage(inc)], tracing="yes")


@pytest.mark.parametrize("executor", ["thread", "inline", "loop"])
async def test_spans_a_stage_function_makes_are_children_of_its_stage_span(otel, executor):
    tracer, exporter = otel

    def work(x):
        with tracer.start_as_current_span("inside"):
            return x + 1

    async def awork(x):
        with tracer.start_as_current_span("inside"):
            await asyncio.sleep(0)
            return x + 1

    stage = (
        Stage(awork, name="w") if executor == "loop" else Stage(work, name="w", executor=executor)
    )
    async with Pipeline([stage], tracing=tracer) as pipe:
        assert await asyncio.gather(pipe.send(1), pipe.send(2)) == [2, 3]
    spans = exporter.get_finished_spans()
    stages = {s.context.span_id: s for s in named(spans, "asyncnn.stage w")}
    inside = named(spans, "inside")
    assert len(stages) == 2 and len(inside) == 2
    assert {s.parent.span_id for s in inside} == set(stages)
    for s in stages.values():
        assert s.attributes["asyncnn.run_seconds"] > 0


async def test_a_batched_function_runs_inside_its_batch_span_and_a_failed_batch_says_so(otel):
    tracer, exporter = otel

    def model(x):
        with tracer.start_as_current_span("inside"):
            if (x < 0).any():
                raise ValueError("negative")
            return x * 2

    spec = Batching(max_size=4, max_delay=0.05, isolate_failures=False)
    async with Pipeline([Stage(model, name="m", batch=spec)], tracing=tracer) as pipe:
        await asyncio.gather(*(pipe.send(torch.ones(1, 2)) for _ in range(4)))
        with pytest.raises(StageError):
            await pipe.send(-torch.ones(1, 2))
    spans = exporter.get_finished_spans()
    batches = {s.context.span_id: s for s in named(spans, "asyncnn.batch m")}
    inside = named(spans, "inside")
    assert len(inside) == len(batches) >= 2
    assert {s.parent.span_id for s in inside} == set(batches)
    failed = [b for b in batches.values() if b.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1 and any(e.name == "exception" for e in failed[0].events)


async def test_the_parts_of_a_streaming_request_are_traced_under_its_span(otel):
    tracer, exporter = otel

    def parts(x):
        yield from range(x)

    async with Pipeline(
        [Stage(parts, name="gen"), Stage(inc, name="after")], tracing=tracer
    ) as pipe:
        got = [p async for p in pipe.send_stream(3)]
    assert got == [1, 2, 3]
    spans = exporter.get_finished_spans()
    (req,) = named(spans, "asyncnn.request")
    after = named(spans, "asyncnn.stage after")
    assert len(after) == 3 and all(s.parent.span_id == req.context.span_id for s in after)
    assert req.attributes["asyncnn.outcome"] == "ok" and req.end_time >= max(
        s.end_time for s in after
    )


@pytest.mark.parametrize("executor", ["thread", "loop"])
async def test_a_join_stage_function_runs_inside_its_stage_span(otel, executor):
    tracer, exporter = otel

    def add(p, q):
        with tracer.start_as_current_span("inside"):
            return p + q

    async def aadd(p, q):
        with tracer.start_as_current_span("inside"):
            await asyncio.sleep(0)
            return p + q

    g = Graph()
    x = g.input()
    a = g.add(Stage(inc, name="a"), x)
    b = g.add(Stage(inc, name="b"), x)
    join = Stage(aadd, name="d") if executor == "loop" else Stage(add, name="d", executor=executor)
    g.output(g.add(join, a, b))
    async with Pipeline(g, tracing=tracer) as pipe:
        assert await asyncio.gather(pipe.send(0), pipe.send(1)) == [2, 4]
    spans = exporter.get_finished_spans()
    joins = {s.context.span_id for s in named(spans, "asyncnn.stage d")}
    inside = named(spans, "inside")
    assert len(joins) == 2 and {s.parent.span_id for s in inside} == joins


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_generator_stage_has_a_stage_span_its_generator_runs_in(otel, kind):
    tracer, exporter = otel

    def parts(x):
        for i in range(x):
            with tracer.start_as_current_span("inside"):
                yield i

    async def aparts(x):
        for i in range(x):
            with tracer.start_as_current_span("inside"):
                await asyncio.sleep(0)
            yield i

    fn = parts if kind == "sync" else aparts
    async with Pipeline([Stage(fn, name="gen")], tracing=tracer) as pipe:
        got = await asyncio.gather(pipe.send(2), pipe.send(3))
    assert got == [[0, 1], [0, 1, 2]]
    spans = exporter.get_finished_spans()
    requests = {s.context.span_id: s for s in named(spans, "asyncnn.request")}
    stages = named(spans, "asyncnn.stage gen")
    assert len(stages) == 2 and {s.parent.span_id for s in stages} == set(requests)
    assert sorted(s.attributes["asyncnn.parts"] for s in stages) == [2, 3]
    for s in stages:
        req = requests[s.parent.span_id]
        assert req.start_time <= s.start_time <= s.end_time <= req.end_time
    inside = named(spans, "inside")
    assert len(inside) == 5
    assert {s.parent.span_id for s in inside} == {s.context.span_id for s in stages}


class TracedSteps:
    """Request x = n: n outputs, one per step; each step opens a span of its own."""

    def __init__(self, tracer):
        self.tracer = tracer

    def admit(self, inputs):
        return [{"n": n, "i": 0} for n in inputs]

    def step(self, states):
        with self.tracer.start_as_current_span("inside"):
            if any(s["n"] < 0 for s in states):
                raise ValueError("bad state")
            outs = [s["i"] for s in states]
            for s in states:
                s["i"] += 1
            return outs, [s["i"] >= s["n"] for s in states]


async def test_a_step_stage_has_stage_spans_and_one_linked_batch_span_per_model_call(otel):
    from asyncnn import Stepping

    tracer, exporter = otel
    stage = Stage(TracedSteps(tracer), name="steps", step=Stepping(max_active=4))
    async with Pipeline([stage], tracing=tracer) as pipe:
        got = await asyncio.gather(pipe.send(2), pipe.send(3), return_exceptions=True)
        with pytest.raises(StageError):
            await pipe.send(-1)
    assert got == [[0, 1], [0, 1, 2]]
    spans = exporter.get_finished_spans()
    requests = {s.context.span_id: s for s in named(spans, "asyncnn.request")}
    stages = named(spans, "asyncnn.stage steps")
    assert len(stages) == 3 and {s.parent.span_id for s in stages} == set(requests)
    for s in stages:
        assert s.end_time <= requests[s.parent.span_id].end_time
    calls = named(spans, "asyncnn.batch steps")
    steps = [c for c in calls if c.attributes["asyncnn.batch.reason"] == "step"]
    admits = [c for c in calls if c.attributes["asyncnn.batch.reason"] == "admit"]
    assert admits and len(steps) >= 3
    linked = {link.context.span_id for c in steps for link in c.links}
    assert linked == set(requests)  # every request was carried by some step
    for c in steps:
        assert c.attributes["asyncnn.batch.size"] == len(c.links)
    assert any(c.status.status_code == StatusCode.ERROR for c in steps)  # the bad one's step
    inside = named(spans, "inside")
    assert {s.parent.span_id for s in inside} == {c.context.span_id for c in steps}


async def test_a_device_stage_function_runs_inside_its_stage_span(otel):
    tracer, exporter = otel

    class Traced(torch.nn.Module):
        def forward(self, x):
            with tracer.start_as_current_span("inside"):
                return x + 1

    async with Pipeline([Stage(Traced(), name="dev", device="cpu")], tracing=tracer) as pipe:
        await asyncio.gather(pipe.send(torch.ones(1, 2)), pipe.send(torch.zeros(1, 2)))
    spans = exporter.get_finished_spans()
    stages = {s.context.span_id for s in named(spans, "asyncnn.stage dev")}
    inside = named(spans, "inside")
    assert len(stages) == 2 and {s.parent.span_id for s in inside} == stages
