"""What the ``files`` and ``remote`` workloads share: the same dataset through DataLoader with
num_workers 0, 1, 2 and 4 (the best one is the baseline), through AsyncLoader, each consumed
alone or by the MLP, every system's batches checked against a reference on the first samples,
then all of them timed side by side."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import AsyncIterable, Callable
from typing import Any

import torch

from ..pipeline import Pipeline
from ..stage import Stage
from ._core import Context, Measure, Row, interleave, paired_verdict, run_on_loop, summarize

__all__ = ["BATCH", "DATALOADER_WORKERS", "compare", "consume", "dataloaders", "ours"]

BATCH = 64
DATALOADER_WORKERS = (0, 1, 2, 4)

System = Callable[..., int]  # system(sink=None) -> rows; sink collects the outputs for checking


def consume(batches: Any, model: Any, sink: list[torch.Tensor] | None) -> int:
    """A training loop's side of a sync loader: each batch into the model (or nowhere)."""
    rows = 0
    with torch.inference_mode():
        for batch in batches:
            y = model(batch) if model is not None else batch
            rows += y.shape[0]
            if sink is not None:
                sink.append(y)
    return rows


def _dataloader(ds: Any, model: Any, workers: int, sink: Any = None) -> int:
    with warnings.catch_warnings():
        # More workers than cores is one of the settings compared here, on purpose.
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers)
        return consume(dl, model, sink)


def dataloaders(ds: Any, model: Any) -> dict[str, System]:
    return {
        f"DataLoader(num_workers={w})": functools.partial(_dataloader, ds, model, w)
        for w in DATALOADER_WORKERS
    }


async def _stream(loader: AsyncIterable[Any], model: Any, sink: Any) -> int:
    rows = 0
    if model is None:
        async for batch in loader:
            rows += batch.shape[0]
            if sink is not None:
                sink.append(batch)
        return rows
    async with Pipeline([Stage(model, name="model", workers=2)], queue_size=4) as pipe:
        async for y in pipe.stream(loader):  # the README's setting for a model fed by a loader
            rows += y.shape[0]
            if sink is not None:
                sink.append(y)
    return rows


def ours(ctx: Context, make_loader: Callable[[], AsyncIterable[Any]], model: Any) -> System:
    """An AsyncLoader system: a fresh loader per run, on a fresh loop of the bench's kind."""

    def run(sink: Any = None) -> int:
        return run_on_loop(ctx.loop, lambda: _stream(make_loader(), model, sink))

    return run


def compare(
    ctx: Context,
    workload: str,
    build: Callable[[int], dict[str, System]],
    reference: Callable[[int], torch.Tensor],
    n: int,
    mine: list[str],
    target: float,
    note: str,
    *,
    checked: int = 1_024,
    once: tuple[str, ...] = (),
) -> list[Row]:
    """Check every system's output on the first ``checked`` samples against ``reference(k)``
    (which also warms each up), time them side by side on ``n`` samples (``build(n)``: the
    systems for the first ``n`` samples), and give each of ``mine`` its ratio to the best
    DataLoader setting, against ``target``. Systems in ``once`` (slow by design: one read at
    a time) are timed in the first round only."""
    check = min(n, checked)
    want = reference(check)
    for name, fn in build(check).items():
        ctx.progress(f"{workload}: check {name}")
        out: list[torch.Tensor] = []
        fn(sink=out)
        if not torch.allclose(torch.cat(out), want, rtol=1e-4, atol=1e-5):
            raise AssertionError(
                f"{workload}: {name} produced different batches than the reference"
            )

    def timed(fn: System) -> Measure:
        t0 = time.perf_counter()
        return Measure(fn(), time.perf_counter() - t0)

    systems = {k: functools.partial(timed, f) for k, f in build(n).items()}
    runs = interleave(
        1, {k: f for k, f in systems.items() if k in once}, ctx.progress, warm_up=False
    )
    runs |= interleave(
        ctx.repeats,
        {k: f for k, f in systems.items() if k not in once},
        ctx.progress,
        warm_up=False,
    )
    runs = {k: runs[k] for k in systems}  # in the systems' order
    rows = {k: summarize(workload, k, ctx.loop, m, unit="samples/s") for k, m in runs.items()}
    best = max((r for k, r in rows.items() if k.startswith("DataLoader")), key=lambda r: r.rate)
    for name in mine:
        paired_verdict(
            rows[name],
            runs,
            name,
            best.system,
            target,
            label=f"vs {best.system}",
            goal=f">= {target}x best DataLoader",
        )
    for k, r in rows.items():
        r.note = note + ("; timed once (one read at a time)" if k in once else "")
    return list(rows.values())
