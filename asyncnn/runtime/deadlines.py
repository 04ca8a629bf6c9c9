"""Requests' deadlines in one heap, served by one timer.

A request admitted with a timeout must be ended at its deadline wherever it is. One loop timer
per request costs a timer handle, its context and arguments for as long as the request might
live (four objects for the collector to scan) and a call at the deadline even when the request
ended long before; here the deadlines wait in a heap of plain tuples, one timer is armed for
the earliest, and when it fires every deadline due is handed to ``expire`` (which ignores the
requests that already ended). Sync, with the timer and clock passed in: tests drive it without
a loop.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

__all__ = ["Deadlines"]

# How early a loop's timer may fire, unless the loop says (asyncio: its clock's resolution):
# uvloop's timers count whole milliseconds. A deadline this close to now is due, as the loop
# itself would judge a timer of its own.
RESOLUTION = 0.001


class Deadlines:
    """``add(when, rid, timeout)``; ``expire(rid, timeout)`` is called at ``when``.

    ``arm(when, callback)``: schedule ``callback`` at ``when`` and return a handle with
    ``cancel()`` (``loop.call_at``); ``clock()``: the time on the same clock (``loop.time``);
    ``resolution``: how early the timer may fire (see ``RESOLUTION``).
    """

    __slots__ = ("_arm", "_armed", "_clock", "_expire", "_heap", "_resolution", "_timer")

    def __init__(
        self,
        arm: Callable[[float, Callable[[], None]], Any],
        clock: Callable[[], float],
        expire: Callable[[int, float | None], None],
        resolution: float = RESOLUTION,
    ) -> None:
        self._arm, self._clock, self._expire = arm, clock, expire
        self._resolution = resolution
        self._heap: list[tuple[float, int, float | None]] = []
        self._armed: float | None = None  # when the one timer fires (None: not armed)
        self._timer: Any = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, rid: int, timeout: float | None) -> None:
        heapq.heappush(self._heap, (when, rid, timeout))
        if self._armed is None or when < self._armed:
            self._rearm(when)

    def due(self, now: float) -> list[tuple[int, float | None]]:
        """Take the deadlines due at ``now``, earliest first."""
        heap, out, soon = self._heap, [], now + self._resolution
        while heap and heap[0][0] <= soon:
            _, rid, timeout = heapq.heappop(heap)
            out.append((rid, timeout))
        return out

    def close(self) -> None:
        """Forget every deadline and disarm the timer."""
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._armed = None

    def _rearm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = when
        self._timer = self._arm(when, self._fire)

    def _fire(self) -> None:
        self._timer = self._armed = None
        for rid, timeout in self.due(self._clock()):
            self._expire(rid, timeout)  # may add deadlines (and arm the timer) itself
        if self._heap and (self._armed is None or self._heap[0][0] < self._armed):
            self._rearm(self._heap[0][0])
