"""What moves on the queues: requests and the batch envelopes that carry them.

A :class:`Request` is one caller's unit of work, admitted once and ended exactly once through its
future (result, error, cancellation or ``PipelineClosed``). An :class:`Envelope` is the unit on a
queue: a payload plus the requests whose data it holds. Without batching an envelope carries one
request; merged batches carry several and are split back before the first unbatched stage.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "Batch",
    "Batcher",
    "Batching",
    "Envelope",
    "Item",
    "Request",
    "concat_rows",
    "count_rows",
    "run_batch",
    "signature",
    "split_rows",
]


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


MAX_DEPTH = 16  # nesting of tuples/lists/dicts in one request; deeper is refused


class PayloadTooDeep(TypeError):
    """A request nests containers deeper than ``MAX_DEPTH``: refused, never walked further."""


def _too_deep() -> TypeError:
    return PayloadTooDeep(
        f"the request nests tuples/lists/dicts more than {MAX_DEPTH} levels deep: flatten it "
        "(a hostile or runaway payload is refused before it is walked further)"
    )


def _tensors(payload: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(payload, torch.Tensor):
        return [payload]
    if depth >= MAX_DEPTH and isinstance(payload, (tuple, list, dict)):
        raise _too_deep()
    if isinstance(payload, (tuple, list)):
        return [t for p in payload for t in _tensors(p, depth + 1)]
    if isinstance(payload, dict):
        return [t for p in payload.values() for t in _tensors(p, depth + 1)]
    return []


def count_rows(payload: Any) -> int:
    """Rows (dim 0) of a tensor, or of a tuple/list/dict of tensors that agree on dim 0.

    Raises:
        TypeError: the payload holds no tensor, or a 0-d tensor.
        ValueError: its tensors disagree on dim 0.
    """
    if isinstance(payload, torch.Tensor) and payload.dim() > 0:
        return int(payload.shape[0])
    tensors = _tensors(payload)
    if not tensors:
        raise TypeError(
            f"expected a tensor, or a tuple/list/dict of tensors, split along dim 0; "
            f"got {type(payload).__name__}"
        )
    if any(t.dim() == 0 for t in tensors):
        raise TypeError("a 0-d tensor has no rows to split: give every tensor a batch dim 0")
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise ValueError(f"the tensors of one request disagree on dim 0 (rows {sorted(rows)})")
    return rows.pop()


def _map_split(payload: Any, size: int, n: int) -> list[Any]:
    if isinstance(payload, torch.Tensor):
        return list(torch.split(payload, size))
    if isinstance(payload, (tuple, list)):
        cols = [_map_split(p, size, n) for p in payload]
        return [type(payload)(c[i] for c in cols) for i in range(n)]
    if isinstance(payload, dict):
        cols_d = {k: _map_split(v, size, n) for k, v in payload.items()}
        return [{k: v[i] for k, v in cols_d.items()} for i in range(n)]
    return [payload] * n


def split_rows(payload: Any, size: int) -> list[Any]:
    """Cut a payload into pieces of at most ``size`` rows (views, no copy)."""
    n = max(1, math.ceil(count_rows(payload) / size))
    return _map_split(payload, size, n)


def concat_rows(parts: list[Any]) -> Any:
    """The inverse of :func:`split_rows`: concatenate pieces along dim 0."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(concat_rows([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_rows([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate outputs of type {type(first).__name__} along dim 0")


# -- batching ------------------------------------------------------------------------------------


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


def signature(payload: Any, pad: bool = False, depth: int = 0) -> Any:
    """What must match for two requests to share a batch: trailing shapes, dtypes, devices (and
    dict keys / tuple lengths). With ``pad``, dim 1 of a tensor may differ."""
    if depth >= MAX_DEPTH:
        raise _too_deep()
    if isinstance(payload, torch.Tensor):
        if payload.dim() == 0:
            raise TypeError("a 0-d tensor has no rows: give the request a batch dim 0")
        if pad:
            if payload.dim() < 2:
                raise TypeError(
                    f"Batching(pad=...) pads dim 1, but this tensor has shape "
                    f"{tuple(payload.shape)}: give it a sequence dim 1"
                )
            return (tuple(payload.shape[2:]), payload.dtype, payload.device)
        return (tuple(payload.shape[1:]), payload.dtype, payload.device)
    if pad:
        raise TypeError(
            f"Batching(pad=...) takes a tensor per request, got {type(payload).__name__}"
        )
    if isinstance(payload, (tuple, list)) and payload:
        return (type(payload), *(signature(p, False, depth + 1) for p in payload))
    if isinstance(payload, dict) and payload:
        return (dict, *((k, signature(v, False, depth + 1)) for k, v in payload.items()))
    raise TypeError(
        "a batching stage takes a tensor, or a tuple/list/dict of tensors, whose dim 0 is rows; "
        f"got {type(payload).__name__}"
    )


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


