"""Predictive admission (``Pipeline(max_in_flight=...)``): refuse a request at once, with
``Overloaded`` and a ``retry_after``, when it cannot finish in time, instead of queueing it to
time out later. Sync, with the clock passed in: tests drive it without a loop.

The estimate is Little's law on what the ledger already counts: requests are served (completed
or failed; not those cancelled or timed out, which cost little) at ``rate`` per second (an
exponential average over windows while work is in flight), so the ``ahead`` requests in flight
that are at least as urgent as a new one (strict priority serves them first) end in about
``ahead / rate`` seconds; add the pipeline's service time (``base``: the sum of its
stages' measured call times, at a batching stage the call of a batch of its recent size, which
a request rides in under load: ``Runtime.need``) and compare with the request's deadline.

Requests in flight are not all queued work: with room to spare they are inside a stage's many
workers or on their way between hops, and requests end at the rate they arrive, not at the
rate the stages could serve them, so ``ahead / rate`` is about the time a request spends in
the pipeline, counted again on top of its own calls. Counted so, a pipeline with a 10 ms I/O
stage on 64 workers refused 66-74% of urgent requests with 20 ms deadlines while those it
answered took 11 ms. So a window is also judged by how busy its busiest stage was (``busy``:
each stage's seconds inside calls per worker): below ``ROOM`` of the time it had room, and
the rate it served is scaled to what it would serve at ``ROOM`` use. At ``ROOM`` or more
(saturated, the loop's share of the cores taken into account) the rate stands as measured. A
call still running counts up to the window's end (``StageProbe.spent``): a window shorter than
a stage's calls, in which only a short call ended, would otherwise look idle while the stage
is full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .ledger import Ledger

__all__ = ["Admission", "Refusal"]

WINDOW = 0.05  # seconds between rate samples
ALPHA = 0.3  # weight of a new sample
ROOM = 0.5  # a busiest stage inside calls less than this share of a window had room
MOST = 100.0  # the most a window's ended rate is scaled by for the room it had


Refusal = tuple[str, float]  # (why, retry_after seconds) of a refused request


class Admission:
    """Whether one more request may enter. ``limit``: the most requests in flight."""

    __slots__ = (
        "_base",
        "_busy",
        "_busy_at",
        "_ended",
        "_ledger",
        "_since",
        "base",
        "limit",
        "rate",
        "refused",
    )

    def __init__(
        self,
        limit: int,
        ledger: Ledger,
        base: Callable[[], float],
        busy: Callable[[], Sequence[float]] | None = None,
    ) -> None:
        self.limit = limit
        self._ledger = ledger
        ledger.by_priority = {}
        self._base = base
        # Each stage's seconds inside calls so far (running ones up to now), per worker.
        self._busy = busy
        self._busy_at: Sequence[float] = ()
        self._since: float | None = None
        self._ended = 0
        self.rate = 0.0  # requests ended per second while busy
        self.base = 0.0  # the pipeline's service time, sampled with the rate
        self.refused = 0

    def _ended_now(self) -> int:
        # Requests served: those ended by a deadline or a cancellation took little or no
        # work, and counting them would make the pipeline look faster than it is.
        k = self._ledger.counters
        return k.completed + k.failed

    def _sample(self, now: float) -> None:
        if self._since is None or not len(self._ledger):  # idle: start a fresh window
            self._start(now)
            return
        span = now - self._since
        if span >= WINDOW:
            busy = self._busy() if self._busy is not None else None
            seen = (self._ended_now() - self._ended) / span * self._room(span, busy)
            if seen > 0.0:
                self.rate = seen if not self.rate else self.rate + ALPHA * (seen - self.rate)
            self._start(now, busy)

    def _start(self, now: float, busy: Sequence[float] | None = None) -> None:
        """Open a window at ``now``; ``busy``: the stages' reading already taken now."""
        self._since, self._ended = now, self._ended_now()
        self.base = self._base()
        if self._busy is not None:
            self._busy_at = self._busy() if busy is None else busy

    def _room(self, span: float, now: Sequence[float] | None) -> float:
        """How much faster than measured the window's requests could have been served: 1 when
        its busiest stage was inside calls ``ROOM`` of the time or more, else ``ROOM / use``
        (at most ``MOST``); 1 when no stage timed a call in it (nothing to judge by)."""
        if now is None or len(now) != len(self._busy_at):
            return 1.0
        use = max((b - a for a, b in zip(self._busy_at, now, strict=True)), default=0.0) / span
        if use <= 0.0 or use >= ROOM:
            return 1.0
        return min(MOST, ROOM / use)

    def check(self, now: float, priority: int, deadline: float | None) -> Refusal | None:
        """None to admit; else why not and when to retry."""
        self._sample(now)
        ledger, rate = self._ledger, self.rate
        n = len(ledger)
        if n >= self.limit:
            self.refused += 1
            wait = (n - self.limit + 1) / rate if rate else WINDOW
            return f"{n} requests are in flight (max_in_flight={self.limit})", wait
        if deadline is None or not rate:
            return None
        counts = ledger.by_priority or {}
        ahead = sum(c for p, c in counts.items() if p <= priority)
        finish = now + ahead / rate + self.base
        if finish <= deadline:
            return None
        self.refused += 1
        why = (
            f"it would finish ~{(finish - now) * 1e3:.1f} ms from now, "
            f"{(finish - deadline) * 1e3:.1f} ms past its deadline, behind {ahead} requests "
            f"at least as urgent ({rate:.0f} requests/s end)"
        )
        return why, finish - deadline
