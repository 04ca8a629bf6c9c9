"""Stream generated tokens to HTTP clients, with step-level ("continuous") batching.

Run:  python examples/generate_stream.py      (needs, from a checkout: pip install -e ".[examples]")
Then: curl -N -X POST localhost:8000/generate -H 'content-type: application/json' \\
           -d '{"prompt": [1, 2, 3], "max_new": 20}'

Each request is one caller's generation; the decoder runs one batched step at a time over every
request that is generating. A request joins the running batch between steps and leaves as soon
as it is done, so a short answer never waits for a long one, and every token is sent to its
client (server-sent events) as soon as its step ends. A client that disconnects ends its request
at once: its slot in the KV cache is given back and the batch carries on without it.

The model is the bench's small decoder with a KV cache (random weights from a seed, no
download): put your own step model in its place (``admit``, ``step``, ``evict``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

import asyncnn
from asyncnn.bench.decoder import Prompt, TinyDecoder

MAX_NEW = 256
VOCAB = 256


class Body(BaseModel):
    prompt: Annotated[
        list[Annotated[int, Field(ge=0, lt=VOCAB)]], Field(min_length=1, max_length=32)
    ]
    max_new: Annotated[int, Field(ge=1, le=MAX_NEW)] = 32


def create_app(model: TinyDecoder | None = None, max_active: int = 64) -> FastAPI:
    model = model or TinyDecoder(vocab=VOCAB)
    pipeline = asyncnn.Pipeline(
        [asyncnn.Stage(model, name="decode", step=asyncnn.Stepping(max_active=max_active))],
        torch_threads=1,  # a small model: a second intra-op thread would only spin
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pipeline:  # started with the app, drained when it stops
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.pipeline = pipeline

    @app.post("/generate")
    async def generate(body: Body) -> StreamingResponse:
        tokens = pipeline.send_stream(Prompt(tuple(body.prompt), body.max_new), buffer=8)

        async def events() -> AsyncIterator[str]:
            # Starlette closes this generator when the client goes away; aclosing ends the
            # request there and then (its generation stops at the next step).
            async with contextlib.aclosing(tokens) as stream:  # type: ignore[type-var]
                async for token in stream:
                    yield f"data: {json.dumps(token)}\n\n"
            yield "event: end\ndata: {}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/stats")
    async def stats() -> dict[str, float]:
        s = pipeline.stats()
        step = s["decode"].stepping
        return {
            "completed": s.completed,
            "cancelled": s.cancelled,
            "steps": step.steps if step else 0,
            "mean_active": step.mean_active if step else 0.0,
        }

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(), host=os.environ.get("HOST", "127.0.0.1"), port=8000)
