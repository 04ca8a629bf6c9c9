"""AsyncLoader on a Hugging Face ``datasets`` Arrow dataset, and where processes beat the thread.

Run: python benchmarks/hf_loader.py [--rows 40000] [--rounds 5]
Bounded: ~2-4 min on the 2-core VM. Two tables, systems alternated round by round, each ratio
against DataLoader(num_workers=0) of the same round (compare ratios, not machines):

1. A ``datasets`` dataset as a user has one (token ids padded to 64, a mask, a label; saved with
   ``save_to_disk``, loaded back with the torch format), batches of 32: DataLoader with 0 and 2
   workers, AsyncLoader on its thread, in worker processes, and with its defaults.
2. A synthetic dataset holding the GIL for a set time a sample (three small tensors a sample,
   batches of 32) at 0.25-2 ms a batch: the fetch thread against two worker processes, which is
   what ``worker_kind="auto"``'s ``choice.MIN_BATCH_SECONDS`` rests on.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
import uvloop
from torch.utils.data import DataLoader

from asyncnn import AsyncLoader

BATCH = 32


def arrow_dataset(folder: Path, rows: int) -> Any:
    ids = [[(i * 7 + j) % 30_000 for j in range(64)] for i in range(rows)]
    mask = [[1] * (8 + i % 56) + [0] * (56 - i % 56) for i in range(rows)]
    data = {"input_ids": ids, "attention_mask": mask, "label": [i % 3 for i in range(rows)]}
    datasets.Dataset.from_dict(data).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder)).with_format("torch")


class Spin(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Decoding that holds the GIL ``us`` microseconds a sample."""

    def __init__(self, n: int, us: float) -> None:
        self.n, self.us = n, us

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        end = time.perf_counter() + self.us * 1e-6
        while time.perf_counter() < end:
            pass
        return {
            "ids": torch.full((64,), i, dtype=torch.long),
            "mask": torch.ones(64, dtype=torch.long),
            "label": torch.tensor(i % 3),
        }


def dataloader(ds: Any, workers: int) -> int:
    return sum(len(b["label"]) for b in DataLoader(ds, batch_size=BATCH, num_workers=workers))


def ours(ds: Any, **kw: Any) -> int:
    async def epoch() -> int:
        n = 0
        async for b in AsyncLoader(ds, batch_size=BATCH, **kw):
            n += len(b["label"])
        return n

    return uvloop.run(epoch())


def rounds(systems: dict[str, Callable[[], int]], n: int) -> dict[str, list[float]]:
    """Samples per second of each system, alternated round by round (reversed every other)."""
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(n):
        for name in list(systems)[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            count = systems[name]()
            rates[name].append(count / (time.perf_counter() - t))
    return rates


def table(title: str, rates: dict[str, list[float]], base: str) -> None:
    print(f"\n{title}\n| system | samples/s (median, range) | of {base} (median, range) |")
    print("|---|---|---|")
    for name, got in rates.items():
        ratios = [g / b for g, b in zip(got, rates[base], strict=True)]
        print(
            f"| {name} | {statistics.median(got):,.0f} ({min(got):,.0f}-{max(got):,.0f}) | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


def systems(ds: Any, *, dataloader_workers: tuple[int, ...] = (0,), defaults: bool = False) -> Any:
    """The systems compared on ``ds``, each one epoch."""
    out: dict[str, Callable[[], int]] = {
        f"DataLoader(num_workers={w})": functools.partial(dataloader, ds, w)
        for w in dataloader_workers
    }
    for kind in ("thread", "process"):
        out[f"AsyncLoader(worker_kind='{kind}')"] = functools.partial(ours, ds, worker_kind=kind)
    if defaults:
        out["AsyncLoader() defaults"] = functools.partial(ours, ds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    datasets.disable_progress_bars()
    base = "DataLoader(num_workers=0)"
    with tempfile.TemporaryDirectory() as tmp:
        ds = arrow_dataset(Path(tmp) / "ds", args.rows)
        dataloader(ds, 0)  # warm-up: the first read of the memory-mapped file
        both = systems(ds, dataloader_workers=(0, 2), defaults=True)
        title = f"Hugging Face Arrow dataset, {args.rows:,} rows, batches of {BATCH}"
        table(title, rounds(both, args.rounds), base)
    for batch_ms in (0.25, 0.5, 1.0, 2.0):
        us = batch_ms * 1000 / BATCH
        spin = Spin(int(min(60_000, 1.5 / (us * 1e-6))), us)
        title = f"GIL-holding decoding, {batch_ms:g} ms a batch of {BATCH}"
        table(title, rounds(systems(spin), max(3, args.rounds - 2)), base)


if __name__ == "__main__":
    main()
