"""The ``files`` workload: 20,000 small local files (``.npy`` decoded by ``np.load``, ``.pt`` by
``torch.load``) read by a sync ``__getitem__``, batched by 64, without and with the MLP
consuming them. AsyncLoader with its defaults, and with ``worker_kind="process"`` (the
README's setting for local files), against DataLoader with num_workers 0, 1, 2 and 4 (the best
one is the baseline) and torchdata.nodes configured as its docs advise for decoding that holds
the GIL (a process ParallelMapper over whole batches), same files, same samples, same run."""

from __future__ import annotations

import functools
import gc
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..loader import AsyncLoader
from ._core import Context, Row
from .loaders_compare import BATCH, compare, consume, dataloaders, ours
from .models import bench_mlp

__all__ = ["NpyFiles", "PtFiles", "files", "write_samples"]

WIDTH = 512
DEFAULTS = "asyncnn AsyncLoader (defaults)"
PROCESSES = "asyncnn AsyncLoader(worker_kind='process')"
TORCHDATA = "torchdata.nodes ParallelMapper(process, 2 workers, batches)"


def sample(i: int) -> np.ndarray:
    return np.full(WIDTH, (i % 97) / 97.0, dtype=np.float32)


class NpyFiles(torch.utils.data.Dataset[torch.Tensor]):
    """One sample per file: ``np.load`` in ``__getitem__``, as a newcomer writes it."""

    def __init__(self, folder: Path, n: int) -> None:
        self.paths = [folder / f"{i}.npy" for i in range(n)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.paths[i]))


class PtFiles(NpyFiles):
    """One tensor per ``.pt`` file: ``torch.load`` in ``__getitem__``."""

    def __init__(self, folder: Path, n: int) -> None:
        self.paths = [folder / f"{i}.pt" for i in range(n)]

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        return torch.load(path, weights_only=True)  # unpickles: tensors only, files the bench wrote


def write_samples(folder: Path, n: int, kind: str) -> None:
    for i in range(n):
        if kind == "npy":
            np.save(folder / f"{i}.npy", sample(i))
        else:
            torch.save(torch.from_numpy(sample(i)), folder / f"{i}.pt")


def _batch_of(ds: Any, idxs: list[int]) -> torch.Tensor:
    return torch.stack([ds[i] for i in idxs])


def _torchdata(ds: Any, model: Any, sink: Any = None) -> int:
    import torchdata.nodes as tn

    node: Any = tn.SamplerWrapper(torch.utils.data.SequentialSampler(range(len(ds))))
    node = tn.Batcher(node, batch_size=BATCH, drop_last=False)
    node = tn.ParallelMapper(
        node, functools.partial(_batch_of, ds), num_workers=2, method="process"
    )
    node = tn.Prefetcher(node, prefetch_factor=2)
    rows = consume(tn.Loader(node), model, sink)
    # Its iterators end in reference cycles: collect them here, or the next forked worker (any
    # system's) would find them, and their finalizers complain there.
    gc.collect()
    return rows


def _systems(ctx: Context, ds: Any, model: Any) -> dict[str, Any]:
    systems: dict[str, Any] = dataloaders(ds, model)
    try:
        import torchdata.nodes  # noqa: F401

        systems[TORCHDATA] = functools.partial(_torchdata, ds, model)
    except ImportError:
        pass
    systems[DEFAULTS] = ours(ctx, lambda: AsyncLoader(ds, batch_size=BATCH), model)
    systems[PROCESSES] = ours(
        ctx, lambda: AsyncLoader(ds, batch_size=BATCH, worker_kind="process"), model
    )
    return systems


def _reference(dataset: Any, folder: Path, model: Any, k: int) -> torch.Tensor:
    ds = dataset(folder, k)
    x = torch.stack([ds[i] for i in range(k)])
    with torch.inference_mode():
        return model(x) if model is not None else x


def _build(ctx: Context, dataset: Any, folder: Path, model: Any, k: int) -> dict[str, Any]:
    return _systems(ctx, dataset(folder, k), model)


def files(ctx: Context) -> list[Row]:
    n = 2_000 if ctx.quick else 20_000
    model = bench_mlp()
    rows: list[Row] = []
    for kind, dataset in (("npy", NpyFiles), ("pt", PtFiles)):
        with tempfile.TemporaryDirectory(prefix="asyncnn-files-") as tmp:
            folder = Path(tmp)
            ctx.progress(f"files: writing {n:,} .{kind} files")
            write_samples(folder, n, kind)
            note = f"{n:,} .{kind} files of {WIDTH} float32, batch {BATCH}"
            for label, m, target in (("", None, 1.0), ("+MLP", model, 1.2)):
                rows += compare(
                    ctx,
                    f"files .{kind}{label}",
                    functools.partial(_build, ctx, dataset, folder, m),
                    functools.partial(_reference, dataset, folder, m),
                    n,
                    [DEFAULTS, PROCESSES],
                    target,
                    note,
                )
    return rows
