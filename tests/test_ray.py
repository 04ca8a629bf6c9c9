"""Stages on Ray actors, against a real local Ray (num_cpus=2), started here and shut down."""

import asyncio
import sys

import anyio
import pytest
import torch

from asyncnn import Batching, Graph, Pipeline, Stage, StageError

ray = pytest.importorskip("ray")
# Starting Ray actors (a process each, importing torch) takes seconds, more on a busy machine.
pytestmark = [pytest.mark.ray, pytest.mark.hang_guard(120)]


def ray_pool(pipe):
    """The replica pool of the pipeline's first stage (white-box: replica call counts and
    killing an actor have no public handle)."""
    return pipe._runtime.stages[0].pool


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def otel():
    """A tracer whose spans land in the SDK's in-memory exporter: (tracer, exporter)."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("t"), exporter
    provider.shutdown()


def make_linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def double(x):
    return x * 2


def fails_on_negative(x):
    if (x < 0).any():
        raise ValueError("negative input")
    return x + 1


async def test_remote_results_equal_local_execution():
    xs = [torch.randn(2, 4) for _ in range(12)]
    local = make_linear()
    with torch.inference_mode():
        expected = [local(x) for x in xs]
    pipe = Pipeline([Stage(make_linear, executor="ray", replicas=2, resources={"num_cpus": 0.5})])
    async with pipe:
        got = [y async for y in pipe.stream(xs)]
        st = pipe.stats()["make_linear"]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert st.items == 12 and st.runs_on == "ray" and st.workers == 2


async def test_batches_are_formed_before_dispatch():
    spec = Batching(max_size=8, max_delay=0.05)
    pipe = Pipeline(
        [Stage(double, executor="ray", replicas=2, resources={"num_cpus": 0.5}, batch=spec)]
    )
    async with pipe:
        xs = [torch.full((1, 1), float(i)) for i in range(32)]
        ys = await asyncio.gather(*(pipe.send(x) for x in xs))
        calls = sum(r["calls"] for r in ray_pool(pipe).stats())
        st = pipe.stats()["double"]
    assert [y.item() for y in ys] == [2.0 * i for i in range(32)]
    assert calls == st.batches < 32  # one remote call per batch, not per request


async def test_remote_exception_is_a_stage_error_with_the_remote_cause():
    spec = Batching(max_size=4, max_delay=0.05)
    pipe = Pipeline(
        [Stage(fails_on_negative, executor="ray", resources={"num_cpus": 0.5}, batch=spec)]
    )
    async with pipe:
        xs = [torch.full((1, 1), -1.0 if i == 2 else float(i)) for i in range(4)]
        results = await asyncio.gather(*(pipe.send(x) for x in xs), return_exceptions=True)
    assert isinstance(results[2], StageError) and results[2].stage == "fails_on_negative"
    assert isinstance(results[2].__cause__, ValueError) and "negative input" in str(results[2])
    assert [r.item() for i, r in enumerate(results) if i != 2] == [1.0, 2.0, 4.0]


async def gone(actor):
    """Wait until a killed actor is dead."""

    def dead() -> bool:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=0.2)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass  # busy with its held call, or not yet killed
        return False

    with anyio.fail_after(30):
        while not await asyncio.to_thread(dead):  # noqa: ASYNC110 - polled: another process
            await asyncio.sleep(0.05)


async def test_a_killed_replica_fails_only_its_calls_and_is_replaced(tmp_path):
    import functools

    from asyncnn.executors_ray import ReplicaDied

    runs = tmp_path / "runs.txt"
    held = functools.partial(gated_record, root=str(tmp_path))  # each call waits for "go"
    stage = Stage(
        held, name="double", executor="ray", replicas=2, resources={"num_cpus": 0.5}, max_inflight=1
    )
    async with Pipeline([stage]) as pipe:
        pool = ray_pool(pipe)
        first = [asyncio.ensure_future(pipe.send(torch.full((1,), float(i)))) for i in range(2)]
        await started(runs, 2)  # both calls are running on their replicas
        assert pool._load == [1, 1]  # each replica holds one call
        victim = pool.actors[0]
        ray.kill(victim, no_restart=True)
        await gone(victim)  # the kill is asynchronous: its held call must not finish first
        (tmp_path / "go").touch()
        results = await asyncio.gather(*first, return_exceptions=True)
        died = [r for r in results if isinstance(r, StageError)]
        assert len(died) == 1 and isinstance(died[0].__cause__, ReplicaDied)
        assert "was replaced" in str(died[0])
        assert [r.item() for r in results if not isinstance(r, Exception)] in ([0.0], [2.0])
        after = await asyncio.gather(*(pipe.send(torch.full((1,), 5.0)) for _ in range(4)))
        assert [a.item() for a in after] == [10.0] * 4
        assert pool.replaced == 1 and pool.actors[0] is not victim
        actors = list(pool.actors)
    for actor in actors:  # released at close: ray.kill takes effect within moments
        with anyio.fail_after(10), pytest.raises(ray.exceptions.RayActorError):
            while True:
                await actor.ready.remote()


async def test_factory_errors_surface_at_start():
    def broken_factory():
        raise RuntimeError("no weights here")

    pipe = Pipeline([Stage(broken_factory, executor="ray", resources={"num_cpus": 0.5})])
    with pytest.raises(Exception, match="Ray replicas did not start"):
        async with pipe:
            pass


def test_ray_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r'pip install "ray>=2.9"'):
        Stage(double, executor="ray")


def test_ray_stage_configuration_errors():
    with pytest.raises(ValueError, match="replicas=0"):
        Stage(double, executor="ray", replicas=0)

    async def coro(x):
        return x

    with pytest.raises(TypeError, match="async def cannot run on Ray"):
        Stage(coro, executor="ray")
    with pytest.raises(TypeError, match="num_gpus"):
        Stage(double, executor="ray", device="cpu")


def test_scale_out_example_matches_the_local_model():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "ray_scale_out.py"
    spec = importlib.util.spec_from_file_location("ray_scale_out", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ray.shutdown()  # the example starts its own Ray, as a user's script would
    try:
        labels = mod.main(64)
    finally:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    model = mod.make_model()
    torch.manual_seed(1)
    xs = [torch.randn(1, 64) for _ in range(64)]
    with torch.inference_mode():
        assert labels == [int(model(x).argmax()) for x in xs]


async def started(runs, n):
    """Wait until the replicas have recorded ``n`` rows (another process writes the file, so
    there is no event to wait on here)."""
    with anyio.fail_after(30):
        while not runs.exists() or len(runs.read_text().split()) < n:  # noqa: ASYNC110
            await anyio.sleep(0.01)


def gated_record(x, root):
    """Record each row it runs (a side effect, in a file), then wait for the test's gate."""
    import os
    import time as _time

    with open(os.path.join(root, "runs.txt"), "a") as f:
        for v in x.flatten().tolist():
            f.write(f"{int(v)}\n")
    deadline = _time.monotonic() + 20
    while not os.path.exists(os.path.join(root, "go")) and _time.monotonic() < deadline:
        _time.sleep(0.01)
    return x * 2


