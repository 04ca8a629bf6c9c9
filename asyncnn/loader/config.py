"""An ``AsyncLoader``'s settings, checked, and the counters its epochs add to."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LoaderConfig", "LoaderStats", "loader_counters"]


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


def loader_counters() -> Counter[str]:
    """What a loader's epochs add to: ``LoaderStats``'s counted fields, by name."""
    return Counter(dict.fromkeys(("epochs", "batches", "samples", "skipped", "peak_buffered"), 0))


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
    threads: int | None  # fetch threads for a sync map-style source; None: decided by measuring

    @property
    def map_style(self) -> bool:
        return self.kind in ("map", "async-map")

    @property
    def fetch_threads(self) -> int:
        """Threads to start for a sync map-style source (the most that ``threads=None`` uses)."""
        return self.threads if self.threads is not None else min(self.concurrency, 8)

    @property
    def buffer_bound(self) -> int:
        """The most samples fetched (or being fetched) and not yet handed to the consumer."""
        return max(self.concurrency, self.batch_size) + self.prefetch * self.batch_size
