"""Serve a model with FastAPI: each request awaits the pipeline; many are batched together.

Run:  python examples/serve_fastapi.py        (needs, from a checkout: pip install -e ".[examples]")
Then: curl -s -X POST localhost:8000/predict -H 'content-type: application/json' \\
           -d '{"features": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}'

- The pipeline starts and drains with the app (lifespan), so in-flight requests finish on exit.
- A full pipeline answers 503 with Retry-After instead of queueing without bound (load shedding).
- A request may carry a deadline and a priority (``"timeout_ms": 50, "priority": 0``; lower is
  more urgent): urgent requests go first at every queue, one that cannot finish in time is
  refused at once with 503 and a Retry-After computed from the work ahead of it (admission
  control, ``max_in_flight``), and one whose deadline passes answers 504.
- Traced with OpenTelemetry when asked (``TRACE=1``, or ``create_app(tracer_provider=...)``):
  the FastAPI instrumentation opens the HTTP span, and the pipeline's request, stage and batch
  spans sit inside it (``pip install opentelemetry-sdk opentelemetry-instrumentation-fastapi``).
- Once started, the interpreter's collector is set for deadlines (``asyncnn.latency_gc()``:
  what is loaded frozen, young objects in small passes), and put back when the app stops.
- It binds 127.0.0.1 by default: put a reverse proxy in front to expose it.
- Bodies over 64 KiB are refused with 413 before they are parsed; rows must have exactly 8
  features and there are at most 64 of them (422 otherwise), before any tensor is made.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import asyncnn

log = logging.getLogger("serve_fastapi")

FEATURES = 8
MAX_ROWS = 64
MAX_BODY = 64 * 1024  # bytes: MAX_ROWS rows of FEATURES floats fit with room to spare


class BodyLimit:
    """Answer 413 to a request body over ``limit`` bytes before anything parses it: at once by
    its Content-Length, else while it streams in (read here, at most ``limit`` bytes, then
    handed to the app)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await self._refuse(send)
        chunks: list[bytes] = []
        seen, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        body: dict[str, Any] | None = {
            "type": "http.request",
            "body": b"".join(chunks),
            "more_body": False,
        }

        async def replay() -> Any:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Any) -> None:
        body = b'{"detail":"request body too large"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    ).eval()


Row = Annotated[list[float], Field(min_length=FEATURES, max_length=FEATURES)]


class PredictIn(BaseModel):
    features: list[Row] = Field(min_length=1, max_length=MAX_ROWS)
    timeout_ms: float | None = Field(default=None, gt=0, le=60_000)
    priority: int = Field(default=0, ge=-10, le=10)


class PredictOut(BaseModel):
    scores: list[list[float]]


def create_app(
    model: torch.nn.Module | None = None,
    *,
    queue_size: int = 256,
    max_in_flight: int = 1024,
    tracer_provider: Any = None,
) -> FastAPI:
    model = model if model is not None else make_model()
    tracer = None if tracer_provider is None else tracer_provider.get_tracer("asyncnn")
    pipeline = asyncnn.Pipeline(
        [
            asyncnn.Stage(
                model, name="model", batch=asyncnn.Batching(max_size=128, max_delay="auto")
            )
        ],
        queue_size=queue_size,
        max_request_rows=MAX_ROWS,
        max_in_flight=max_in_flight,
        tracing=tracer or False,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pipeline:  # started with the app, drained when it stops
            # The model and the pipeline are loaded: keep the collector's passes short from
            # here on, so that none stops the loop past a request's deadline (README).
            with asyncnn.latency_gc():
                yield

    app = FastAPI(lifespan=lifespan)
    app.state.pipeline = pipeline
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    if tracer_provider is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)

    @app.exception_handler(asyncnn.PipelineFull)
    async def full(request: object, exc: asyncnn.PipelineFull) -> JSONResponse:
        return JSONResponse(
            {"detail": "busy, retry shortly"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(asyncnn.Overloaded)
    async def overloaded(request: object, exc: asyncnn.Overloaded) -> JSONResponse:
        # Retry-After is whole seconds in HTTP; the body has the estimate itself.
        wait = exc.retry_after
        return JSONResponse(
            {"detail": "overloaded: it would not finish in time", "retry_after_ms": wait * 1e3},
            status_code=503,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    @app.post("/predict", response_model=PredictOut)
    async def predict(body: PredictIn) -> PredictOut:
        rows = {len(r) for r in body.features}
        if rows != {FEATURES}:
            raise HTTPException(422, f"each row needs {FEATURES} features, got {sorted(rows)}")
        x = torch.tensor(body.features, dtype=torch.float32)
        timeout = None if body.timeout_ms is None else body.timeout_ms / 1e3
        # PipelineFull / Overloaded -> 503 (handlers above)
        fut = pipeline.submit_nowait(x, timeout=timeout, priority=body.priority)
        try:
            y = await fut
        except TimeoutError as exc:
            raise HTTPException(504, "deadline passed before the answer was ready") from exc
        except asyncnn.StageError as exc:
            log.exception("model failed on a request")  # the details stay in the server's log
            raise HTTPException(500, "model failed") from exc
        return PredictOut(scores=y.tolist())

    @app.get("/stats")
    async def stats() -> dict[str, int | float]:
        st = pipeline.stats()
        return {
            "admitted": st.admitted,
            "completed": st.completed,
            "mean_batch_size": st["model"].mean_batch_size,
        }

    return app


def console_tracing() -> Any:
    """A tracer provider that prints every span as it ends (``TRACE=1``)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return provider


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        create_app(tracer_provider=console_tracing() if os.environ.get("TRACE") else None),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
    )
