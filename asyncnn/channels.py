"""Bounded, closable queues with an explicit end of stream.

A :class:`Channel` is what joins two stages. It holds at most ``capacity`` items; a full channel
makes the producer wait (backpressure) and an empty one makes the consumer wait. ``close()`` ends
the stream: the consumer drains what is buffered, then gets :class:`anyio.EndOfStream`; producers
fail fast with :class:`anyio.ClosedResourceError`.

A channel can also end itself: producers register with ``add_senders(n)`` and each calls
``sender_done()`` when it stops; the last one closes the channel (as anyio's and trio's memory
channels close when their last send end does), so no stage counts its own workers by hand.

Every awaiting call has a non-blocking twin (``send_nowait``/``receive_nowait``) that raises
:class:`anyio.WouldBlock` instead of waiting. ``poll()``/``next()`` are the same pair for a
consumer's loop without exceptions: an item, :data:`EMPTY` (poll only) or :data:`END`. The hot
path tries the twin first: an append to a deque costs ~0.1 µs, a suspension costs a trip through
the event loop. The waiting side is plain
asyncio futures, so the channel works on asyncio and uvloop alike; it knows nothing about tensors.

The plain stage worker (``runtime/workers/plain.py``), the runtime's hottest loop, inlines the
common case of ``poll`` and ``send_nowait`` and so reads ``_buf`` (re-read each time: ``rank``
replaces it), ``_overflow``, ``_putters``, ``_getters``, ``_peak`` (kept at or under the bound),
``_watchers`` and ``_closed`` directly:
change their meaning and change it there too (``tests/test_channels.py`` and the worker tests
cover both paths).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from anyio import ClosedResourceError, EndOfStream, WouldBlock

from .urgency import Key, RankedBuffer

__all__ = ["EMPTY", "END", "Channel", "ChannelStatistics"]

T = TypeVar("T")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


EMPTY: Any = _Marker("EMPTY")  # poll(): nothing buffered now
END: Any = _Marker("END")  # poll()/next(): the stream has ended and the buffer is drained


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """A snapshot of one channel: its fill, its bound and who is waiting on it."""

    name: str
    capacity: int
    depth: int
    peak_depth: int
    waiting_senders: int
    waiting_receivers: int
    closed: bool


class Channel(Generic[T]):
    """A bounded FIFO between producers and consumers on one event loop.

    Args:
        capacity: the most items buffered (>= 1).
        name: shown in ``repr`` and statistics.

    Example::

        ch = Channel[int](2)
        ch.send_nowait(1)
        await ch.send(2)
        ch.close()
        assert [ch.receive_nowait(), await ch.receive()] == [1, 2]
    """

    __slots__ = (
        "_buf",
        "_capacity",
        "_closed",
        "_getters",
        "_nudged",
        "_overflow",
        "_peak",
        "_putters",
        "_senders",
        "_watchers",
        "name",
    )

    def __init__(self, capacity: int, name: str = "channel") -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"channel {name!r}: capacity={capacity!r} must be a whole number >= 1")
        self.name = name
        self._capacity = capacity
        self._buf: deque[T] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._overflow: deque[T] = deque()  # send_over's items past capacity, in order
        self._closed = False
        self._nudged = False
        self._peak = 0
        self._senders = 0
        # (priority, future): woken when an item of a more urgent class arrives (``watch``).
        self._watchers: list[tuple[int, asyncio.Future[None]]] = []

    # -- sending ---------------------------------------------------------------------------------

    def send_nowait(self, item: T) -> None:
        """Append ``item`` now; ``WouldBlock`` when full, ``ClosedResourceError`` when closed.
        Once ranked, a full channel still takes an item of a more urgent class than one it
        holds (``RankedBuffer.outranks``): the bound never holds it behind work it outranks."""
        buf = self._buf
        n = len(buf)
        if n >= self._capacity or self._closed:
            if self._closed:
                raise ClosedResourceError
            if type(buf) is not RankedBuffer or not buf.outranks(item):
                raise WouldBlock
        buf.append(item)
        if n >= self._peak:  # never past capacity: the plain worker reads it as "room left"
            self._peak = min(n + 1, self._capacity)
        if self._getters:
            self._wake(self._getters)
        if self._watchers:
            self._arrived(item)

    def send_over(self, item: T) -> None:
        """Append ``item`` even when the channel is full: past ``capacity`` it waits in an
        overflow and enters the buffer, in order, as receivers make room (before any sender
        that waits for room). For a sender that waits on something else anyway (a request's
        caller, on its result) and so need not be woken twice: what waits is bounded by the
        senders, each holding its one item. Once ranked (``rank``), past ``capacity`` it joins
        the one heap of everything waiting instead. ``ClosedResourceError`` when closed."""
        if self._closed:
            raise ClosedResourceError
        if self._overflow or len(self._buf) >= self._capacity:
            if type(self._buf) is RankedBuffer:
                self._buf.append(item)  # ranked: one heap, past the bound too (see rank)
                if self._watchers:
                    self._arrived(item)
            else:
                self._overflow.append(item)
            return
        self.send_nowait(item)

    async def send(self, item: T) -> None:
        """Append ``item``, waiting while the channel is full (backpressure)."""
        while True:
            try:
                self.send_nowait(item)
                return
            except WouldBlock:
                await self._wait(self._putters)

    def room(self) -> int:
        """How many items ``send_nowait`` would take now, one after another (0 when closed)."""
        if self._closed or self._overflow:
            return 0
        return max(0, self._capacity - len(self._buf))

    def extend_nowait(self, items: list[T]) -> None:
        """Append every item of ``items`` now, in order, waking as many receivers as there are
        items at once instead of one per send (a producer's burst). ``WouldBlock`` (nothing
        appended) when they do not all fit: check ``room()``; ``ClosedResourceError`` when
        closed."""
        if self._closed:
            raise ClosedResourceError
        if len(items) > self.room():
            raise WouldBlock
        buf = self._buf
        buf.extend(items)
        if len(buf) > self._peak:
            self._peak = len(buf)
        getters, k = self._getters, len(items)
        while getters and k:
            self._wake(getters)
            k -= 1
        if self._watchers:
            for item in items:
                self._arrived(item)

    def has_room(self) -> bool:
        """True when ``send_nowait`` would succeed now for any item."""
        return not self._closed and len(self._buf) < self._capacity

    def takes(self, item: T) -> bool:
        """True when ``send_nowait(item)`` would succeed now (room, or, once ranked, ``item``
        outranks an item waiting)."""
        if self._closed:
            return False
        buf = self._buf
        return len(buf) < self._capacity or (type(buf) is RankedBuffer and buf.outranks(item))

    async def wait_room(self) -> None:
        """Wait until the channel has room (or is closed). Waiters are served first come, first
        served: one woken but overtaken by a sender that did not wait keeps its place in line."""
        first = True
        while not self._closed and len(self._buf) >= self._capacity:
            await self._wait(self._putters, front=not first)
            first = False

    # -- receiving -------------------------------------------------------------------------------

    def poll(self) -> T:
        """The oldest item now, :data:`EMPTY` when there is none yet, :data:`END` once ended."""
        buf = self._buf
        if buf:
            item = buf.popleft()
            if self._overflow:  # the room goes to the overflow first, in order
                buf.append(self._overflow.popleft())
            elif self._putters and len(buf) < self._capacity:
                self._wake(self._putters)
            return item
        return END if self._closed else EMPTY

    async def next(self) -> T:
        """The oldest item, waiting while there is none; :data:`END` once the stream ended."""
        while True:
            item = self.poll()
            if item is not EMPTY:
                return item
            await self._wait(self._getters)

    async def ready(self) -> None:
        """Wait until an item is buffered or the stream has ended, taking nothing (for the one
        consumer that also waits on something else)."""
        while not self._buf and not self._closed:
            await self._wait(self._getters)

    def receive_nowait(self) -> T:
        """Take the oldest item now; raise ``WouldBlock`` when empty, ``EndOfStream`` when ended."""
        item = self.poll()
        if item is EMPTY:
            raise WouldBlock
        if item is END:
            raise EndOfStream
        return item

    async def receive(self) -> T:
        """Take the oldest item, waiting while the channel is empty; ``EndOfStream`` once ended."""
        item = await self.next()
        if item is END:
            raise EndOfStream
        return item

    def drain_nowait(self) -> list[T]:
        """Take every buffered item at once (used to fail what is left at a forced shutdown)."""
        items = [*self._buf, *self._overflow]
        self._buf.clear()
        self._overflow.clear()
        self._wake(self._putters, every=True)
        return items

    # -- lifecycle -------------------------------------------------------------------------------

    def rank(self, key: Key, aging: float, clock: Callable[[], float]) -> None:
        """From now on hand items out most urgent first (``urgency.RankedBuffer``: priority
        class, then deadline, with aging) among everything that waits: the buffer and the
        overflow become one heap, which ``send_over`` fills past the bound (the overflow deque
        stays empty; the bound still holds for ``send``/``send_nowait``, and waiting senders
        are let in once the heap is under it). Items already waiting are re-filed.
        Irreversible; a no-op when the channel already ranks."""
        if isinstance(self._buf, RankedBuffer):
            return
        buf: RankedBuffer[T] = RankedBuffer(key, aging, clock)
        buf.extend(self._buf)
        buf.extend(self._overflow)
        self._overflow.clear()
        self._buf = buf  # type: ignore[assignment]

    @property
    def inversions(self) -> int:
        """Items handed out ahead of a more urgent class by aging (0 for a plain FIFO)."""
        buf = self._buf
        return buf.inversions if isinstance(buf, RankedBuffer) else 0

    def holds_above(self, priority: int) -> bool:
        """An item of a more urgent class than ``priority`` waits (never in a FIFO)."""
        buf = self._buf
        return type(buf) is RankedBuffer and buf.holds_above(priority)

    @property
    def ranked(self) -> bool:
        return type(self._buf) is RankedBuffer

    def wake_on_room(self, fut: asyncio.Future[None]) -> None:
        """Set ``fut`` when room is made, as for a sender waiting in ``send`` (for a sender that
        waits on something else too; hand the wake-up on with ``pass_room`` if it is not used)."""
        self._putters.append(fut)

    def pass_room(self) -> None:
        """A wake-up for room that its sender will not use goes to the next sender waiting."""
        if self._putters and len(self._buf) < self._capacity:
            self._wake(self._putters)

    def watch(self, fut: asyncio.Future[None], priority: int) -> None:
        """Set ``fut`` once an item of a more urgent class than ``priority`` arrives (a ranked
        channel's consumer that waits on something else meanwhile; ``unwatch`` after)."""
        self._watchers.append((priority, fut))

    def unwatch(self, fut: asyncio.Future[None]) -> None:
        self._watchers = [w for w in self._watchers if w[1] is not fut]

    def receivers_waiting(self) -> bool:
        """A receiver waits for an item now."""
        return any(not f.done() for f in self._getters)

    def nudge(self) -> None:
        """Wake the receiver in ``wake_up`` without an item; remembered until its next
        ``wake_up`` when none waits now, so a nudge is never lost."""
        self._nudged = True
        self._wake(self._getters)

    async def wake_up(self, always: bool = False) -> None:
        """Wait once: for an item, the end of the stream, or a ``nudge``; ``always``: for a
        nudge (or a sender's wake-up) even while items are buffered or the stream has ended,
        which the caller is not taking yet. For a consumer that decides on more than the
        items: it looks at everything again after any of them."""
        if self._nudged:
            self._nudged = False
            return
        if always or not (self._buf or self._closed):  # ``always``: only a nudge ends it
            await self._wait(self._getters)
        self._nudged = False

    def close(self) -> None:
        """End the stream: receivers drain the buffer then see ``EndOfStream``; senders fail."""
        if not self._closed:
            self._closed = True
            self._wake(self._getters, every=True)
            self._wake(self._putters, every=True)

    def holds(self, match: Callable[[T], bool]) -> bool:
        """True when a buffered item matches (a scan: for diagnostics, not the hot path)."""
        return any(match(item) for item in (*self._buf, *self._overflow))

    def add_senders(self, n: int) -> None:
        """Register ``n`` more producers; the channel closes when all have called
        ``sender_done()``. Register every producer before any of them can finish."""
        self._senders += n

    def sender_done(self) -> None:
        """One registered producer has stopped; the last one closes the channel."""
        self._senders -= 1
        if self._senders <= 0:
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._buf) + len(self._overflow)

    def waiting_upto(self, priority: int) -> int:
        """How many items wait that go out before any of a class less urgent than ``priority``
        (once ranked: those of that class or a more urgent one; in a FIFO: every one)."""
        buf = self._buf
        if type(buf) is RankedBuffer:
            return buf.waiting_upto(priority)
        return len(self)

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(
            name=self.name,
            capacity=self._capacity,
            depth=len(self),
            peak_depth=self._peak,
            waiting_senders=sum(not f.done() for f in self._putters),
            waiting_receivers=sum(not f.done() for f in self._getters),
            closed=self._closed,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Channel {self.name!r} {len(self)}/{self._capacity} {state}>"

    # -- internals -------------------------------------------------------------------------------

    def _arrived(self, item: T) -> None:
        """Wake the watchers that ``item`` outranks (a ranked channel; see ``watch``)."""
        buf = self._buf
        if type(buf) is not RankedBuffer:
            return
        cls = buf.priority(item)
        for priority, fut in self._watchers:
            if cls < priority and not fut.done():
                fut.set_result(None)

    async def _wait(self, waiters: deque[asyncio.Future[None]], front: bool = False) -> None:
        fut = asyncio.get_running_loop().create_future()
        if front:
            waiters.appendleft(fut)
        else:
            waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            # A wake-up that raced with our cancellation must not be lost: hand it on.
            if fut.done() and not fut.cancelled():
                self._wake(waiters)
            raise

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]], every: bool = False) -> None:
        """Wake the first live waiter (``every``: all of them)."""
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if not every:
                    return
