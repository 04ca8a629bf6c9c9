"""``pipe.stream(inputs)``: many requests in flight, results yielded in order or as they finish.

A feeder task submits the inputs through a *window* that bounds how many are in flight; the
consumer takes results from the window. The ordered window keeps futures in submission order;
the unordered one hands them over as they complete. Both are small classes that tests drive
with plain futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio

from .channels import END, Channel

__all__ = ["OrderedWindow", "UnorderedWindow", "stream"]

Submit = Callable[[Any], Awaitable["asyncio.Future[Any]"]]


class OrderedWindow:
    """At most ``size`` futures outstanding; ``next()`` returns them in submission order."""

    def __init__(self, size: int) -> None:
        self._pending: Channel[asyncio.Future[Any]] = Channel(size, "stream")

    async def admit(self, submit: Submit, x: Any) -> None:
        await self._pending.wait_room()
        self._pending.send_nowait(await submit(x))

    def feeding_done(self) -> None:
        self._pending.close()

    async def next(self) -> Any:
        """The next future, or ``END`` once feeding is done and every future was taken."""
        return await self._pending.next()

    def abandon(self) -> list[asyncio.Future[Any]]:
        """The futures not taken yet (the consumer left early: cancel them)."""
        return self._pending.drain_nowait()


class UnorderedWindow:
    """At most ``size`` futures outstanding; ``next()`` returns them as they complete."""

    def __init__(self, size: int) -> None:
        self._done: Channel[asyncio.Future[Any]] = Channel(size, "stream")
        self._slots = asyncio.Semaphore(size)
        self._outstanding: set[asyncio.Future[Any]] = set()  # admitted, not yet done
        self._feeding = True

    async def admit(self, submit: Submit, x: Any) -> None:
        await self._slots.acquire()
        fut = await submit(x)
        self._outstanding.add(fut)
        fut.add_done_callback(self._on_done)

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

    async def next(self) -> Any:
        fut = await self._done.next()
        if fut is not END:
            self._slots.release()
        return fut

    def abandon(self) -> list[asyncio.Future[Any]]:
        return [*self._done.drain_nowait(), *self._outstanding]


async def stream(
    inputs: Iterable[Any] | AsyncIterable[Any],
    submit: Submit,
    open_window: Callable[[], OrderedWindow | UnorderedWindow],
    start_feeder: Callable[[Callable[[], Awaitable[None]], anyio.CancelScope], None],
    return_exceptions: bool,
) -> AsyncIterator[Any]:
    """Feed ``inputs`` through the window ``open_window()`` makes (from a task ``start_feeder``
    starts, under the given cancel scope) and yield the results. See ``Pipeline.stream``."""
    window = open_window()
    feed_error: list[BaseException] = []
    scope = anyio.CancelScope()

    async def feed() -> None:
        with scope:
            try:
                if isinstance(inputs, AsyncIterable):
                    async for x in inputs:
                        await window.admit(submit, x)
                else:
                    for x in inputs:
                        await window.admit(submit, x)
            except Exception as exc:
                feed_error.append(exc)
            finally:
                window.feeding_done()

    start_feeder(feed, scope)
    try:
        while (fut := await window.next()) is not END:
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
