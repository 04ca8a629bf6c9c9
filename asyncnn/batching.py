"""What moves on the queues, and the batching options: requests, envelopes, ``Batching``.
(How batches form is ``batcher``; payload arithmetic — rows, split, concat, pad, collate — is in
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
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import check_whole, keyword_options

__all__ = [
    "PRIORITY_LIMIT",
    "Batching",
    "Envelope",
    "Request",
    "Urgency",
    "check_urgency",
    "default_urgency",
]


PRIORITY_LIMIT = 2**31  # priorities lie in [-PRIORITY_LIMIT, PRIORITY_LIMIT)

# (timeout, deadline on the loop's clock, priority, now) of one request
Urgency = tuple["float | None", "float | None", int, float]


def default_urgency(timeout: Any, priority: Any) -> bool:
    """No deadline and the default priority (an ``int`` 0): nothing to check."""
    return timeout is None and priority.__class__ is int and priority == 0


def check_urgency(now: float, timeout: Any, priority: Any) -> Urgency:
    """A request's timeout and priority as a caller passed them, checked, with its deadline on
    the clock ``now`` is read from. A priority is any whole number (numpy's too) but a bool; a
    timeout any real number >= 0, ``None`` or ``math.inf`` (no deadline)."""
    if isinstance(priority, bool) or not hasattr(type(priority), "__index__"):
        raise TypeError(f"priority={priority!r} must be a whole number (lower is more urgent)")
    priority = operator.index(priority)
    if not -PRIORITY_LIMIT <= priority < PRIORITY_LIMIT:  # aging counts levels in floats
        raise ValueError(
            f"priority={priority!r} is out of range: use a whole number from -2**31 to "
            "2**31 - 1 (lower is more urgent)"
        )
    if timeout is None:
        return None, None, priority, now
    seconds = -1.0
    if isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        try:
            seconds = float(timeout)
        except OverflowError:  # a whole number past any float
            seconds = math.inf if operator.gt(timeout, 0) else -1.0
    if not seconds >= 0:  # (NaN too)
        raise ValueError(
            f"timeout={timeout!r} must be seconds >= 0, or None or math.inf (no deadline)"
        )
    if seconds == math.inf:  # no deadline, as for asyncio's and anyio's
        return None, None, priority, now
    return seconds, now + seconds, priority, now


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


@keyword_options
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
        max_delay: the longest the oldest waiting request is held for more to arrive (>= 0 s;
            ``math.inf``: only full batches, and what is left when the pipeline closes). A
            request with a deadline (``send(x, timeout=...)``) is never held past the time the
            call it rides in needs (the stage's measured calls at their slow end, and 5 ms or
            a twentieth of its wait in hand; before 8 calls are measured, a deadline that comes
            before the delay's end releases its batch at once). Or ``"auto"``: the stage
            decides from what it measures (``pacing.Pacer``): a batch is released when waiting
            longer would cost its most urgent request the deadline, when a runner is idle and
            batches of that size keep up with the arrivals, or after one full batch's service
            time at most.
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
