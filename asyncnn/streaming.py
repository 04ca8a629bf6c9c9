"""``pipe.stream(inputs)``: many requests in flight, results yielded in order or as they finish.

A feeder task submits the inputs through a *window* that bounds how many are in flight; the
consumer takes results from the window. The ordered window keeps futures in submission order;
the unordered one hands them over as they complete. Both are small classes that tests drive
with plain futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import anyio

from .channels import EMPTY, END, Channel

__all__ = ["OrderedWindow", "UnorderedWindow", "stream"]

Submit = Callable[[Any], Awaitable["asyncio.Future[Any]"]]
# Admit now when there is room, without a coroutine: the future, or None (then ``Submit``).
SubmitNow = Callable[[Any], "asyncio.Future[Any] | None"]
# A burst: how many items may be admitted at once now (0: none, or not this way), and the call
# that admits that many (their futures, in order).
Bulk = tuple[Callable[[], int], Callable[[list[Any]], "list[asyncio.Future[Any]]"]]
_DONE: Any = object()


class OrderedWindow:
    """At most ``size`` futures outstanding; ``next()`` returns them in submission order."""

    def __init__(self, size: int) -> None:
        self._pending: Channel[asyncio.Future[Any]] = Channel(size, "stream")
        self._abandoned = False
        # ``poll()``: the next future now, ``EMPTY`` when none is due yet, or ``END`` (the
        # channel's own, bound here: the consumer calls it for every result).
        self.poll: Callable[[], Any] = self._pending.poll

    def admit_now(self, x: Any, now: SubmitNow) -> bool:
        """Submit ``x`` without waiting when the window and the pipeline have room (no
        coroutine); False when it would wait, or once abandoned (then ``admit`` decides)."""
        pending = self._pending
        if self._abandoned or not pending.has_room():
            return False
        fut = now(x)
        if fut is None:
            return False
        pending.send_nowait(fut)
        return True

    def room(self) -> int:
        """How many futures ``extend`` takes now (0 once abandoned)."""
        return 0 if self._abandoned else self._pending.room()

    def extend(self, futs: list[asyncio.Future[Any]]) -> None:
        """Add a burst of futures, in order (``room()`` said they fit)."""
        self._pending.extend_nowait(futs)

    async def admit(self, submit: Submit, x: Any, now: SubmitNow | None = None) -> bool:
        """Submit ``x`` once there is room; False (and nothing left running) once abandoned."""
        if self._abandoned:
            return False
        if not self._pending.has_room():
            await self._pending.wait_room()
        fut = now(x) if now is not None else None
        if fut is None:
            fut = await submit(x)
        if self._abandoned:  # the consumer left while we submitted: nobody will read it
            fut.cancel()
            return False
        self._pending.send_nowait(fut)
        return True

    def feeding_done(self) -> None:
        self._pending.close()

    async def next(self) -> Any:
        """The next future, or ``END`` once feeding is done and every future was taken."""
        return await self._pending.next()

    def abandon(self) -> list[asyncio.Future[Any]]:
        """The futures not taken yet (the consumer left early: cancel them)."""
        self._abandoned = True
        return self._pending.drain_nowait()


class UnorderedWindow:
    """At most ``size`` futures outstanding; ``next()`` returns them as they complete."""

    def __init__(self, size: int) -> None:
        self._done: Channel[asyncio.Future[Any]] = Channel(size, "stream")
        self._slots = asyncio.Semaphore(size)
        self._outstanding: set[asyncio.Future[Any]] = set()  # admitted, not yet done
        self._feeding = True
        self._abandoned = False

    def admit_now(self, x: Any, now: SubmitNow) -> bool:
        """No coroutine-free path here (slots are a semaphore): always ``admit``."""
        return False

    def room(self) -> int:
        """No bursts either: 0."""
        return 0

    def extend(self, futs: list[asyncio.Future[Any]]) -> None:
        raise AssertionError("an unordered window admits one at a time (room() is 0)")

    async def admit(self, submit: Submit, x: Any, now: SubmitNow | None = None) -> bool:
        if self._abandoned:
            return False
        await self._slots.acquire()
        fut = now(x) if now is not None else None
        if fut is None:
            fut = await submit(x)
        if self._abandoned:
            fut.cancel()
            return False
        self._outstanding.add(fut)
        fut.add_done_callback(self._on_done)
        return True

    def _on_done(self, fut: asyncio.Future[Any]) -> None:
        self._outstanding.discard(fut)
        if not self._done.closed:
            self._done.send_nowait(fut)  # never full: at most `size` are outstanding
            if not self._feeding and not self._outstanding:
                self._done.close()

    def feeding_done(self) -> None:
        self._feeding = False
        if not self._outstanding:
            self._done.close()  # else the last completion closes it

    def poll(self) -> Any:
        fut = self._done.poll()
        if fut is not EMPTY and fut is not END:
            self._slots.release()
        return fut

    async def next(self) -> Any:
        fut = await self._done.next()
        if fut is not END:
            self._slots.release()
        return fut

    def abandon(self) -> list[asyncio.Future[Any]]:
        self._abandoned = True
        return [*self._done.drain_nowait(), *self._outstanding]


async def stream(
    inputs: Iterable[Any] | AsyncIterable[Any],
    submit: Submit,
    open_window: Callable[[], OrderedWindow | UnorderedWindow],
    start_feeder: Callable[[Callable[[], Awaitable[None]], anyio.CancelScope], None],
    return_exceptions: bool,
    submit_now: SubmitNow | None = None,
    bulk: Bulk | None = None,
) -> AsyncIterator[Any]:
    """Feed ``inputs`` through the window ``open_window()`` makes (from a task ``start_feeder``
    starts, under the given cancel scope) and yield the results. See ``Pipeline.stream``.

    ``submit_now`` admits one item without a coroutine when it fits; ``bulk`` admits a sync
    iterable's items a burst at a time, as many as fit in both the window and the pipeline."""
    window = open_window()
    feed_error: list[BaseException] = []
    scope = anyio.CancelScope()

    async def feed() -> None:
        now = submit_now if submit_now is not None else lambda x: None
        admit_now = window.admit_now
        with scope:
            try:
                if isinstance(inputs, AsyncIterable):
                    async for x in inputs:
                        if not admit_now(x, now) and not await window.admit(submit, x, now):
                            break
                else:
                    await _feed_sync(iter(inputs), window, submit, now, bulk)
            except Exception as exc:
                feed_error.append(exc)
            finally:
                window.feeding_done()

    start_feeder(feed, scope)
    poll = window.poll
    try:
        while True:
            fut = poll()  # the fast path: no suspension while results are ready
            if fut is EMPTY:
                fut = await window.next()
            if fut is END:
                break
            if return_exceptions:
                try:
                    yield await fut
                except Exception as exc:
                    yield exc
            else:
                yield await fut
        if feed_error:
            raise feed_error[0]
    finally:
        scope.cancel()
        for fut in window.abandon():
            fut.cancel()


async def _feed_sync(
    it: Iterator[Any],
    window: OrderedWindow | UnorderedWindow,
    submit: Submit,
    now: SubmitNow,
    bulk: Bulk | None,
) -> None:
    """Admit a sync iterator's items: in bursts while both the window and the pipeline have
    room for several (the items taken before the iterator raised are admitted first), else one
    at a time, waiting for room."""
    room_now, submit_many = bulk if bulk is not None else (lambda: 0, None)
    while True:
        k = min(window.room(), room_now())
        if k > 1 and submit_many is not None:
            xs: list[Any] = []
            try:
                xs.extend(islice(it, k))
            finally:
                if xs:
                    window.extend(submit_many(xs))
            if len(xs) < k:
                return
            continue
        x = next(it, _DONE)
        if x is _DONE:
            return
        if not window.admit_now(x, now) and not await window.admit(submit, x, now):
            return
