"""The queue discipline for urgent work: strict priority across classes, earliest deadline first
within a class, and aging so that a waiting class is never starved.

:class:`RankedBuffer` is a drop-in for the ``deque`` inside a :class:`~asyncnn.channels.Channel`
(``append``, ``popleft``, ``len``, iteration, ``clear``): a channel switches to it the first time
an urgent request is admitted, so a pipeline whose requests are all equal keeps its plain FIFO.
It knows nothing about requests: ``key(item)`` gives ``(priority, deadline, since)``.

Lower ``priority`` is more urgent (0 is the default; negative numbers are allowed). An item of a
less urgent class goes first once it has waited ``aging`` seconds per level it is behind the most
urgent waiting item: a class is delayed at most that long, never starved. Items with no deadline
(``math.inf``) come after those with one, in arrival order. Sync, with an injected clock.

A full channel that ranks still lets in an item of a more urgent class than one it holds
(``outranks``): a queue's bound holds a class back behind its own kind and less urgent ones,
never behind work it outranks. What passes the bound so is bounded by the more urgent requests
in flight (each is held by its caller anyway).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Key", "RankedBuffer"]

T = TypeVar("T")

# (priority, deadline or math.inf, the time the item's request was admitted)
Key = Callable[[Any], tuple[int, float, float]]


class RankedBuffer(Generic[T]):
    """Items by (class, deadline, arrival), one heap per priority class."""

    __slots__ = ("_aging", "_classes", "_clock", "_heaps", "_key", "_n", "_seq", "inversions")

    def __init__(self, key: Key, aging: float, clock: Callable[[], float]) -> None:
        self._key = key
        self._aging = aging
        self._clock = clock
        self._heaps: dict[int, list[tuple[float, int, float, T]]] = {}
        self._classes: list[int] = []  # the priorities that have a heap, most urgent first
        self._seq = itertools.count()
        self._n = 0
        self.inversions = 0  # items taken by aging ahead of a more urgent class

    def append(self, item: T) -> None:
        priority, deadline, since = self._key(item)
        heap = self._heaps.get(priority)
        if heap is None:
            heap = self._heaps[priority] = []
            self._classes = sorted(self._heaps)
        heapq.heappush(heap, (deadline, next(self._seq), since, item))
        self._n += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def popleft(self) -> T:
        """The most urgent item (an aged one of a lower class first); IndexError when empty."""
        if not self._n:
            raise IndexError("pop from an empty RankedBuffer")
        waiting = [p for p in self._classes if self._heaps[p]]
        chosen = waiting[0]
        if len(waiting) > 1:
            now, top = self._clock(), waiting[0]
            # The lower class whose head is most overdue by its aging allowance goes first.
            overdue = 0.0
            for p in waiting[1:]:
                late = now - self._heaps[p][0][2] - self._aging * (p - top)
                if late > overdue:
                    chosen, overdue = p, late
            if chosen != top:
                self.inversions += 1
        self._n -= 1
        return heapq.heappop(self._heaps[chosen])[3]

    def clear(self) -> None:
        self._heaps.clear()
        self._classes = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def priority(self, item: T) -> int:
        """``item``'s class."""
        return self._key(item)[0]

    def outranks(self, item: T) -> bool:
        """``item`` is of a more urgent class than some item waiting here (a full ranked
        channel lets it in past its bound: see ``Channel.send_nowait``)."""
        heaps = self._heaps
        for p in reversed(self._classes):  # the least urgent class that has an item
            if heaps[p]:
                return self._key(item)[0] < p
        return False

    def holds_above(self, priority: int) -> bool:
        """An item of a more urgent class than ``priority`` waits here."""
        heaps = self._heaps
        for p in self._classes:
            if p >= priority:
                return False
            if heaps[p]:
                return True
        return False

    def waiting_upto(self, priority: int) -> int:
        """How many items of class ``priority`` or a more urgent one wait."""
        return sum(len(self._heaps[p]) for p in self._classes if p <= priority)

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[T]:
        """Every item, most urgent class first (for scans and draining; not in exact order)."""
        for p in self._classes:
            for entry in self._heaps[p]:
                yield entry[3]
