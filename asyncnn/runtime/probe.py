"""What a stage measures about itself: counts, call times, backpressure, and the event hook.

One :class:`StageProbe` per stage, updated on the hot path with plain int and float adds. Call
times are measured on every call of a thread, device, Ray or batching stage; for cheap stages on
the loop, one call in :data:`LOOP_SAMPLE` is timed and their mean stands for every call (timing
costs more than such a call), unless an event subscriber wants every ``batch_done``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..batcher import REASONS
from ..pacing import ServiceTimes

__all__ = ["LOOP_SAMPLE", "SLACK_BOUNDS", "LatencyHistogram", "StageProbe"]

LOOP_SAMPLE = 64  # loop and inline stages time one call in this many
# The upper bounds (seconds) of the slack-at-dispatch histogram's exported buckets.
SLACK_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


TOP = 1e-6 * 2**30  # seconds (~18 min): this long or longer lands in the last bucket


class LatencyHistogram:
    """Seconds per call in log-spaced buckets (8 per doubling, 1 µs to ~18 min): quantiles
    within ~9% from 250 counters, however many calls; their sum; and, given ``bounds``
    (seconds, ascending), exact counts between them (``cumulative``)."""

    __slots__ = ("at", "bounds", "counts", "sum", "total")
    PER_DOUBLING = 8
    BUCKETS = 8 * 30 + 1

    def __init__(self, bounds: Sequence[float] = ()) -> None:
        self.counts = [0] * self.BUCKETS
        self.total = 0
        self.sum = 0.0
        self.bounds = tuple(bounds)
        self.at = [0] * (len(self.bounds) + 1)  # at[i]: values in (bounds[i-1], bounds[i]]

    def add(self, seconds: float) -> None:
        if seconds <= 1e-6:
            i = 0
        elif seconds < TOP:
            i = int(math.log2(seconds * 1e6) * self.PER_DOUBLING) + 1
        else:  # the last bucket holds everything longer (a request's slack may be ~forever)
            i = self.BUCKETS - 1
        self.counts[i] += 1
        self.total += 1
        self.sum += seconds
        bounds = self.bounds
        if bounds:  # (past the last bound, or NaN: only in the total)
            self.at[bisect.bisect_left(bounds, seconds) if seconds <= bounds[-1] else -1] += 1

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) in seconds: the geometric middle of its bucket; 0 if empty."""
        if not self.total:
            return 0.0
        rank = q * (self.total - 1)
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen > rank:
                if i == 0:
                    return 1e-6
                return 1e-6 * 2 ** ((i - 0.5) / self.PER_DOUBLING)
        return 1e-6 * 2 ** ((self.BUCKETS - 1) / self.PER_DOUBLING)

    def cumulative(self) -> tuple[int, ...]:
        """For each of the ``bounds`` it was made with: how many values were at most it (a
        Prometheus histogram's buckets, exact)."""
        return tuple(itertools.accumulate(self.at[:-1]))


