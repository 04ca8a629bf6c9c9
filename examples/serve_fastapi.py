"""Serve a model with FastAPI: each request awaits the pipeline; many are batched together.

Run:  python examples/serve_fastapi.py        (needs, from a checkout: pip install -e ".[examples]")
Then: curl -s -X POST localhost:8000/predict -H 'content-type: application/json' \\
           -d '{"features": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}'

- The pipeline starts and drains with the app (lifespan), so in-flight requests finish on exit.
- A full pipeline answers 503 with Retry-After instead of queueing without bound (load shedding).
- It binds 127.0.0.1 by default: put a reverse proxy in front to expose it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import asyncnn

FEATURES = 8
MAX_ROWS = 64


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    ).eval()


class PredictIn(BaseModel):
    features: list[list[float]] = Field(min_length=1, max_length=MAX_ROWS)


class PredictOut(BaseModel):
    scores: list[list[float]]


def create_app(model: torch.nn.Module | None = None, *, queue_size: int = 256) -> FastAPI:
    model = model if model is not None else make_model()
    pipeline = asyncnn.Pipeline(
        [asyncnn.Stage(model, name="model", batch=asyncnn.Batching(max_size=128, max_delay=0.002))],
        queue_size=queue_size,
        max_request_rows=MAX_ROWS,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pipeline:  # started with the app, drained when it stops
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.pipeline = pipeline

    @app.exception_handler(asyncnn.PipelineFull)
    async def full(request: object, exc: asyncnn.PipelineFull) -> JSONResponse:
        return JSONResponse(
            {"detail": "busy, retry shortly"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.post("/predict", response_model=PredictOut)
    async def predict(body: PredictIn) -> PredictOut:
        rows = {len(r) for r in body.features}
        if rows != {FEATURES}:
            raise HTTPException(422, f"each row needs {FEATURES} features, got {sorted(rows)}")
        x = torch.tensor(body.features, dtype=torch.float32)
        fut = pipeline.submit_nowait(x)  # PipelineFull -> 503 (handler above)
        try:
            y = await fut
        except asyncnn.StageError as exc:
            raise HTTPException(500, f"model failed: {exc}") from exc
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


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        create_app(),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
    )
