"""``--peers`` for ``serving``: the model stage on Ray replicas, and Ray Serve ``@serve.batch``.

Both run on the local machine (a local Ray with ``num_cpus`` = the CPU count, shut down after),
against the same MLP, the same clients and the same rows as the local asyncnn row of the run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..batching import Batching
from ..pipeline import Pipeline
from ..stage import Stage
from ._core import Context, Row, interleave, run_on_loop, summarize
from .clients import MAX_DELAY, MAX_SIZE, drive

__all__ = ["ray_peers"]

REPLICAS = 2


async def _on_ray(rows: list[torch.Tensor], clients: int, n: int, check: bool = False) -> Any:
    """asyncnn with the model on Ray replicas, batched before dispatch."""
    from .models import bench_mlp

    stage = Stage(
        bench_mlp,
        name="model",
        executor="ray",
        replicas=REPLICAS,
        resources={"num_cpus": 0.5},  # Serve's replica below takes one CPU
        batch=Batching(max_size=MAX_SIZE, max_delay=MAX_DELAY),
    )
    async with Pipeline([stage], queue_size=clients) as pipe:
        if check:
            return await pipe.send(rows[0])
        return await drive(pipe.send, rows, clients, n)


def _deploy_serve() -> None:
    """Ray Serve's documented batching: one replica, @serve.batch."""
    from ray import serve

    from .models import bench_mlp

    # max_ongoing_requests: Serve's default (5) would cap @serve.batch at 5 rows. Access
    # logs off: by default Serve logs a line per request, which would cost it throughput.
    @serve.deployment(
        num_replicas=1,
        ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=1024,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    class Model:
        def __init__(self) -> None:
            self.model = bench_mlp()

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
        async def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            with torch.inference_mode():
                return list(self.model(torch.cat(xs)).split(1))

    serve.start(
        http_options={"location": "NoServer"},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    app: Any = Model
    serve.run(app.bind(), name="asyncnn-peer", route_prefix=None)


async def _on_serve(rows: list[torch.Tensor], clients: int, n: int, check: bool = False) -> Any:
    from ray import serve

    handle = serve.get_app_handle("asyncnn-peer")  # a handle binds to this run's loop

    async def send(x: torch.Tensor) -> Any:
        return await handle.remote(x)

    if check:
        return await send(rows[0])
    return await drive(send, rows, clients, n)


def ray_peers(
    ctx: Context, rows: list[torch.Tensor], clients: int, total: int, local_rate: float
) -> list[Row]:
    import ray
    from ray import serve

    from .models import bench_mlp

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.ERROR)
    try:
        _deploy_serve()
        with torch.inference_mode():
            expected = bench_mlp()(rows[0])
        for name, fn in (("asyncnn on Ray", _on_ray), ("Ray Serve", _on_serve)):
            got = run_on_loop(ctx.loop, lambda fn=fn: fn(rows, clients, 1, True))  # type: ignore[misc]
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                raise AssertionError(f"serving: {name} answered differently from the model")
        n_ray = 8_192 if ctx.quick else 20_480
        n_serve = 1_024 if ctx.quick else 2_048
        runs = interleave(
            ctx.repeats,
            {
                "asyncnn, model on 2 Ray replicas": lambda: run_on_loop(
                    ctx.loop, lambda: _on_ray(rows, clients, n_ray)
                ),
                "Ray Serve @serve.batch(64, 5 ms)": lambda: run_on_loop(
                    ctx.loop, lambda: _on_serve(rows, clients, n_serve)
                ),
            },
            ctx.progress,
        )
        out = [summarize("serving", k, ctx.loop, v, unit="req/s") for k, v in runs.items()]
        for row in out:
            extra_us = (1 / row.rate - 1 / local_rate) * 1e6
            row.note = f"{clients} clients x 1 row; +{extra_us:,.0f} µs/request vs local asyncnn"
        return out
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
