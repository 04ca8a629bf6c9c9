"""What moves on the queues, and how batches form: requests, envelopes, ``Batching``, the
clock-free ``Batcher``. (Payload arithmetic — rows, split, concat, pad, collate — is in
``payload``.)

A :class:`Request` is one caller's unit of work, admitted once and ended exactly once through its
future (result, error, cancellation or ``PipelineClosed``). An :class:`Envelope` is the unit on a
queue: a payload plus the requests whose data it holds. Without batching an envelope carries one
request; merged batches carry several and are split back before the first unbatched stage.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Batch", "Batcher", "Batching", "Envelope", "Item", "Request"]


class Request:
    """One admitted request. ``future`` is its single outcome; once it is done the request is dead
    and every stage boundary drops it (this is how caller cancellation reaches the pipeline)."""

    __slots__ = ("future", "id")

    def __init__(self, rid: int, future: asyncio.Future[Any]) -> None:
        self.id = rid
        self.future = future

    def __repr__(self) -> str:
        f = self.future
        state = "cancelled" if f.cancelled() else "done" if f.done() else "pending"
        return f"<Request {self.id} {state}>"


class Envelope:
    """A payload in transit and the requests it belongs to."""

    __slots__ = ("chunk", "parts", "payload", "requests", "rows")

    def __init__(
        self,
        payload: Any,
        requests: list[Request],
        chunk: tuple[int, int] | None = None,
        rows: list[int] | None = None,
        parts: list[Any] | None = None,
    ) -> None:
        self.payload = payload
        self.requests = requests
        # (index, count) when the payload is one micro-batch of its request's rows.
        self.chunk = chunk
        # A merged batch: each request's row count (in order) and its slice of the payload.
        self.rows = rows
        self.parts = parts

    def split(self) -> list[Envelope]:
        """One envelope per request (a merged batch's per-request views; else itself)."""
        if self.parts is None:
            return [self]
        return [
            Envelope(p, [r], self.chunk) for r, p in zip(self.requests, self.parts, strict=True)
        ]

    def __repr__(self) -> str:
        return f"<Envelope of {len(self.requests)} request(s)>"


@dataclass(frozen=True, kw_only=True)
class Batching:
    """How a stage merges requests into batches.

    Requests (tensors, or tuples/lists/dicts of tensors, whose dim 0 is rows) are concatenated
    along dim 0 up to ``max_size`` rows, or until the oldest has waited ``max_delay`` seconds,
    whichever comes first; the stage runs once and its output is split back by each request's
    row count. A request larger than ``max_size`` runs alone, in chunks of ``max_size`` rows,
    and is reassembled.

    Args:
        max_size: the most rows in one call of the stage (>= 1).
        max_delay: the longest the oldest waiting request is held for more to arrive (>= 0 s).
        preferred_sizes: on a delay, release the largest of these sizes that is available and
            keep the rest waiting (for compiled models and CUDA graphs).
        pad: pad requests along dim 1 to the longest in the batch with this value, so that
            sequences of different lengths share a batch; outputs whose dim 1 has the padded
            length are trimmed back per request. Without it, requests whose trailing shapes or
            dtypes differ are never merged (they form separate batches).
        isolate_failures: when a merged batch raises, rerun it in halves until the failing
            request is alone, so only it fails (default on).

    Example::

        Stage(model, batch=Batching(max_size=64, max_delay=0.005))
    """

    max_size: int = 64
    max_delay: float = 0.005
    preferred_sizes: tuple[int, ...] | None = None
    pad: float | int | bool | None = None
    isolate_failures: bool = True

    def __post_init__(self) -> None:
        m = self.max_size
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Batching: max_size={m!r} must be a whole number >= 1")
        d = self.max_delay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0:
            raise ValueError(f"Batching: max_delay={d!r} must be a number of seconds >= 0")
        if self.preferred_sizes is not None:
            sizes = tuple(sorted(set(self.preferred_sizes)))
            bad = [v for v in sizes if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if not sizes or bad:
                raise ValueError(
                    f"Batching: preferred_sizes={self.preferred_sizes!r} must be whole numbers >= 1"
                )
            if sizes[-1] > m:
                raise ValueError(
                    f"Batching: preferred size {sizes[-1]} is larger than max_size={m}: "
                    "raise max_size or drop that size"
                )
            object.__setattr__(self, "preferred_sizes", sizes)


class Item:
    """One request's rows waiting in (or forming) a batch: rows [start, stop) of ``source``."""

    __slots__ = ("arrived", "request", "rows", "source", "start", "stop")

    def __init__(
        self, request: Request, source: Any, start: int, stop: int, arrived: float
    ) -> None:
        self.request = request
        self.source = source
        self.start = start
        self.stop = stop
        self.rows = stop - start
        self.arrived = arrived


Reason = Literal["full", "delay", "drain"]


@dataclass
class Batch:
    """Items released together, and why (``full``, ``delay`` or ``drain``)."""

    items: list[Item]
    reason: Reason

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)


class Batcher:
    """Forms batches from arriving requests. Sync and clock-free: callers pass ``now``.

    ``add`` files an item into the bucket of its signature; ``pop`` returns the next batch that
    is due (a bucket with ``max_size`` rows, or whose oldest item has waited ``max_delay``, or
    anything when draining); ``next_deadline`` says when to look again.
    """

    def __init__(self, spec: Batching) -> None:
        self.spec = spec
        self._buckets: dict[Any, deque[Item]] = {}
        self._rows: dict[Any, int] = {}
        self.pending_rows = 0

    def add(self, item: Item, key: Any) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = deque()
            self._rows[key] = 0
        bucket.append(item)
        self._rows[key] += item.rows
        self.pending_rows += item.rows

    def next_deadline(self) -> float | None:
        oldest = [b[0].arrived for b in self._buckets.values() if b]
        return min(oldest) + self.spec.max_delay if oldest else None

    def pop(self, now: float, draining: bool = False) -> Batch | None:
        """The next batch due at time ``now``, or None. A full bucket goes first; then the
        bucket whose oldest item has waited longest."""
        spec = self.spec
        best: tuple[int, float, Any, Reason] | None = None
        for key, bucket in self._buckets.items():
            oldest = bucket[0].arrived
            if self._rows[key] >= spec.max_size:
                reason: Reason = "full"
            elif now - oldest >= spec.max_delay:
                reason = "delay"
            elif draining:
                reason = "drain"
            else:
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
        return Batch(self._take(key, limit), reason)

    def _take(self, key: Any, limit: int) -> list[Item]:
        bucket = self._buckets[key]
        items: list[Item] = []
        rows = 0
        while bucket and (not items or rows + bucket[0].rows <= limit):
            item = bucket.popleft()
            items.append(item)
            rows += item.rows
        self._rows[key] -= rows
        self.pending_rows -= rows
        self._prune()
        return items

    def _prune(self) -> None:
        for key in [k for k, b in self._buckets.items() if not b]:
            del self._buckets[key]
            del self._rows[key]
