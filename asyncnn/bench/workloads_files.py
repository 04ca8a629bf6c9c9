"""The ``files`` workload: small local ``.npy`` files decoded in a sync ``__getitem__``, batched
by 64, without and with the MLP consuming them; AsyncLoader with its defaults against DataLoader
with num_workers 0, 1, 2 and 4 (the best one is the baseline) and torchdata.nodes, same files,
same number of samples, in the same run."""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..loader import AsyncLoader
from ..pipeline import Pipeline
from ..stage import Stage
from ._core import Context, Measure, Row, interleave, run_on_loop, summarize, verdict
from .models import bench_mlp

__all__ = ["files"]

BATCH = 64
WIDTH = 512
OURS = "asyncnn AsyncLoader (defaults)"


class NpyFiles(torch.utils.data.Dataset[torch.Tensor]):
    """One sample per file: ``np.load`` in ``__getitem__``, as a newcomer writes it."""

    def __init__(self, folder: Path, n: int) -> None:
        self.paths = [folder / f"{i}.npy" for i in range(n)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.paths[i]))


def _write(folder: Path, n: int) -> None:
    for i in range(n):
        np.save(folder / f"{i}.npy", np.full(WIDTH, (i % 97) / 97.0, dtype=np.float32))


def _consume(batches: Any, model: Any, sink: list[torch.Tensor] | None) -> int:
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
        return _consume(dl, model, sink)


def _torchdata(ds: Any, model: Any, sink: Any = None) -> int:
    import torchdata.nodes as tn

    node: Any = tn.SamplerWrapper(torch.utils.data.SequentialSampler(range(len(ds))))
    node = tn.ParallelMapper(node, ds.__getitem__, num_workers=4, method="thread")
    node = tn.Batcher(node, batch_size=BATCH, drop_last=False)
    node = tn.Mapper(node, torch.stack)
    node = tn.Prefetcher(node, prefetch_factor=2)
    return _consume(tn.Loader(node), model, sink)


async def _asyncnn(ds: Any, model: Any, sink: Any = None) -> int:
    loader = AsyncLoader(ds, batch_size=BATCH)  # the defaults, as a user would start
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


def _systems(ctx: Context, ds: Any, model: Any) -> dict[str, Any]:
    systems: dict[str, Any] = {
        f"DataLoader(num_workers={w})": functools.partial(_dataloader, ds, model, w)
        for w in (0, 1, 2, 4)
    }
    try:
        import torchdata.nodes  # noqa: F401

        systems["torchdata.nodes ParallelMapper(4 threads)"] = functools.partial(
            _torchdata, ds, model
        )
    except ImportError:
        pass
    systems[OURS] = lambda sink=None: run_on_loop(ctx.loop, lambda: _asyncnn(ds, model, sink))
    return systems


def _run(ctx: Context, ds: Any, model: Any, label: str, target: float) -> list[Row]:
    systems = _systems(ctx, ds, model)
    reference = torch.stack([ds[i] for i in range(len(ds))])
    if model is not None:
        with torch.inference_mode():
            reference = model(reference)
    for name, fn in systems.items():
        out: list[torch.Tensor] = []
        fn(sink=out)
        if not torch.allclose(torch.cat(out), reference, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"files: {name} produced different batches than the reference")

    def timed(fn: Any) -> Measure:
        t0 = time.perf_counter()
        return Measure(fn(), time.perf_counter() - t0)

    runs = interleave(
        ctx.repeats, {k: functools.partial(timed, f) for k, f in systems.items()}, ctx.progress
    )
    rows = [summarize(f"files{label}", k, ctx.loop, m, unit="samples/s") for k, m in runs.items()]
    ours = rows[-1]
    best = max((r for r in rows if r.system.startswith("DataLoader")), key=lambda r: r.rate)
    ours.ratio = ours.rate / best.rate
    ours.ratio_label = f"vs {best.system}"
    ours.target = f">= {target}x best DataLoader"
    ours.verdict = verdict(ours.ratio >= target)
    for r in rows:
        r.note = f"{len(ds):,} .npy files of {WIDTH} float32, batch {BATCH}"
    return rows


def files(ctx: Context) -> list[Row]:
    n = 2_000 if ctx.quick else 8_000
    with tempfile.TemporaryDirectory(prefix="asyncnn-files-") as tmp:
        _write(Path(tmp), n)
        ds = NpyFiles(Path(tmp), n)
        rows = _run(ctx, ds, None, "", 1.0)
        rows += _run(ctx, ds, bench_mlp(), "+MLP", 1.2)
    return rows
