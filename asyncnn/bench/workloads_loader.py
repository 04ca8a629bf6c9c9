"""The ``loader`` workload: samples behind a 2 ms fetch, batched, into the MLP. Every system
times the same samples: AsyncLoader with 64 async fetches in flight feeding
``Stage(model, workers=2)``, torchdata.nodes with 64 fetch threads (its docs' advice for I/O)
and DataLoader with 8 worker processes, both feeding the model in the training loop."""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import anyio
import torch

from ..loader import AsyncLoader
from ..pipeline import Pipeline
from ..stage import Stage
from ._core import Context, Measure, Row, interleave, run_on_loop, summarize, verdict
from .loaders_compare import consume
from .models import bench_mlp

__all__ = ["loader"]

FETCH_S = 0.002
CONCURRENCY = 64  # fetches in flight: asyncnn's concurrency, torchdata's threads
DL_WORKERS = 8  # DataLoader processes (its only way to wait on several fetches at once)
OURS = "asyncnn AsyncLoader"
ONE_WORKER = "asyncnn AsyncLoader, 1 model worker"
BATCH = 64
WIDTH = 512


def make_sample(i: int) -> torch.Tensor:
    return torch.full((WIDTH,), (i % 97) / 97.0)


class SleepyDataset(torch.utils.data.Dataset[torch.Tensor]):
    """The same fetch done synchronously: what a DataLoader worker runs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(FETCH_S)
        return make_sample(i)


def _sleepy_fetch(i: int) -> torch.Tensor:
    time.sleep(FETCH_S)
    return make_sample(i)


def _dataloader(model: Any, n: int, sink: list[torch.Tensor] | None = None) -> int:
    # Latency is hidden only by processes: more than cores, on purpose (they mostly wait).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        dl = torch.utils.data.DataLoader(
            SleepyDataset(n), batch_size=BATCH, num_workers=DL_WORKERS, prefetch_factor=4
        )
        return consume(dl, model, sink)


def _torchdata(model: Any, n: int, sink: list[torch.Tensor] | None = None) -> int:
    import torchdata.nodes as tn

    node: Any = tn.SamplerWrapper(torch.utils.data.SequentialSampler(range(n)))
    node = tn.ParallelMapper(node, _sleepy_fetch, num_workers=CONCURRENCY, method="thread")
    node = tn.Batcher(node, batch_size=BATCH, drop_last=False)
    node = tn.Mapper(node, torch.stack)
    node = tn.Prefetcher(node, prefetch_factor=2)
    return consume(tn.Loader(node), model, sink)


async def _asyncnn(
    model: Any, n: int, sink: list[torch.Tensor] | None = None, workers: int = 2
) -> int:
    async def fetch(i: int) -> torch.Tensor:
        await anyio.sleep(FETCH_S)  # stands for a network or object-store read
        return make_sample(i)

    loader = AsyncLoader(range(n), batch_size=BATCH, concurrency=CONCURRENCY, fetch=fetch)
    rows = 0
    # Two workers with one torch thread each (torch_threads="auto" divides the caller's threads):
    # each runs a batch of its own, so the loop's share of the cores delays one of them, not a
    # parallel region that both threads of a single call wait on.
    async with Pipeline([Stage(model, name="model", workers=workers)], queue_size=4) as pipe:
        async for y in pipe.stream(loader):
            rows += y.shape[0]
            if sink is not None:
                sink.append(y)
    return rows


def _have_torchdata() -> bool:
    try:
        import torchdata.nodes  # noqa: F401
    except ImportError:
        return False
    return True


def loader(ctx: Context) -> list[Row]:
    model = bench_mlp()
    n = 2_048 if ctx.quick else 6_144  # the same samples for every system
    dl = f"DataLoader(num_workers={DL_WORKERS}, prefetch_factor=4)"
    td = f"torchdata.nodes ParallelMapper({CONCURRENCY} threads)"
    systems: dict[str, Any] = {dl: lambda n, sink=None: _dataloader(model, n, sink)}
    if _have_torchdata():
        systems[td] = lambda n, sink=None: _torchdata(model, n, sink)
    baselines = list(systems)
    systems[ONE_WORKER] = lambda n, sink=None: run_on_loop(
        ctx.loop, lambda: _asyncnn(model, n, sink, workers=1)
    )
    systems[OURS] = lambda n, sink=None: run_on_loop(ctx.loop, lambda: _asyncnn(model, n, sink))

    # Same tensors out of every system, before timing.
    reference: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, 256, BATCH):
            reference.append(
                model(torch.stack([make_sample(i) for i in range(start, start + BATCH)]))
            )
    for name, fn in systems.items():
        out: list[torch.Tensor] = []
        fn(256, out)
        if len(out) != len(reference) or not all(
            torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(out, reference, strict=True)
        ):
            raise AssertionError(f"loader: {name} produced different batches than the reference")

    def timed(name: str) -> Measure:
        t0 = time.perf_counter()
        rows = systems[name](n)
        return Measure(rows, time.perf_counter() - t0)

    runners: dict[str, Any] = {k: functools.partial(timed, k) for k in systems}
    runs = interleave(
        ctx.repeats,
        runners,
        ctx.progress,
        warm_up=False,  # the checks above ran every system (and built its workers) once
        once=[ONE_WORKER],  # a reference row, outside the verdict
    )
    rows_out = [summarize("loader", k, ctx.loop, runs[k]) for k in systems]
    by_name = {r.system: r for r in rows_out}
    ours, one = by_name[OURS], by_name[ONE_WORKER]
    best = max((by_name[k] for k in baselines), key=lambda r: r.rate)
    for r in (one, ours):
        r.ratio = r.rate / best.rate
        r.ratio_label = f"vs {best.system}"
    ours.target = ">= 1.5x best baseline"
    ours.verdict = verdict(ours.rate / best.rate >= 1.5)
    for r in rows_out:
        r.note = f"{n:,} samples, {FETCH_S * 1e3:.0f} ms fetch, batch {BATCH}"
    one.note += f"; concurrency {CONCURRENCY}; model Stage(workers=1)"
    ours.note += f"; concurrency {CONCURRENCY}; model Stage(workers=2)"
    by_name[dl].note += "; model in the training loop"
    if not _have_torchdata():
        ours.note += "; torchdata not installed (pip install torchdata)"
    else:
        by_name[td].note += "; model in the training loop"
    return rows_out