class StageProbe:
    """One stage's counters and its event hook.

    ``observe`` is ``None`` while nobody listens (the runtime then builds no events at all), else
    ``observe(kind, stage, **fields)``.
    """

    __slots__ = (
        "active",
        "batches",
        "blocked",
        "busy",
        "failures",
        "inversions",
        "items",
        "latency",
        "misses",
        "name",
        "observe",
        "opened",
        "padded_tokens",
        "real_tokens",
        "released",
        "retries",
        "retries_exhausted",
        "rows",
        "service",
        "slack",
        "stepping",
        "timed",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.observe: Callable[..., None] | None = None
        self.items = 0  # requests the stage finished
        self.batches = 0  # calls of its function (batches formed and run, for batching stages)
        self.failures = 0
        self.busy = 0.0  # seconds inside the timed calls of the stage's function
        self.timed = 0  # calls timed (all of them, or a sample for cheap loop stages)
        self.blocked = 0.0  # seconds its workers waited for room downstream (backpressure)
        self.active = 0  # calls running now
        self.opened = 0.0  # the sum of their start times (perf_counter), for time running now
        self.latency = LatencyHistogram()
        self.rows = 0  # batching stages: rows in the batches formed (for the mean batch size)
        self.retries = 0  # batched stages: re-runs of part of a failed batch
        self.retries_exhausted = 0  # parts failed whole because max_retries ran out
        self.released: dict[str, int] = dict.fromkeys(REASONS, 0)  # why batches were formed
        # Requests ended before compute because of their deadline: passed ("expired"), or
        # closer than this stage's service time ("hopeless").
        self.misses = {"expired": 0, "hopeless": 0}
        self.slack = LatencyHistogram(SLACK_BOUNDS)  # seconds to deadline at dispatch (batching)
        self.inversions = 0  # dispatches ahead of a more urgent waiting request (aging, buckets)
        self.service = ServiceTimes()  # seconds per call by its size, fitted online
        self.real_tokens = 0  # padded stages: rows x each request's own length
        self.padded_tokens = 0  # rows x the batch's padded length
        self.stepping: Any = None  # a step stage's StepCounters

    def timed_call(self, seconds: float, size: int) -> None:
        """A call of ``size`` requests took ``seconds``."""
        self.busy += seconds
        self.timed += 1
        self.latency.add(seconds)
        self.service.observe(size, seconds)
        obs = self.observe
        if obs is not None:
            obs("batch_done", self.name, size=size, seconds=seconds)

    def begin(self, t0: float) -> None:
        """A timed call started at ``t0`` (``time.perf_counter``): it is running."""
        self.active += 1
        self.opened += t0

    def end(self, t0: float) -> None:
        """The call :meth:`begin` counted at ``t0`` is no longer running (ended, failed, or
        handed on: its time is counted by ``timed_call``, or not at all)."""
        self.active -= 1
        self.opened = self.opened - t0 if self.active else 0.0  # (no rounding left behind)

    def spent(self, now: float | None = None) -> float:
        """Seconds inside the stage's calls so far: ``busy``, or for a stage that times a
        sample of its calls (cheap loop stages), the sample's mean for every call; plus the
        time so far of the timed calls running at ``now`` (``time.perf_counter``; read when
        None), which ``busy`` counts only once they end."""
        running = 0.0
        if self.active:
            running = self.active * (time.perf_counter() if now is None else now) - self.opened
        if not self.timed:
            return running
        # Calls ended (a batching stage counts a batch when it starts: not the running ones).
        calls = self.batches + self.failures + self.retries - self.active
        return self.busy / self.timed * max(calls, self.timed) + running

    def waited(self, seconds: float) -> None:
        """Workers waited ``seconds`` for room downstream."""
        self.blocked += seconds
        obs = self.observe
        if obs is not None:
            obs("backpressure", self.name, seconds=seconds)

    def failed(self, cause: BaseException, requests: int) -> None:
        self.failures += 1
        obs = self.observe
        if obs is not None:
            obs("request_failed", self.name, error=type(cause).__name__, requests=requests)

    def formed(self, rows: int, reason: str) -> None:
        self.released[reason] += 1
        obs = self.observe
        if obs is not None:
            obs("batch_formed", self.name, size=rows, reason=reason)

    def count_tokens(self, items: Sequence[Any], spec: Any) -> None:
        """A padded batch of these items (``rows``, ``length``): real and padded tokens."""
        lengths = [i.length or 0 for i in items]
        target = spec.padded(max(lengths))
        for item, n in zip(items, lengths, strict=True):
            self.real_tokens += item.rows * n
            self.padded_tokens += item.rows * target

    def need(self, rows: float = 1, spread: float = 1.0) -> float:
        """Seconds a call of ``rows`` takes here, as measured so far (0.0 before 8 calls);
        times ``spread`` (``service.slow``: what 9 calls in 10 take at most; ``service.fast``:
        at least)."""
        service = self.service
        return service.estimate(rows) * spread if service.ready else 0.0

    def ride(self, inflight: int) -> float:
        """Seconds of the call a request arriving now rides in, with ``inflight`` requests in
        the pipeline (itself included): a call of the stage's recent size, or of ``inflight``
        when fewer (a batching stage under load runs full batches, not one request's call;
        an idle one runs it alone). 0.0 before 8 calls."""
        return self.need(min(self.service.typical(), inflight))

    def missed(self, reason: str) -> None:
        """A request was ended here, before compute, by its deadline (``expired``/``hopeless``)."""
        self.misses[reason] += 1
        obs = self.observe
        if obs is not None:
            obs("deadline_miss", self.name, reason=reason)

    def progress(self) -> int:
        """Grows whenever the stage finishes or fails a call (for the stall watchdog)."""
        return self.batches + self.failures + self.retries
