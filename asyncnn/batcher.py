"""How batches form: the clock-free :class:`Batcher` (signatures, length buckets, token budget,
delay or a pacer; most urgent first once requests are urgent) and why each batch was released.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .batching import Batching, Request

__all__ = ["HOLD_GUARD", "HOLD_SHARE", "REASONS", "Batch", "Batcher", "Item", "Reason"]


class Item:
    """One request's rows waiting in (or forming) a batch: rows [start, stop) of ``source``."""

    __slots__ = ("arrived", "length", "request", "rows", "source", "start", "stop")

    def __init__(
        self,
        request: Request,
        source: Any,
        start: int,
        stop: int,
        arrived: float,
        length: int | None = None,
    ) -> None:
        self.request = request
        self.source = source
        self.start = start
        self.stop = stop
        self.rows = stop - start
        self.arrived = arrived
        self.length = length  # along pad_dim, for padded batches


Reason = Literal["full", "preferred", "deadline", "idle", "delay", "drain"]
REASONS: tuple[Reason, ...] = ("full", "preferred", "deadline", "idle", "delay", "drain")


@dataclass
class Batch:
    """Items released together, and why: ``full`` (max_size or max_tokens), ``preferred`` (a
    delay or the pacer released it, cut to a preferred size), ``deadline`` (waiting longer
    would cost its most urgent request the deadline, or a paced batch cut to a size whose call
    ends by that deadline), ``idle`` (a runner was free and the batch
    keeps up with arrivals), ``delay`` (the timer: the oldest waited ``max_delay``, or one full
    batch's time under ``"auto"``) or ``drain`` (shutdown)."""

    items: list[Item]
    reason: Reason

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)


# Fixed delay: seconds kept in hand before the call a request with a deadline rides in, at the
# least: the former's timer fires ~1 ms late (both loops count whole milliseconds), and the
# batch's trip to a runner thread and its answer's back to the caller took 1-2 ms more on a
# 2-core VM. For longer waits, a share of the wait (a loaded loop runs later by more).
HOLD_GUARD = 0.005
HOLD_SHARE = 0.05


def _no_need(rows: float) -> float | None:
    return None  # not known


def _rank(item: Item) -> tuple[int, float, float]:
    req = item.request
    deadline = req.deadline
    return req.priority, math.inf if deadline is None else deadline, item.arrived


