"""``--peers`` for ``serving``: the model stage on Ray replicas, and Ray Serve ``@serve.batch``.

A fair comparison: both sides get the same batching policy (size and delay) and the same
replicas (two, half a CPU each), for each setting of a short sweep; each side's best setting is
its headline. Both run on the local machine (a local Ray with ``num_cpus`` = the CPU count, shut
down after), against the same MLP, the same clients and the same rows as the local asyncnn row.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from ..batching import Batching
from ..pipeline import Pipeline
from ..stage import Stage
from ._core import Context, Row, interleave, run_on_loop, summarize
from .clients import drive

__all__ = ["SETTINGS", "ray_peers"]

REPLICAS = 2
CPUS_PER_REPLICA = 0.5
# (max batch size, max delay in seconds): Serve's documented example, ours, and between.
SETTINGS = ((64, 0.005), (128, 0.005), (256, 0.002))


def _label(size: int, delay: float) -> str:
    return f"({size}, {delay * 1e3:g} ms)"


async def _on_ray(
    rows: list[torch.Tensor], clients: int, n: int, setting: tuple[int, float], check: bool = False
) -> Any:
    """asyncnn with the model on Ray replicas, batched before dispatch."""
    from .models import bench_mlp

    size, delay = setting
    stage = Stage(
        bench_mlp,
        name="model",
        executor="ray",
        replicas=REPLICAS,
        resources={"num_cpus": CPUS_PER_REPLICA},
        batch=Batching(max_size=size, max_delay=delay),
    )
    async with Pipeline([stage], queue_size=clients) as pipe:
        if check:
            return await pipe.send(rows[0])
        return await drive(pipe.send, rows, clients, n)


def _deploy_serve(setting: tuple[int, float]) -> None:
    """Ray Serve's documented batching, ``@serve.batch`` with this setting, on as many
    replicas as the asyncnn side (a redeploy replaces the previous setting's app)."""
    from ray import serve

    from .models import bench_mlp

    size, delay = setting

    # max_ongoing_requests: Serve's default (5) would cap @serve.batch at 5 rows. Access
    # logs off: by default Serve logs a line per request, which would cost it throughput.
    @serve.deployment(
        num_replicas=REPLICAS,
        ray_actor_options={"num_cpus": CPUS_PER_REPLICA},
        max_ongoing_requests=1024,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    class Model:
        def __init__(self) -> None:
            self.model = bench_mlp()

        @serve.batch(max_batch_size=size, batch_wait_timeout_s=delay)
        async def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            with torch.inference_mode():
                return list(self.model(torch.cat(xs)).split(1))

    app: Any = Model
    serve.run(app.bind(), name="asyncnn-peer", route_prefix=None)


async def _on_serve(
    rows: list[torch.Tensor], clients: int, n: int, setting: tuple[int, float], check: bool = False
) -> Any:
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
        serve.start(
            http_options={"location": "NoServer"},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        with torch.inference_mode():
            expected = bench_mlp()(rows[0])
        out: list[Row] = []
        for setting in SETTINGS:
            _deploy_serve(setting)
            out.extend(_compare(ctx, rows, clients, setting, expected))
        for row in out:
            extra_us = (1 / row.rate - 1 / local_rate) * 1e6
            row.note = f"{clients} clients x 1 row; +{extra_us:,.0f} µs/request vs local asyncnn"
        _best_of_each(out)
        return out
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()


def _compare(
    ctx: Context,
    rows: list[torch.Tensor],
    clients: int,
    setting: tuple[int, float],
    expected: torch.Tensor,
) -> list[Row]:
    """Both sides under one batching setting, interleaved (Serve's app is deployed with it)."""
    n_ray = 8_192 if ctx.quick else 20_480
    n_serve = 1_024 if ctx.quick else 4_096
    systems = {
        f"asyncnn, model on {REPLICAS} Ray replicas, Batching{_label(*setting)}": (_on_ray, n_ray),
        f"Ray Serve, {REPLICAS} replicas, @serve.batch{_label(*setting)}": (_on_serve, n_serve),
    }

    def run(fn: Any, n: int, check: bool = False) -> Any:
        return run_on_loop(ctx.loop, lambda: fn(rows, clients, n, setting, check))

    for name, (fn, _) in systems.items():
        if not torch.allclose(run(fn, 1, True), expected, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"serving: {name} answered differently from the model")
    runs = interleave(
        ctx.repeats,
        {name: functools.partial(run, fn, n) for name, (fn, n) in systems.items()},
        ctx.progress,
    )
    return [summarize("serving", k, ctx.loop, v, unit="req/s") for k, v in runs.items()]


def _best_of_each(rows: list[Row]) -> None:
    """Mark each side's best setting, and the ratio of the two bests on asyncnn's."""
    mine = max((r for r in rows if r.system.startswith("asyncnn")), key=lambda r: r.rate)
    theirs = max((r for r in rows if r.system.startswith("Ray Serve")), key=lambda r: r.rate)
    theirs.note += "; Ray Serve's best setting"
    mine.note += "; asyncnn's best setting"
    mine.ratio = mine.rate / theirs.rate
    mine.ratio_label = "best vs Ray Serve's best"
