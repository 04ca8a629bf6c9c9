"""An ``AsyncLoader``'s settings, checked, and the counters its epochs add to."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..devices import usable_cores

# Threads that wait on I/O at once (fetches that mostly wait: sockets, slow disks) at most,
# unless workers= says: a waiting thread costs little, and each one adds a read in flight.
IO_THREADS = 32

__all__ = ["IO_THREADS", "LoaderConfig", "LoaderStats", "loader_counters", "usable_cores"]


@dataclass(frozen=True)
class LoaderStats:
    """What a loader has done: ``epochs`` started, ``batches`` and ``samples`` yielded, samples
    ``skipped`` (``on_error="skip"``), and the most samples it ever held fetched-but-unconsumed
    (``peak_buffered``; never above ``buffer_bound``)."""

    epochs: int
    batches: int
    samples: int
    skipped: int
    peak_buffered: int
    buffer_bound: int
    process_epochs: int = 0  # epochs whose batches (after the first) worker processes fetched


def loader_counters() -> Counter[str]:
    """What a loader's epochs add to: ``LoaderStats``'s counted fields, by name."""
    return Counter(
        dict.fromkeys(
            ("epochs", "batches", "samples", "skipped", "peak_buffered", "process_epochs"), 0
        )
    )


@dataclass(frozen=True)
class LoaderConfig:
    """Everything an epoch needs to know, as ``AsyncLoader`` resolved it."""

    source: Any
    kind: str
    batch_size: int
    concurrency: int
    prefetch: int
    shuffle: bool
    drop_last: bool
    collate: Callable[[list[Any]], Any]
    pin_memory: bool
    device: torch.device | None
    ordered: bool
    sampler: Iterable[int] | None
    generator: torch.Generator | None
    fetch: Callable[[int], Any] | None
    on_error: str
    workers: int | None  # fetch threads or processes for a sync map-style source
    worker_kind: str  # "auto", "thread" or "process"
    multiprocessing_context: str | None
    worker_init_fn: Callable[[int], None] | None

    @property
    def map_style(self) -> bool:
        return self.kind in ("map", "async-map")

    @property
    def processes(self) -> bool:
        """Are batches fetched in worker processes?"""
        return self.kind == "map" and self.worker_kind == "process"

    @property
    def start_method(self) -> str | None:
        """How worker processes start: as asked; ``"auto"`` only ever forks."""
        return "fork" if self.worker_kind == "auto" else self.multiprocessing_context

    @property
    def fetch_threads(self) -> int:
        """Threads to start for a sync map-style source (the most that ``workers=None`` uses)."""
        return self.workers if self.workers is not None else min(self.concurrency, IO_THREADS)

    @property
    def process_workers(self) -> int:
        """Worker processes to start: ``workers``, or one per core this process may use."""
        return self.workers if self.workers is not None else usable_cores()

    @property
    def prefetch_batches(self) -> int:
        """Batches prepared ahead of the consumer at most: ``prefetch``, or ``prefetch`` per
        worker process (as a DataLoader's ``prefetch_factor``) where processes may be used."""
        may_fork = self.kind == "map" and self.worker_kind != "thread"
        return self.prefetch * (self.process_workers if may_fork else 1)

    @property
    def buffer_bound(self) -> int:
        """The most samples fetched (or being fetched) and not yet handed to the consumer."""
        return max(self.concurrency, self.batch_size) + self.prefetch_batches * self.batch_size
