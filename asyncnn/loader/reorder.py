"""Samples fetched out of order, handed out as batches. Sync: tests drive it directly."""

from __future__ import annotations

from collections import deque
from typing import Any

from ..errors import LoaderError, describe

__all__ = ["Failed", "Reassembler", "collate_failed"]

_MISSING = object()


class Failed:
    """A sample (or batch) that could not be fetched or collated, in place of its value."""

    __slots__ = ("error", "index")

    def __init__(self, index: int, error: BaseException) -> None:
        self.index = index
        self.error = error


def collate_failed(k: int, n: int, exc: Exception) -> Failed:
    """Batch ``k`` of ``n`` samples could not be collated: a ``LoaderError`` naming it."""
    err = LoaderError(
        f"AsyncLoader: collating batch {k} ({n} samples) failed with "
        f"{describe(exc)} (check collate= against what the source returns)"
    )
    err.__cause__ = exc
    return Failed(-1, err)


class Reassembler:
    """Puts fetched samples back into batches.

    ``put(b, pos, value)`` files sample ``pos`` of planned batch ``b`` and says whether a batch
    just became ready. ``ordered``: batch ``k`` is ready when all of its samples are in, and
    batches are taken in plan order. Unordered: batches fill in arrival order to the plan's sizes
    (``batch_size``, the last one shorter), and are taken as they fill.
    """

    def __init__(self, plan: list[list[int]], ordered: bool, batch_size: int) -> None:
        self.ordered = ordered
        self.batch_size = batch_size
        self._results: list[list[Any]] = [[_MISSING] * len(b) for b in plan]
        self._remaining = [len(b) for b in plan]
        self._filled: deque[list[Any]] = deque()  # unordered: batches in the order they filled
        self._filling: list[Any] = []
        self._delivered = 0
        self.total = sum(self._remaining)

    def put(self, b: int, pos: int, value: Any) -> bool:
        self._delivered += 1
        if self.ordered:
            self._results[b][pos] = value
            self._remaining[b] -= 1
            return self._remaining[b] == 0
        self._filling.append(value)
        if len(self._filling) == self.batch_size or self._delivered == self.total:
            self._filled.append(self._filling)
            self._filling = []
            return True
        return False

    def ready(self, k: int) -> bool:
        """Can the ``k``-th batch handed out be taken now?"""
        return self._remaining[k] == 0 if self.ordered else bool(self._filled)

    def take(self, k: int) -> list[Any]:
        """The ``k``-th batch handed out (call once ``ready(k)``)."""
        if self.ordered:
            samples, self._results[k] = self._results[k], []
            return samples
        return self._filled.popleft()
