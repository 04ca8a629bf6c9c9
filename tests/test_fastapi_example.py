"""The FastAPI example, driven in-process over ASGI with concurrent httpx clients."""

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from anyio import wait_all_tasks_blocked

from tests.fakes import load_example


class Held(torch.nn.Module):
    """A model stuck until ``release`` is set (10 s at most)."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def forward(self, x):
        self.release.wait(10)
        return x[:, :3]


pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve_fastapi.py"


async def test_concurrent_requests_match_the_model():
    ex = load_example("serve_fastapi")
    model = ex.make_model()
    app = ex.create_app(model)
    torch.manual_seed(3)
    bodies = [torch.randn(1 + i % 3, ex.FEATURES) for i in range(60)]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(
                *(client.post("/predict", json={"features": b.tolist()}) for b in bodies)
            )
            stats = (await client.get("/stats")).json()
            bad = await client.post("/predict", json={"features": [[1.0, 2.0]]})
    assert bad.status_code == 422
    with torch.inference_mode():
        for b, r in zip(bodies, responses, strict=True):
            assert r.status_code == 200, r.text
            torch.testing.assert_close(
                torch.tensor(r.json()["scores"]), model(b), rtol=1e-4, atol=1e-5
            )
    assert stats["completed"] == 60 and stats["mean_batch_size"] > 1


async def test_full_pipeline_answers_503_with_retry_after():
    import asyncnn

    ex = load_example("serve_fastapi")
    release = threading.Event()
    app = ex.create_app(Held(release), queue_size=1)
    pipeline = app.state.pipeline
    x = torch.zeros(1, ex.FEATURES)
    async with app.router.lifespan_context(app):
        fillers = []
        # The model is stuck: fill every buffer (the queue, the forming batch of up to
        # max_size rows, the batch waiting for the runner).
        with pytest.raises(asyncnn.PipelineFull):
            for _ in range(1000):
                fillers.append(pipeline.submit_nowait(x))
                await wait_all_tasks_blocked()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post("/predict", json={"features": x.tolist()})
        release.set()
        await asyncio.gather(*fillers)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"


def test_binds_loopback_by_default():
    text = EXAMPLE.read_text()
    assert '"HOST", "127.0.0.1"' in text


def test_one_module_level_app_serves_two_test_clients_in_turn():
    # FastAPI's usual test pattern: one app, a TestClient per test, each running the lifespan.
    from fastapi.testclient import TestClient

    ex = load_example("serve_fastapi")
    app = ex.create_app()
    x = [[0.5] * ex.FEATURES]
    for _ in range(2):
        with TestClient(app) as client:
            r = client.post("/predict", json={"features": x})
            assert r.status_code == 200, r.text
            stats = client.get("/stats").json()
            assert stats["completed"] == 1 and isinstance(stats["completed"], int)
    assert app.state.pipeline.stats().run == 2


async def test_deadlines_and_admission_control_answer_504_and_503_with_retry_after():
    ex = load_example("serve_fastapi")
    release = threading.Event()
    app = ex.create_app(Held(release), max_in_flight=2)
    x = torch.zeros(1, ex.FEATURES).tolist()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            late = await client.post("/predict", json={"features": x, "timeout_ms": 20})
            held = [
                asyncio.ensure_future(client.post("/predict", json={"features": x, "priority": p}))
                for p in (1, 0)
            ]
            while app.state.pipeline.stats().in_flight < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            refused = await client.post("/predict", json={"features": x})
            release.set()
            answers = await asyncio.gather(*held)
            bad = await client.post("/predict", json={"features": x, "priority": 99})
    assert late.status_code == 504
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["retry_after_ms"] > 0
    assert [r.status_code for r in answers] == [200, 200]
    assert bad.status_code == 422


async def test_a_traced_request_sits_inside_the_http_span():
    pytest.importorskip("opentelemetry.instrumentation.fastapi")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ex = load_example("serve_fastapi")
    app = ex.create_app(tracer_provider=provider)
    x = [[0.5] * ex.FEATURES]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post("/predict", json={"features": x})
    assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    (req,) = [s for s in spans if s.name == "asyncnn.request"]
    (http,) = [s for s in spans if s.kind.name == "SERVER"]
    assert req.context.trace_id == http.context.trace_id
    parent = by_id[req.parent.span_id]
    while parent.parent is not None and parent is not http:
        parent = by_id[parent.parent.span_id]
    assert parent is http  # the pipeline's span is in the handler's trace
    names = {s.name for s in spans}
    assert {"asyncnn.stage model", "asyncnn.batch model"} <= names
    provider.shutdown()
