"""The parts of one streaming request: made by a generator stage, delivered in order to the caller.

A stage whose function is a generator yields 0..N outputs for one input; each output travels on
through the rest of the graph as its own *part*, a request of its own (its own future, dropped at
stage boundaries when it ends early, batched with other requests' parts), so every stage kind
handles parts unchanged. A :class:`PartStream` hangs on the parent request and puts its parts
back in order as their futures finish, whatever order later stages finish them in.

Flow control is by credits: the stream has ``limit`` of them (``None``: unbounded, for ``send()``
which collects every part anyway); the generator stage takes one before it asks the generator
for the next part, and the reader gives one back for every part it takes. A slow reader so
pauses only its own generator, never the stage or other requests.

The parent request ends when its generator has ended and every part is in (its result: the list
of parts, or ``None`` for a reader that took them as they came), or at the first error, or when
its caller leaves (cancelled: the generator is closed and the parts still in flight are dropped).
Sync, loop-free except for the futures it is handed: tests drive it with plain futures.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from .channels import END

__all__ = ["PartStream", "StreamReader", "one_part"]

_part_ids = itertools.count(-1, -1)  # parts get negative ids: never those of admitted requests


class PartStream:
    """The in-order parts of one request. ``limit``: parts produced and not yet read (``None``:
    no limit; every part is kept for the result list)."""

    __slots__ = (
        "_changed",
        "_credit_waiter",
        "_done",
        "_error_at",
        "_next",
        "_outstanding",
        "buffer",
        "collected",
        "credits",
        "error",
        "limit",
        "on_end",
        "parent",
        "produced",
        "total",
    )

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"a stream's buffer={limit!r} must be a whole number >= 1")
        self.limit = limit
        self.credits = limit  # None: unlimited
        self.produced = 0  # parts the generator made (the next part's index)
        self.total: int | None = None  # parts in all, once the generator has ended
        self.error: BaseException | None = None  # raised once the parts before it are read
        self._error_at: int | None = None
        self._next = 0  # the index of the next part to deliver, in order
        self._done: dict[int, Any] = {}  # finished out of order, by index
        self._outstanding: dict[int, asyncio.Future[Any]] = {}  # parts in flight
        self.buffer: deque[Any] = deque()  # delivered in order, not read yet
        self.collected: list[Any] | None = [] if limit is None else None
        self._changed: asyncio.Future[None] | None = None  # the reader waits on it
        self._credit_waiter: asyncio.Future[None] | None = None  # the generator stage waits
        # on_end(error): called once, when every part is in (error None) or the stream failed.
        self.on_end: Callable[[BaseException | None], None] | None = None
        self.parent: Any = None  # the request whose parts these are: they share its urgency

    # -- the generator stage's side --------------------------------------------------------------

    def has_credit(self) -> bool:
        return self.credits is None or self.credits > 0

    async def wait_credit(self) -> None:
        """Wait until the reader takes a part (or leaves: then ``closed``)."""
        while not self.has_credit() and not self.closed:
            self._credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._credit_waiter
            finally:
                self._credit_waiter = None

    def notify(self, waiter: asyncio.Future[None]) -> None:
        """Set ``waiter``'s result when a credit comes back or the reader leaves (a step stage
        waits on one future for all its paused requests)."""
        self._credit_waiter = waiter

    def add_part(self, future: asyncio.Future[Any]) -> int:
        """A new part, in flight with ``future``: its id (for its ``Request``). Takes a credit."""
        index = self.produced
        self.produced += 1
        if self.credits is not None:
            self.credits -= 1
        self._outstanding[index] = future
        future.add_done_callback(functools.partial(self._part_done, index))
        return next(_part_ids)

    def put(self, value: Any) -> None:
        """A new part, delivered at once (its stage is the pipeline's output: nothing runs
        after it, so it needs no request of its own). Takes a credit."""
        index = self.produced
        self.produced += 1
        if self.credits is not None:
            self.credits -= 1
        self._done[index] = value
        self._advance()

    def end(self, error: BaseException | None = None) -> None:
        """The generator ended after ``produced`` parts (with ``error``: it raised there)."""
        self.total = self.produced
        if error is not None:
            self._fail_at(self.produced, error)
        self._advance()

    def abandon(self) -> list[asyncio.Future[Any]]:
        """The reader left (or the request ended early): the parts still in flight, to cancel."""
        self._error_at = -1 if self._error_at is None else self._error_at
        pending = list(self._outstanding.values())
        self._outstanding.clear()
        self._wake()
        return pending

    @property
    def closed(self) -> bool:
        """Nothing more is wanted: the reader left, or an error ends the stream."""
        return self._error_at is not None

    @property
    def complete(self) -> bool:
        """Every part is in, in order, and none failed: the request's result is ready."""
        return self.total is not None and self._next == self.total and self._error_at is None

    @property
    def failed(self) -> BaseException | None:
        """The error that ends the request, once every part before it is in (else None)."""
        if self._error_at is not None and self._error_at >= 0 and self._next >= self._error_at:
            return self.error
        return None

    def result(self) -> list[Any] | None:
        return self.collected

    # -- parts finishing -------------------------------------------------------------------------

    def _part_done(self, index: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self._outstanding.pop(index, None)
            return
        if self._outstanding.pop(index, None) is None:
            fut.exception()  # abandoned: nobody reads it (and asyncio need not warn about it)
            return
        exc = fut.exception()
        if exc is not None:
            self._fail_at(index, exc)
        else:
            self._done[index] = fut.result()
        self._advance()

    def _fail_at(self, index: int, exc: BaseException) -> None:
        if self._error_at is None or index < self._error_at:
            self._error_at, self.error = index, exc

    def _advance(self) -> None:
        done, stop = self._done, self._error_at
        while self._next in done and (stop is None or self._next < stop):
            value = done.pop(self._next)
            if self.collected is not None:
                self.collected.append(value)
            else:
                self.buffer.append(value)
            self._next += 1
        end = self.on_end
        if end is not None and (self.complete or self.failed is not None):
            self.on_end = None
            end(self.failed)
        self._wake()

    def wake(self) -> None:
        """Wake whoever waits on the stream (its request ended some other way)."""
        self._wake()

    def _wake(self) -> None:
        for fut in (self._changed, self._credit_waiter):
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- the reader's side -----------------------------------------------------------------------

    def take(self) -> Any:
        """The next part, ``END`` after the last, or None-like ``_WAIT`` when none is due yet;
        raises the stream's error once the parts before it were taken."""
        if self.buffer:
            value = self.buffer.popleft()
            if self.credits is not None:
                self.credits += 1
                self._wake()
            return value
        failed = self.failed
        if failed is not None:
            raise failed
        if self.total is not None and self._next == self.total and self._error_at is None:
            return END
        return _WAIT

    async def changed(self) -> None:
        """Wait until a part arrives, the stream ends, or it fails."""
        self._changed = asyncio.get_running_loop().create_future()
        try:
            await self._changed
        finally:
            self._changed = None


_WAIT: Any = object()


class StreamReader:
    """``async for part in pipe.send_stream(x)``: one request's parts as they are produced.

    Leaving early (``break``, ``aclose()``, cancellation, the reader being dropped) ends the
    request: ``leave()`` cancels it, and its generator is closed at its next yield.
    """

    def __init__(self, stream: PartStream, future: asyncio.Future[Any], leave: Any) -> None:
        self._stream = stream
        self._future = future  # the parent request's outcome
        self._leave = leave  # leave(): cancel the request and what is in flight for it
        self._finished = False
        future.add_done_callback(lambda _: stream.wake())  # however it ends, the reader hears

    def __aiter__(self) -> StreamReader:
        return self

    async def __anext__(self) -> Any:
        stream, fut = self._stream, self._future
        while not self._finished:
            try:
                value = stream.take()
            except BaseException:
                self._finished = True
                if fut.done() and not fut.cancelled():
                    fut.exception()  # the same error ends the request: raised once, here
                raise
            if value is END:
                self._finished = True
                break
            if value is not _WAIT:
                return value
            if fut.done() and not stream.complete and stream.failed is None:
                # Ended without its parts: cancelled, or closed by a forced shutdown.
                self._finished = True
                if fut.cancelled():
                    raise asyncio.CancelledError
                exc = fut.exception()
                if exc is not None:
                    raise exc
                break
            try:
                await stream.changed()  # a part, the end, an error, or the request ending
            except BaseException:
                self.close()
                raise
        raise StopAsyncIteration

    def close(self) -> None:
        """Leave now (sync): the request is cancelled unless it already ended."""
        if not self._finished:
            self._finished = True
            self._leave()

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self.close()


async def one_part(future: asyncio.Future[Any]) -> AsyncIterator[Any]:
    """``send_stream`` through a pipeline without a generator stage: its one result. Leaving
    before it arrives cancels the request."""
    try:
        yield await future
    finally:
        future.cancel()  # a no-op once it is done
