"""What an epoch reads: the kind of source, the order of indices, the batches. Sync."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "END",
    "batch_count",
    "batch_plan",
    "batches_of",
    "epoch_indices",
    "next_chunk",
    "next_or_end",
    "rows",
    "source_kind",
]

END = object()  # the end of a source read on a thread


def source_kind(source: Any, fetch: Any) -> str:
    """``map``, ``async-map``, ``iterable``, ``async-iterable`` or ``dataloader``."""
    if isinstance(source, torch.utils.data.DataLoader):
        return "dataloader"
    if fetch is not None:
        if not hasattr(source, "__len__"):
            raise TypeError("AsyncLoader(fetch=...): source must have a length (the indices)")
        return "async-map"
    getitem = getattr(type(source), "__getitem__", None)
    if getitem is not None and hasattr(source, "__len__"):
        return "async-map" if inspect.iscoroutinefunction(getitem) else "map"
    if isinstance(source, AsyncIterable):
        return "async-iterable"
    if isinstance(source, Iterable):
        return "iterable"
    raise TypeError(
        f"AsyncLoader: cannot load from {type(source).__name__}: give a map-style dataset "
        "(__len__ + __getitem__), an iterable or async iterable of samples, or a DataLoader"
    )


def epoch_indices(
    n: int, sampler: Iterable[int] | None, shuffle: bool, generator: torch.Generator | None
) -> list[int]:
    """The indices of one epoch: the sampler's, a fresh permutation, or ``range(n)``."""
    if sampler is not None:
        return list(sampler)
    if not shuffle:
        return list(range(n))
    gen = generator
    if gen is None:
        gen = torch.Generator()
        gen.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
    return torch.randperm(n, generator=gen).tolist()


def batch_plan(indices: list[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    """The indices cut into batches (the last one shorter, or dropped with ``drop_last``)."""
    return list(batches_of(indices, batch_size, drop_last))


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    """How many batches ``batches_of`` cuts ``n`` indices into."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches_of(indices: list[int], batch_size: int, drop_last: bool) -> Iterator[list[int]]:
    """``batch_plan``, one batch at a time: an epoch of a million samples does not build
    15,625 lists on the loop before its first batch (nor wake the collector for them)."""
    for i in range(0, batch_count(len(indices), batch_size, drop_last) * batch_size, batch_size):
        yield indices[i : i + batch_size]


def next_chunk(it: Iterator[Any], n: int) -> list[Any]:
    """Up to ``n`` items of ``it`` (fewer at its end); runs on a reader thread."""
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def next_or_end(it: Iterator[Any]) -> Any:
    return next(it, END)


def rows(batch: Any) -> int:
    """Samples in a ``DataLoader`` batch: the leading size of its first tensor or list."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple) and batch:
        first = batch[0]
        return rows(first) if isinstance(first, torch.Tensor | list | tuple | dict) else len(batch)
    return 1