class Batcher:
    """Forms batches from arriving requests. Sync and clock-free: callers pass ``now``.

    ``add`` files an item into the bucket of its key (its signature and length bucket);
    ``pop`` returns the next batch that is due (a bucket with ``max_size`` rows or ``max_tokens``
    padded tokens, or whose oldest item has waited ``max_delay``, or anything when draining;
    under ``max_delay="auto"`` the ``pacer`` decides); ``next_deadline`` says when to look
    again. With a fixed ``max_delay``, a bucket also goes once holding it longer would cost its
    most urgent request the deadline: ``need(rows)`` is the call it would ride in (the stage's
    measured service time; None before it is known), so that a delay longer than a caller's
    timeout does not hold the request until it times out. A batch never takes more than
    ``max_size`` rows or ``max_tokens`` rows x padded length (a single request larger than
    that goes alone). Once an urgent request (a deadline or a priority) arrives, each bucket
    keeps its items most urgent first (priority, then deadline, then arrival), so a batch
    takes the most urgent compatible requests.
    """

    def __init__(
        self,
        spec: Batching,
        pacer: Any = None,
        need: Callable[[float], float | None] | None = None,
    ) -> None:
        self.spec = spec
        self.pacer = pacer  # a pacing.Pacer when spec.auto
        self._need = need or _no_need  # fixed delay: seconds a call of so many rows takes
        self._buckets: dict[Any, deque[Item]] = {}
        self._rows: dict[Any, int] = {}
        self._due: dict[Any, float] = {}  # earliest deadline in a bucket (ranked buckets)
        self.pending_rows = 0
        self.ranked = False
        self._recheck: float | None = None

    def add(self, item: Item, key: Any) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = deque()
            self._rows[key] = 0
        if item.request.urgent:
            self.ranked = True
            deadline = item.request.deadline
            if deadline is not None and deadline < self._due.get(key, math.inf):
                self._due[key] = deadline
        if self.ranked and bucket and _rank(bucket[-1]) > _rank(item):
            bisect.insort(bucket, item, key=_rank)
        else:
            bucket.append(item)
        self._rows[key] += item.rows
        self.pending_rows += item.rows

    def next_deadline(self) -> float | None:
        if self.pacer is not None:
            return self._recheck
        if not self.ranked:  # no deadline or priority came: the delay alone (once per arrival)
            oldest = [b[0].arrived for b in self._buckets.values() if b]
            return min(oldest) + self.spec.max_delay if oldest else None  # type: ignore[operator]
        delay: float = self.spec.max_delay  # type: ignore[assignment]
        times = [
            min(oldest + delay, self._held_until(key, oldest))
            for key, oldest in ((k, self._oldest(b)) for k, b in self._buckets.items() if b)
        ]
        return min(times) if times else None

    def _held_until(self, key: Any, oldest: float) -> float:
        """Fixed delay: when holding the bucket longer would cost its most urgent request the
        deadline (``math.inf`` without one). Before the stage's calls are measured, a request
        whose deadline comes before the delay's end goes at once."""
        due = self._due.get(key)
        if due is None:
            return math.inf
        need = self._need(self._rows[key])
        if need is None:
            delay: float = self.spec.max_delay  # type: ignore[assignment]
            return -math.inf if due < oldest + delay else math.inf
        return due - need - max(HOLD_GUARD, HOLD_SHARE * (due - oldest))

    def _oldest(self, bucket: deque[Item]) -> float:
        """When the bucket's oldest item arrived (ranked buckets are not in arrival order)."""
        return min(i.arrived for i in bucket) if self.ranked else bucket[0].arrived

    def pop(self, now: float, draining: bool = False, idle: bool = True) -> Batch | None:
        """The next batch due at time ``now``, or None. A full bucket goes first; then the
        bucket whose oldest item has waited longest. ``idle``: a runner waits for work now."""
        spec = self.spec
        best: tuple[int, float, Any, Reason] | None = None
        self._recheck = None
        for key, bucket in self._buckets.items():
            oldest = min(i.arrived for i in bucket) if self.ranked else bucket[0].arrived
            reason = self._due_now(key, bucket, now, oldest, idle)
            if reason is None and draining:
                reason = "drain"
            if reason is None:
                continue
            rank = (0 if reason == "full" else 1, oldest)
            if best is None or rank < best[:2]:
                best = (*rank, key, reason)
        if best is None:
            return None
        key, reason = best[2], best[3]
        limit = spec.max_size
        if reason != "full" and spec.preferred_sizes is not None:
            fitting = [p for p in spec.preferred_sizes if p <= self._rows[key]]
            limit = fitting[-1] if fitting else spec.max_size
            if limit < self._rows[key] and reason != "drain":
                reason = "preferred"
        if self.pacer is not None and self.ranked and reason != "drain":
            cut = self._cut_for_head(key, limit, now)
            if cut < limit:
                limit, reason = cut, "deadline"
        return Batch(self._take(key, limit), reason)

    def _cut_for_head(self, key: Any, limit: int, now: float) -> int:
        """Paced: a smaller batch when the full one, running slow, would end past the deadline
        of its most urgent request and a smaller one would not, cutting only rows of a less
        urgent class (a request is not given up for one of its own class); else ``limit``."""
        bucket = self._buckets[key]
        head = bucket[0].request
        if head.deadline is None:
            return limit
        fits = self.pacer.rows_within(now, head.deadline)
        if fits == 0 or fits >= min(limit, self._rows[key]):
            return limit  # out of reach whatever the size, or the batch fits as it is
        own = 0
        for item in bucket:
            if item.request.priority > head.priority:
                break
            own += item.rows
            if own >= fits:
                return limit  # its own class fills what fits: nothing less urgent to cut
        return fits

    def holds(self, req: Request) -> bool:
        """``req`` waits here for its batch (a scan: for diagnostics, not the hot path)."""
        return any(i.request is req for b in self._buckets.values() for i in b)

    def most_urgent(self) -> int | float:
        """The most urgent priority waiting (``math.inf`` when nothing waits)."""
        return min((b[0].request.priority for b in self._buckets.values() if b), default=math.inf)

    def _due_now(
        self, key: Any, bucket: deque[Item], now: float, oldest: float, idle: bool
    ) -> Reason | None:
        spec = self.spec
        if self.pacer is not None and not idle:
            return None  # paced: a batch forms when a runner can take it, most urgent first
            # (when draining, pop releases what is left anyway)
        if self._rows[key] >= spec.max_size or self._over_budget(bucket):
            return "full"
        if self.pacer is None:
            if now >= oldest + spec.max_delay:  # type: ignore[operator]  # as next_deadline
                return "delay"
            if self._due and now >= self._held_until(key, oldest):
                return "deadline"
            return None
        reason: Reason | None
        reason, recheck = self.pacer.decide(now, self._rows[key], oldest, self._due.get(key), idle)
        if recheck is not None and (self._recheck is None or recheck < self._recheck):
            self._recheck = recheck
        return reason

    def _over_budget(self, bucket: deque[Item]) -> bool:
        budget = self.spec.max_tokens
        if budget is None:
            return False
        rows = sum(i.rows for i in bucket)
        return rows * self.spec.padded(max(i.length or 0 for i in bucket)) >= budget

    def _take(self, key: Any, limit: int) -> list[Item]:
        bucket = self._buckets[key]
        budget, padded = self.spec.max_tokens, self.spec.padded
        items: list[Item] = []
        rows = longest = 0
        while bucket:
            nxt = bucket[0]
            grown = max(longest, nxt.length or 0)
            fits = rows + nxt.rows <= limit and (
                budget is None or (rows + nxt.rows) * padded(grown) <= budget
            )
            if items and not fits:
                break
            items.append(bucket.popleft())
            rows += nxt.rows
            longest = grown
        self._rows[key] -= rows
        self.pending_rows -= rows
        if key in self._due:
            left = [i.request.deadline for i in bucket if i.request.deadline is not None]
            if left:
                self._due[key] = min(left)
            else:
                del self._due[key]
        self._prune()
        return items

    def _prune(self) -> None:
        for key in [k for k, b in self._buckets.items() if not b]:
            del self._buckets[key]
            del self._rows[key]
