"""What moves on the queues: requests and the batch envelopes that carry them.

A :class:`Request` is one caller's unit of work, admitted once and ended exactly once through its
future (result, error, cancellation or ``PipelineClosed``). An :class:`Envelope` is the unit on a
queue: a payload plus the requests whose data it holds. Without batching an envelope carries one
request; merged batches carry several and are split back before the first unbatched stage.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Envelope", "Request"]


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

    __slots__ = ("payload", "requests")

    def __init__(self, payload: Any, requests: list[Request]) -> None:
        self.payload = payload
        self.requests = requests

    def __repr__(self) -> str:
        return f"<Envelope of {len(self.requests)} request(s)>"
