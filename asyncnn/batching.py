"""What moves on the queues: requests and the batch envelopes that carry them.

A :class:`Request` is one caller's unit of work, admitted once and ended exactly once through its
future (result, error, cancellation or ``PipelineClosed``). An :class:`Envelope` is the unit on a
queue: a payload plus the requests whose data it holds. Without batching an envelope carries one
request; merged batches carry several and are split back before the first unbatched stage.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import torch

__all__ = ["Envelope", "Request", "concat_rows", "count_rows", "split_rows"]


class Request:
    """One admitted request. ``future`` is its single outcome; once it is done the request is dead
    and every stage boundary drops it (this is how caller cancellation reaches the pipeline)."""

    __slots__ = ("future", "id", "parked")

    def __init__(self, rid: int, future: asyncio.Future[Any]) -> None:
        self.id = rid
        self.future = future
        # Join states holding a partial result of this request; released when it ends early.
        self.parked: list[Any] | None = None

    def __repr__(self) -> str:
        f = self.future
        state = "cancelled" if f.cancelled() else "done" if f.done() else "pending"
        return f"<Request {self.id} {state}>"


class Envelope:
    """A payload in transit and the requests it belongs to."""

    __slots__ = ("chunk", "payload", "requests")

    def __init__(
        self, payload: Any, requests: list[Request], chunk: tuple[int, int] | None = None
    ) -> None:
        self.payload = payload
        self.requests = requests
        # (index, count) when the payload is one micro-batch of its request's rows.
        self.chunk = chunk

    def __repr__(self) -> str:
        return f"<Envelope of {len(self.requests)} request(s)>"


def _tensors(payload: Any) -> list[torch.Tensor]:
    if isinstance(payload, torch.Tensor):
        return [payload]
    if isinstance(payload, (tuple, list)):
        return [t for p in payload for t in _tensors(p)]
    if isinstance(payload, dict):
        return [t for p in payload.values() for t in _tensors(p)]
    return []


def count_rows(payload: Any) -> int:
    """Rows (dim 0) of a tensor, or of a tuple/list/dict of tensors that agree on dim 0.

    Raises:
        TypeError: the payload holds no tensor, or a 0-d tensor.
        ValueError: its tensors disagree on dim 0.
    """
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