async def test_a_batch_whose_replica_dies_is_not_run_again(tmp_path):
    import functools

    from asyncnn.executors_ray import ReplicaDied

    runs = tmp_path / "runs.txt"
    stage = Stage(
        functools.partial(gated_record, root=str(tmp_path)),
        name="record",
        executor="ray",
        replicas=2,
        resources={"num_cpus": 0.5},
        max_inflight=1,
        batch=Batching(max_size=8, max_delay=0.05),
    )
    pipe = Pipeline([stage])
    async with pipe:
        pool = ray_pool(pipe)
        sent = [asyncio.ensure_future(pipe.send(torch.full((1,), float(i)))) for i in range(4)]
        await started(runs, 4)  # the batch of four has reached a replica and run
        holder = pool._load.index(1)
        ray.kill(pool.actors[holder], no_restart=True)
        results = await asyncio.gather(*sent, return_exceptions=True)
        (tmp_path / "go").touch()
    assert all(isinstance(r, StageError) for r in results)
    assert all(isinstance(r.__cause__, ReplicaDied) for r in results)
    counts = {}
    for v in runs.read_text().split():
        counts[v] = counts.get(v, 0) + 1
    assert counts == {"0": 1, "1": 1, "2": 1, "3": 1}  # each request's work ran exactly once


