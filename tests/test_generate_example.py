"""The streaming generation example over HTTP: tokens as server-sent events, each request's
tokens identical to its own greedy run alone, and a client that leaves frees its slot."""

import asyncio
import json
import socket
import time

import pytest

from asyncnn.bench.decoder import Prompt, TinyDecoder, generate_alone
from tests.fakes import load_example

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.hang_guard(60)


def tokens_of(text: str) -> list[int]:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            out.append(json.loads(block[len("data: ") :]))
    return out


async def test_concurrent_clients_stream_their_own_greedy_tokens():
    ex = load_example("generate_stream")
    model = TinyDecoder(vocab=ex.VOCAB)
    app = ex.create_app(model, max_active=8)
    bodies = [{"prompt": [i, i + 1, (3 * i) % 7], "max_new": 3 + (i * 7) % 23} for i in range(12)]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
            stats = (await client.get("/stats")).json()
            bad = await client.post("/generate", json={"prompt": [], "max_new": 3})
    assert bad.status_code == 422
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.text.endswith("event: end\ndata: {}\n\n")
        want = generate_alone(model, Prompt(tuple(body["prompt"]), body["max_new"]))
        assert tokens_of(r.text) == want
    assert stats["completed"] == 12 and stats["mean_active"] > 1  # requests shared steps


class Slow(TinyDecoder):
    """A step takes at least 5 ms: a 256-token generation would take over a second."""

    def step(self, states):
        time.sleep(0.005)
        return super().step(states)


async def test_a_client_that_disconnects_ends_its_generation_over_real_http():
    uvicorn = pytest.importorskip("uvicorn")
    ex = load_example("generate_stream")
    app = ex.create_app(Slow(vocab=ex.VOCAB), max_active=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.ensure_future(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            body = {"prompt": [5, 6], "max_new": 256}
            async with client.stream("POST", "/generate", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:
                        break  # the client leaves early: the connection closes
            # max_active=1: the next request runs only once the first one's slot is free.
            r2 = await asyncio.wait_for(
                client.post("/generate", json={"prompt": [1], "max_new": 2}), 20
            )
            stats = (await client.get("/stats")).json()
    finally:
        server.should_exit = True
        await serving
    assert len(tokens_of(r2.text)) == 2
    assert stats["cancelled"] == 1 and stats["completed"] == 1
    assert stats["steps"] < 100  # the long generation stopped soon after its client left
