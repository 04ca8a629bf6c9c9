"""Security basics: no unpickling of request data, loopback binds, size caps, hostile payloads."""

import asyncio
import re
from pathlib import Path

import pytest
import torch

from asyncnn import Pipeline
from tests.fakes import load_example

ROOT = Path(__file__).resolve().parent.parent


# The exceptions: the loader's worker processes are forks of this process, and their results
# come back over a pipe only this process and its own worker hold (as in a DataLoader); and the
# files bench reads back, tensors only, the .pt files it wrote.
# The pattern also finds an Unpickler subclass's class line and its .load().
TRUSTED = {
    "processes.py": "# unpickles: from our own worker, on our pipe",
    "transport.py": "# unpickles: from our own worker, on our pipe",
    "workloads_files.py": "# unpickles: tensors only, files the bench wrote",
}


def test_no_unpickling_in_our_code():
    pattern = re.compile(
        r"\b(pickle|cPickle|dill|marshal)\.loads?\(|torch\.load\(|\bUnpickler\b|\.load\(\)"
    )
    offenders, trusted = [], []
    for p in sorted((ROOT / "asyncnn").rglob("*.py")):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line):
                where = f"{p.relative_to(ROOT)}:{n}"
                ok = p.name in TRUSTED and line.rstrip().endswith(TRUSTED[p.name])
                (trusted if ok else offenders).append(where)
    assert offenders == []
    # The parent reading its worker's batch (the reader class and its load), a worker checking
    # that its error round-trips, and the files bench reading its own .pt files (weights only).
    assert len(trusted) == 4, trusted


def test_servers_bind_loopback_by_default():
    import inspect

    from asyncnn.metrics import serve_prometheus

    assert inspect.signature(serve_prometheus).parameters["addr"].default == "127.0.0.1"
    for example in (ROOT / "examples").glob("*.py"):
        text = example.read_text()
        assert "0.0.0.0" not in text, example.name
    assert '"HOST", "127.0.0.1"' in (ROOT / "examples" / "serve_fastapi.py").read_text()


async def test_size_cap_is_checked_before_admission():
    async with Pipeline([lambda x: x], max_request_rows=1024) as pipe:
        with pytest.raises(ValueError, match="refused"):
            pipe.submit_nowait(torch.empty(1_000_000, 1))
        assert pipe.stats().admitted == 0


async def test_hostile_http_payloads_are_refused_before_allocation():
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    ex = load_example("serve_fastapi")
    app = ex.create_app()
    huge = {"features": [[0.0] * ex.FEATURES] * 10_000}  # claims 10k rows: over MAX_ROWS
    nested: object = [0.0]
    for _ in range(200):
        nested = [nested]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r_huge, r_nested, r_type = await asyncio.gather(
                client.post("/predict", json=huge),
                client.post("/predict", json={"features": nested}),
                client.post("/predict", json={"features": "DROP TABLE"}),
            )
        assert app.state.pipeline.stats().admitted == 0  # none reached the model
    assert (r_huge.status_code, r_nested.status_code, r_type.status_code) == (413, 422, 422)


async def test_oversized_bodies_are_refused_before_they_are_parsed(monkeypatch):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import json

    ex = load_example("serve_fastapi")
    app = ex.create_app()
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1) or real_loads(*a, **k))
    one_long_row = json.dumps({"features": [[0.0] * 100_000]}).encode()  # 500 kB, one row

    async def chunked():
        for _ in range(100):
            yield b" " * 1024  # no Content-Length: counted as it streams in

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r_long = await client.post(
                "/predict", content=one_long_row, headers={"content-type": "application/json"}
            )
            r_chunked = await client.post("/predict", content=chunked())
            assert parsed == []  # neither body was parsed
            r_wide = await client.post("/predict", json={"features": [[0.0] * 9]})
    assert (r_long.status_code, r_chunked.status_code) == (413, 413)
    assert r_wide.status_code == 422  # a row of 9 features: refused by the schema
