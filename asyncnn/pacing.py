"""Latency-target batching (``Batching(max_delay="auto")``): when to release a batch, decided
from what the stage has measured. Sync, with the clock passed in: tests drive it without a loop.

- :class:`ServiceTimes`: seconds per call as a function of its rows, ``a + b·rows``, fitted
  online (least squares with exponential forgetting, so it follows a machine that slows down).
- :class:`ArrivalRate`: rows arriving per second, smoothed over short windows.
- :class:`Pacer`: the release rule. Nothing is released while every runner is busy (a batch
  formed early could not run sooner, and would hold requests that arrive more urgent); once a
  runner is free, a batch goes when it is full; when waiting longer would cost its most urgent
  request the deadline (``deadline``: now + the batch's service time is at that
  request's deadline, or ``target_latency`` after the oldest arrival); when a runner is idle and
  batches of the current size already keep up with the arrivals (``idle``: under light load
  that is at once, so latency stays at one call); or, so that nothing waits on arrivals that do
  not come, once the oldest has waited as long as one full batch takes (``delay``). Under load
  it waits for the smallest batch size that keeps up, and no longer.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["ArrivalRate", "Pacer", "Release", "ServiceTimes"]

Release = Literal["full", "deadline", "idle", "delay"]  # a pacer's reasons to release a batch

KEEP_UP = 1.1  # batches must serve arrivals with this much to spare
GUARD = 0.0005  # seconds kept in hand before a deadline (the release itself takes time)
MEASURED = 8  # calls measured before a stage's estimates (its line, their spread) are used
QUANTILE_STEP = 0.05  # how far one call moves a tracked percentile of the spread


class ServiceTimes:
    """``estimate(rows)``: the expected seconds of one call of ``rows`` rows (0.0 before any
    call was measured). Calls of one size spread around it (on a loaded 2-core machine, 0.8x
    to 1.25x for 8 calls in 10): ``fast`` and ``slow`` track how far, as the 10th and 90th
    percentiles of ``seconds / estimate`` over recent calls (a stochastic quantile tracker:
    each call moves them a step toward its own ratio, so they follow a machine that slows)."""

    __slots__ = ("_forget", "_w", "_x", "_xx", "_xy", "_y", "calls", "fast", "slow")

    def __init__(self, forget: float = 0.98) -> None:
        self._forget = forget
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.calls = 0
        self.fast = self.slow = 1.0  # the 10th and 90th percentiles of seconds / estimate

    def observe(self, rows: int, seconds: float) -> None:
        if self.ready:
            expected = self.estimate(rows)
            if expected > 0.0:
                self._spread(seconds / expected)
        f = self._forget
        self._w = self._w * f + 1.0
        self._x = self._x * f + rows
        self._y = self._y * f + seconds
        self._xx = self._xx * f + rows * rows
        self._xy = self._xy * f + rows * seconds
        self.calls += 1

    def line(self) -> tuple[float, float]:
        """(fixed seconds a call, seconds a row), both >= 0."""
        w = self._w
        if not w:
            return 0.0, 0.0
        mx, my = self._x / w, self._y / w
        var = self._xx / w - mx * mx
        if var <= 1e-9 * max(1.0, mx * mx):  # one size seen: cost scales with rows from it
            return 0.0, my / mx if mx else 0.0
        slope = max(0.0, (self._xy / w - mx * my) / var)
        fixed = my - slope * mx
        if fixed < 0.0:
            return 0.0, my / mx
        return fixed, slope

    @property
    def ready(self) -> bool:
        """Enough calls were measured (``MEASURED``) for the estimates to be used."""
        return self.calls >= MEASURED

    def estimate(self, rows: float) -> float:
        fixed, per_row = self.line()
        return fixed + per_row * rows

    def typical(self) -> float:
        """The size of recent calls (their mean, recent calls weighing most; 1.0 before any)."""
        return max(1.0, self._x / self._w) if self._w else 1.0

    def _spread(self, ratio: float) -> None:
        self.fast = _track(self.fast, ratio, 0.1)
        self.slow = _track(self.slow, ratio, 0.9)


def _track(at: float, value: float, share: float) -> float:
    """One step of a tracker of the ``share`` quantile (Robbins-Monro): up by ``STEP * share``
    when ``value`` lands above it, down by ``STEP * (1 - share)`` when below, so it settles
    where ``share`` of the values land below it."""
    if value > at:
        return at + QUANTILE_STEP * share
    if value < at:
        return max(QUANTILE_STEP, at - QUANTILE_STEP * (1.0 - share))
    return at


class ArrivalRate:
    """Rows per second, an exponential average over windows of at least ``window`` seconds."""

    __slots__ = ("_alpha", "_count", "_start", "_window", "rate")

    def __init__(self, window: float = 0.02, alpha: float = 0.3) -> None:
        self._window = window
        self._alpha = alpha
        self._start: float | None = None
        self._count = 0
        self.rate = 0.0

    def add(self, now: float, rows: int) -> None:
        if self._start is None:
            self._start = now
        self._count += rows
        self.current(now)

    def current(self, now: float) -> float:
        """The rate now (a window that has run long enough is folded in first)."""
        start = self._start
        if start is not None and now - start >= self._window:
            seen = self._count / (now - start)
            self.rate = seen if not self.rate else self.rate + self._alpha * (seen - self.rate)
            self._start, self._count = now, 0
        return self.rate


class Pacer:
    """The release rule of one ``max_delay="auto"`` stage (see the module's doc)."""

    __slots__ = ("arrivals", "max_size", "runners", "service", "target")

    def __init__(
        self,
        max_size: int,
        runners: int,
        target_latency: float | None,
        service: ServiceTimes | None = None,
    ) -> None:
        self.max_size = max_size
        self.runners = max(1, runners)
        self.target = target_latency
        self.service = service if service is not None else ServiceTimes()
        self.arrivals = ArrivalRate()

    def keeps_up(self, rows: int, now: float) -> bool:
        """Batches of ``rows`` rows, on every runner, serve the arrival rate (with room)."""
        took = self.service.estimate(rows)
        rate = self.arrivals.current(now)
        return took <= 0.0 or self.runners * rows / took >= KEEP_UP * rate

    def rows_needed(self, now: float) -> int:
        """The smallest batch that keeps up with arrivals (``max_size`` when none does)."""
        fixed, per_row = self.service.line()
        need = KEEP_UP * self.arrivals.current(now) / self.runners  # rows per second a runner
        if need * per_row >= 1.0:
            return self.max_size
        return min(self.max_size, max(1, math.ceil(need * fixed / (1.0 - need * per_row))))

    def rows_within(self, now: float, deadline: float) -> int:
        """The most rows a call starting ``now`` may take and still end by ``deadline`` when it
        runs slow (``service.slow``); 0 when not even one row would, ``max_size`` before the
        stage has measured its calls."""
        service = self.service
        if not service.ready:
            return self.max_size
        fixed, per_row = service.line()
        room = (deadline - now - GUARD) / max(1.0, service.slow) - fixed
        if room < per_row or room <= 0.0:
            return 0
        if per_row <= 0.0 or room >= per_row * self.max_size:  # (room may be ~forever)
            return self.max_size
        return int(room / per_row)

    def decide(
        self, now: float, rows: int, oldest: float, deadline: float | None, idle: bool
    ) -> tuple[Release | None, float | None]:
        """(why to release now, or None; when to decide again if not: None = on an event).

        ``rows`` wait, the oldest since ``oldest``; ``deadline``: the most urgent one's (None:
        none has one); ``idle``: a runner waits for work now."""
        if not idle:
            return None, None  # nothing runs sooner for being formed early: decide when a
            # runner is free (it wakes the former), with the most urgent requests of that time
        if rows >= self.max_size:
            return "full", None
        took = self.service.estimate(rows)
        due = deadline
        if self.target is not None:
            due = oldest + self.target if due is None else min(due, oldest + self.target)
        if due is not None and now >= due - took - GUARD:  # the same sum as the next look
            return "deadline", None
        if self.keeps_up(rows, now):
            return "idle", None
        cap = oldest + self.service.estimate(self.max_size)
        if now >= cap:
            return "delay", None
        checks = [cap]
        if due is not None:
            checks.append(due - took - GUARD)
        rate = self.arrivals.current(now)
        if rate > 0.0:  # the time the rows still missing should take to arrive
            checks.append(now + (self.rows_needed(now) - rows) / rate)
        return None, min(checks)