def _slice_rows(payload: Any, start: int, stop: int) -> Any:
    if isinstance(payload, torch.Tensor):
        return payload[start:stop]
    if isinstance(payload, (tuple, list)):
        return type(payload)(_slice_rows(p, start, stop) for p in payload)
    if isinstance(payload, dict):
        return {k: _slice_rows(v, start, stop) for k, v in payload.items()}
    return payload


def _pad_dim1(tensors: list[torch.Tensor], value: float) -> tuple[torch.Tensor, int]:
    longest = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[1] < longest:
            fill = t.new_full((t.shape[0], longest - t.shape[1], *t.shape[2:]), value)
            t = torch.cat([t, fill], dim=1)
        padded.append(t)
    return torch.cat(padded), longest


def _split_by(payload: Any, rows: list[int]) -> list[Any]:
    if isinstance(payload, torch.Tensor):
        return list(torch.split(payload, rows))
    if isinstance(payload, (tuple, list)):
        cols = [_split_by(p, rows) for p in payload]
        return [type(payload)(c[i] for c in cols) for i in range(len(rows))]
    if isinstance(payload, dict):
        cols_d = {k: _split_by(v, rows) for k, v in payload.items()}
        return [{k: v[i] for k, v in cols_d.items()} for i in range(len(rows))]
    raise TypeError(f"cannot split an output of type {type(payload).__name__} by rows")


class RowMismatch(ValueError):
    """A batched stage changed the number of rows (dim 0) of its batch."""


def run_batch(
    stage: str,
    call: Callable[[Any], Any],
    items: Sequence[tuple[Any, int, int]],
    max_size: int,
    pad: float | None,
    launch: Callable[[Callable[..., Any], tuple[Any, ...]], tuple[Any, Any]] | None = None,
) -> tuple[Any, list[int], list[Any], Any]:
    """Collate, call, check and split one batch; runs on the stage's thread.

    ``items`` are (source, start, stop) row ranges. A batch over ``max_size`` rows (one oversized
    request) runs in chunks of ``max_size`` and is reassembled. ``launch(call, args)``, when given,
    runs the call on a device and returns (output, completion). Returns the merged output, each
    item's row count, each item's slice of the output, and the completion (None when done).
    """
    payload, rows, lengths = collate(items, pad)
    fn = call if sum(rows) <= max_size else _chunked(call, max_size)
    if launch is None:
        out, done = fn(payload), None
    else:
        out, done = launch(fn, (payload,))
    out, rows, parts = finish(stage, out, rows, lengths)
    return out, rows, parts, done


def _chunked(call: Callable[[Any], Any], size: int) -> Callable[[Any], Any]:
    def run(payload: Any) -> Any:
        return concat_rows([call(part) for part in split_rows(payload, size)])

    return run


def collate(
    items: Sequence[tuple[Any, int, int]], pad: float | None
) -> tuple[Any, list[int], list[int] | None]:
    rows = [stop - start for _, start, stop in items]
    parts = [
        src if start == 0 and stop == count_rows(src) else _slice_rows(src, start, stop)
        for src, start, stop in items
    ]
    if pad is not None:
        lengths = [p.shape[1] for p in parts]
        payload, _ = _pad_dim1(parts, float(pad))
        return payload, rows, lengths
    return concat_rows(parts), rows, None


def finish(
    stage: str, out: Any, rows: list[int], lengths: list[int] | None
) -> tuple[Any, list[int], list[Any]]:
    total = sum(rows)
    try:
        got = count_rows(out)
    except (TypeError, ValueError) as exc:
        raise RowMismatch(
            f"stage {stage!r} returned {type(out).__name__} for a batch of {total} rows: a "
            f"batched stage must return a tensor (or tuple/list/dict of tensors) with dim 0 "
            f"= rows ({exc})"
        ) from None
    if got != total:
        raise RowMismatch(
            f"stage {stage!r} returned {got} rows for a batch of {total}: a batched stage must "
            "keep dim 0 (one output row per input row)"
        )
    parts = _split_by(out, rows) if len(rows) > 1 else [out]
    if lengths is not None:
        longest = max(lengths)
        parts = [
            p[:, :n]
            if isinstance(p, torch.Tensor) and p.dim() >= 2 and p.shape[1] == longest
            else p
            for p, n in zip(parts, lengths, strict=True)
        ]
    return out, rows, parts