async def test_deadlines_and_priorities_pass_through_a_ray_stage():
    gate = asyncio.Event()

    async def hold(x):
        if x.sum() == 0:
            await gate.wait()
        return x

    remote = Stage(double, executor="ray", replicas=1, resources={"num_cpus": 0.5})
    async with Pipeline([Stage(hold, workers=1), remote]) as pipe:
        held = asyncio.ensure_future(pipe.send(torch.zeros(1, 2)))
        await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):
            await pipe.send(torch.ones(1, 2), timeout=0.05)
        gate.set()
        await held
        y = await pipe.send(torch.ones(1, 2), timeout=60, priority=-1)
        st = pipe.stats()
    torch.testing.assert_close(y, torch.full((1, 2), 2.0))
    assert st["double"].items == 2  # the late request never reached the replica
    assert st.timed_out == 1


async def test_a_ray_stage_is_traced_on_the_driver(otel):
    tracer, exporter = otel
    remote = Stage(double, executor="ray", replicas=1, resources={"num_cpus": 0.5})
    async with Pipeline([remote], tracing=tracer) as pipe:
        y = await pipe.send(torch.ones(1, 2))
    torch.testing.assert_close(y, torch.full((1, 2), 2.0))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    stage, req = spans["asyncnn.stage double"], spans["asyncnn.request"]
    assert stage.parent.span_id == req.context.span_id
    assert stage.attributes["asyncnn.run_seconds"] > 0


def current_span_ids(x):
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    return torch.tensor(
        [[float(sc.trace_id % 2**52), float(sc.span_id % 2**52)]], dtype=torch.float64
    )


async def test_a_ray_stage_function_runs_inside_its_stage_span(otel):
    tracer, exporter = otel
    remote = Stage(
        current_span_ids, name="ids", executor="ray", replicas=1, resources={"num_cpus": 0.5}
    )
    async with Pipeline([remote], tracing=tracer) as pipe:
        got = await pipe.send(torch.zeros(1))
    (stage,) = [s for s in exporter.get_finished_spans() if s.name == "asyncnn.stage ids"]
    # The replica saw the stage span as its current span (the context crossed the call).
    assert got[0, 0].item() == float(stage.context.trace_id % 2**52)
    assert got[0, 1].item() == float(stage.context.span_id % 2**52)


def batch_span_ids(x):
    return current_span_ids(x).expand(x.shape[0], 2).clone()


async def test_a_batched_ray_stage_function_runs_inside_its_batch_span(otel):
    tracer, exporter = otel
    remote = Stage(
        batch_span_ids,
        name="ids",
        executor="ray",
        replicas=1,
        resources={"num_cpus": 0.5},
        batch=Batching(max_size=4, max_delay=0.05),
    )
    async with Pipeline([remote], tracing=tracer) as pipe:
        got = await asyncio.gather(*(pipe.send(torch.zeros(1)) for _ in range(3)))
    batches = {
        (float(s.context.trace_id % 2**52), float(s.context.span_id % 2**52)): s
        for s in exporter.get_finished_spans()
        if s.name == "asyncnn.batch ids"
    }
    # Every request's row was computed with its batch span current on the replica.
    seen = {(g[0, 0].item(), g[0, 1].item()) for g in got}
    assert seen and seen <= set(batches)
    assert sum(len(batches[k].links) for k in seen) == 3


def join_span_ids(p, q):
    return current_span_ids(p) + 0 * (p + q).sum()


async def test_a_ray_join_stage_function_runs_inside_its_stage_span(otel):
    tracer, exporter = otel
    g = Graph()
    x = g.input()
    a = g.add(Stage(double, name="a"), x)
    b = g.add(Stage(double, name="b"), x)
    join = Stage(join_span_ids, name="j", executor="ray", replicas=1, resources={"num_cpus": 0.5})
    g.output(g.add(join, a, b))
    async with Pipeline(g, tracing=tracer) as pipe:
        got = await pipe.send(torch.zeros(1))
    (stage,) = [s for s in exporter.get_finished_spans() if s.name == "asyncnn.stage j"]
    # The join's parts were spread into the call on the replica, inside the stage span.
    assert got[0, 0].item() == float(stage.context.trace_id % 2**52)
    assert got[0, 1].item() == float(stage.context.span_id % 2**52)
