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
import bisect
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import check_whole

__all__ = ["Batch", "Batcher", "Batching", "Envelope", "Item", "Request"]


class Request:
    """One admitted request. ``future`` is its single outcome; once it is done the request is dead
    and every stage boundary drops it (this is how caller cancellation reaches the pipeline)."""

    __slots__ = ("deadline", "future", "id", "priority", "since", "stream", "trace")

    def __init__(
        self,
        rid: int,
        future: asyncio.Future[Any],
        stream: Any = None,
        deadline: float | None = None,
        priority: int = 0,
        since: float = 0.0,
    ) -> None:
        self.id = rid
        self.future = future
        # A request through a generator stage: its parts, in order (a ``streams.PartStream``).
        self.stream = stream
        # When it must be done, on the loop's clock (None: no deadline); lower priority is more
        # urgent; ``since``: when it was admitted (for aging). See ``urgency``.
        self.deadline = deadline
        self.priority = priority
        self.since = since
        self.trace: Any = None  # a tracing.RequestTrace while the pipeline traces

    @property
    def urgent(self) -> bool:
        """It has a deadline or a priority: queues that hold it rank their items."""
        return self.deadline is not None or self.priority != 0

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
        max_delay: the longest the oldest waiting request is held for more to arrive (>= 0 s),
            or ``"auto"``: the stage decides from what it measures (``pacing.Pacer``): a batch
            is released when waiting longer would cost its most urgent request the deadline
            (``send(x, timeout=...)``), when a runner is idle and batches of that size keep up
            with the arrivals, or after one full batch's service time at most.
        target_latency: with ``max_delay="auto"`` (implied when this is set), seconds from a
            request's arrival at this stage to the release of its batch, for requests without
            a deadline of their own.
        preferred_sizes: on a delay, release the largest of these sizes that is available and
            keep the rest waiting (for compiled models and CUDA graphs).
        pad: pad variable-length requests to the longest in the batch, so that sequences of
            different lengths share a batch: one value for every tensor of the request
            (``pad=0``), a mapping of key -> value for mapping requests (a tokenizer's output:
            ``pad={"input_ids": tok.pad_token_id, "attention_mask": 0}``; keys not listed are
            not padded and must agree in shape), or one value (or ``None``) per position for
            tuple requests. Without it, requests whose trailing shapes differ are never merged.
        pad_dim: the dim that padding extends (default 1, the sequence dim after the rows).
        pad_side: ``"right"`` (default) or ``"left"``.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        trim: cut outputs back to each request's length along ``pad_dim``: ``True`` for every
            output tensor, or the keys (positions) of the outputs to cut. Off by default:
            nothing is ever trimmed by guessing from shapes. An output named here whose
            ``pad_dim`` is not the padded length is an error naming the stage.
        length_buckets: with ``pad``, requests are batched only with others in the same
            length bucket (the smallest bucket length >= theirs; longer ones share the last),
            so short requests do not pay for a long one's padding.
        max_tokens: with ``pad``, the most rows x padded length in one call, beside
            ``max_size``.
        collate: ``collate(payloads) -> input`` for payloads that are not tensors (strings,
            images, records): the stage is called with what it returns. Needs ``split``.
        split: ``split(output, n) -> list of n results``, one per request in order. With the
            hooks each request counts as one row toward ``max_size``.
        isolate_failures: when a merged batch raises, rerun it in halves until the failing
            request is alone, so only it fails (default on). One failing request among n costs
            about 2·log2(n) re-runs of parts of the batch.
        max_retries: the most re-runs one batch may cost while isolating failures (default
            ``None``: as many as bisection needs); when they run out, the parts still failing
            fail whole. ``stats()`` counts ``retries`` and ``retries_exhausted``.

    Example::

        Stage(model, batch=Batching(max_size=64, max_delay=0.005))
        Stage(encode, batch=Batching(max_size=32, pad={"input_ids": 0, "attention_mask": 0},
                                     length_buckets=(16, 32, 64, 128), max_tokens=4096))
    """

    max_size: int = 64
    max_delay: float | Literal["auto"] = 0.005
    target_latency: float | None = None
    preferred_sizes: tuple[int, ...] | None = None
    pad: float | int | Mapping[Any, float | int | None] | Sequence[float | int | None] | None = None
    pad_dim: int = 1
    pad_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None
    trim: bool | tuple[Any, ...] = False
    length_buckets: tuple[int, ...] | None = None
    max_tokens: int | None = None
    collate: Callable[[list[Any]], Any] | None = None
    split: Callable[[Any, int], Sequence[Any]] | None = None
    isolate_failures: bool = True
    max_retries: int | None = None

    def __post_init__(self) -> None:
        m = check_whole(self.max_size, "Batching: max_size")
        self._check_delay()
        if self.preferred_sizes is not None:
            sizes = _whole_numbers(self.preferred_sizes, "preferred_sizes")
            if sizes[-1] > m:
                raise ValueError(
                    f"Batching: preferred size {sizes[-1]} is larger than max_size={m}: "
                    "raise max_size or drop that size"
                )
            object.__setattr__(self, "preferred_sizes", sizes)
        if self.max_retries is not None:
            check_whole(self.max_retries, "Batching: max_retries", 0)
        self._check_padding()
        if (self.collate is None) != (self.split is None):
            raise ValueError(
                "Batching: collate= and split= go together: collate builds the stage's input "
                "from the requests, split cuts its output back into one result per request"
            )
        if self.collate is not None and self.pad is not None:
            raise ValueError("Batching: collate=/split= hooks do their own padding: drop pad=")

    @property
    def auto(self) -> bool:
        """Batches are released by the stage's pacer (``max_delay="auto"``)."""
        return self.max_delay == "auto"

    def _check_delay(self) -> None:
        d, t = self.max_delay, self.target_latency
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"Batching: target_latency={t!r} must be a number of seconds > 0")
            if d == Batching.max_delay:  # left at its default: the target implies "auto"
                object.__setattr__(self, "max_delay", "auto")
            elif d != "auto":
                raise ValueError(
                    f"Batching: target_latency= paces batches itself: drop max_delay={d!r} "
                    "(or set max_delay='auto')"
                )
            return
        if d == "auto":
            return
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0:
            raise ValueError(
                f"Batching: max_delay={d!r} must be a number of seconds >= 0, or 'auto'"
            )

    def _check_padding(self) -> None:
        pad = self.pad
        if pad is None:
            unused = [n for n in ("length_buckets", "max_tokens") if getattr(self, n) is not None]
            if self.trim:
                unused.append("trim")
            if unused:
                raise ValueError(f"Batching: {', '.join(unused)} need pad=")
            return
        if isinstance(pad, Mapping):
            values: list[Any] = list(pad.values())
            object.__setattr__(self, "pad", dict(pad))
        elif isinstance(pad, (tuple, list)):
            values = list(pad)
            object.__setattr__(self, "pad", tuple(pad))
        else:
            values = [pad]
        if any(isinstance(v, bool) or not isinstance(v, (int, float, type(None))) for v in values):
            raise ValueError(
                f"Batching: pad={pad!r}: use a number, a mapping of key -> number, or a tuple of "
                "numbers (None: not padded)"
            )
        check_whole(self.pad_dim, "Batching: pad_dim")
        if self.pad_side not in ("right", "left"):
            raise ValueError(f"Batching: pad_side={self.pad_side!r}: use 'right' or 'left'")
        if self.pad_to_multiple_of is not None:
            check_whole(self.pad_to_multiple_of, "Batching: pad_to_multiple_of")
        if self.max_tokens is not None:
            check_whole(self.max_tokens, "Batching: max_tokens")
        if self.length_buckets is not None:
            buckets = _whole_numbers(self.length_buckets, "length_buckets")
            object.__setattr__(self, "length_buckets", buckets)
        if not isinstance(self.trim, bool):
            if isinstance(self.trim, (str, int)):
                object.__setattr__(self, "trim", (self.trim,))
            else:
                object.__setattr__(self, "trim", tuple(self.trim))

    def bucket(self, length: int | None) -> int | None:
        """The length bucket of a request of this length (None without buckets)."""
        buckets = self.length_buckets
        if buckets is None or length is None:
            return None
        return bisect.bisect_left(buckets, length)

    def padded(self, length: int) -> int:
        """A length rounded up to ``pad_to_multiple_of``."""
        m = self.pad_to_multiple_of
        return length if not m else -(-length // m) * m


def _whole_numbers(values: Any, name: str) -> tuple[int, ...]:
    sizes = tuple(sorted(set(values)))
    if not sizes or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ValueError(f"Batching: {name}={values!r} must be whole numbers >= 1")
    return sizes


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
    would cost its most urgent request the deadline), ``idle`` (a runner was free and the batch
    keeps up with arrivals), ``delay`` (the timer: the oldest waited ``max_delay``, or one full
    batch's time under ``"auto"``) or ``drain`` (shutdown)."""

    items: list[Item]
    reason: Reason

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)


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
    again. A batch never takes more than ``max_size`` rows or ``max_tokens`` rows x padded
    length (a single request larger than that goes alone). Once an urgent request (a deadline
    or a priority) arrives, each bucket keeps its items most urgent first (priority, then
    deadline, then arrival), so a batch takes the most urgent compatible requests.
    """

    def __init__(self, spec: Batching, pacer: Any = None) -> None:
        self.spec = spec
        self.pacer = pacer  # a pacing.Pacer when spec.auto
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
        oldest = [b[0].arrived for b in self._buckets.values() if b]
        return min(oldest) + self.spec.max_delay if oldest else None  # type: ignore[operator]

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
        return Batch(self._take(key, limit), reason)

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
            return "delay" if now - oldest >= spec.max_delay else None  # type: ignore[operator]
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
