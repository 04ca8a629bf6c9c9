"""What happened inside a pipeline, for subscribers: small frozen records on an event bus.

Kinds: ``stage_started``, ``batch_formed`` (size, reason: full/preferred/deadline/idle/delay/
drain), ``batch_done`` (size, seconds), ``request_failed`` (error, requests), ``deadline_miss``
(reason: expired/hopeless: a request ended before compute), ``backpressure`` (seconds blocked),
``stall`` (where the oldest request is held), ``pipeline_closed`` (the request counts).

Emitting costs nothing but an attribute check while nobody listens: the runtime only calls the
bus when a subscription exists. Sync callbacks run inline on the event loop (keep them short);
``listen()`` gives an async iterator with a bounded buffer that drops the oldest events when
its reader falls behind (and counts them), so a slow listener never slows the pipeline.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

__all__ = [
    "KINDS",
    "Event",
    "EventBus",
    "Listener",
    "Subscription",
    "Watchdog",
    "describe_stall",
    "watch_stalls",
]

log = logging.getLogger("asyncnn")

MAX_PENDING_CALLBACKS = 1000

KINDS = frozenset(
    {
        "stage_started",
        "batch_formed",
        "batch_done",
        "request_failed",
        "deadline_miss",
        "backpressure",
        "stall",
        "pipeline_closed",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``kind``, ``stage`` (None for pipeline-wide events), ``time``
    (``time.monotonic()``), and kind-specific ``fields``, also readable as attributes
    (``ev.size``, ``ev.reason``, ``ev.seconds``)."""

    kind: str
    stage: str | None
    time: float
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(
                f"{self.kind} event has no field {name!r}; it has {sorted(self.fields)}"
            ) from None


def _kinds(kinds: Iterable[str] | str | None) -> frozenset[str] | None:
    if kinds is None:
        return None
    chosen = frozenset([kinds] if isinstance(kinds, str) else kinds)
    unknown = chosen - KINDS
    if unknown:
        raise ValueError(f"unknown event kind(s) {sorted(unknown)}; kinds are {sorted(KINDS)}")
    return chosen


class Subscription:
    """A registered callback; ``unsubscribe()`` (or leaving ``with``) removes it."""

    def __init__(
        self,
        bus: EventBus,
        kinds: frozenset[str] | None,
        deliver: Callable[[Event], None],
        on_close: Callable[[], None] | None = None,
    ):
        self._bus = bus
        self.kinds = kinds
        self.deliver = deliver
        self.on_close = on_close  # told when the pipeline closes, whatever the kinds
        self.active = True

    def unsubscribe(self) -> None:
        if self.active:
            self.active = False
            self._bus._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


class Listener:
    """An async iterator over events with a bounded buffer; ``dropped`` counts the events lost
    because the reader fell behind. It ends when the pipeline closes or on ``close()``."""

    def __init__(self, bus: EventBus, kinds: frozenset[str] | None, buffer: int) -> None:
        if buffer < 1:
            raise ValueError(f"listen(buffer={buffer}): must be >= 1")
        self._buf: deque[Event] = deque()
        self._max = buffer
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.dropped = 0
        self.subscription = bus._add(kinds, self._push, self._end)

    def _push(self, ev: Event) -> None:
        if len(self._buf) >= self._max:
            self._buf.popleft()
            self.dropped += 1
        self._buf.append(ev)
        if ev.kind == "pipeline_closed":
            self._closed = True
        self._wake()

    def _end(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        self._closed = True
        self.subscription.unsubscribe()
        self._wake()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._buf:
            if self._closed:
                self.subscription.unsubscribe()
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buf.popleft()


class EventBus:
    """Subscribers of one pipeline. ``on_change(active)`` tells the pipeline whether anyone is
    listening, so the runtime can skip building events altogether."""

    def __init__(self, on_change: Callable[[Callable[..., None] | None], None]) -> None:
        self._subs: list[Subscription] = []
        self._on_change = on_change
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0  # events not delivered to async callbacks that fell behind

    def subscribe(
        self, callback: Callable[[Event], Any], kinds: Iterable[str] | str | None = None
    ) -> Subscription:
        """Call ``callback(event)`` for each event (of ``kinds``, default all).

        A sync callback runs inline on the loop; an ``async def`` callback runs in a task per
        event. Exceptions from callbacks are logged, never raised into the pipeline.

        Returns:
            a :class:`Subscription`; ``unsubscribe()`` stops the calls.
        """
        chosen = _kinds(kinds)
        if inspect.iscoroutinefunction(callback):

            def deliver(ev: Event) -> None:
                if len(self._tasks) >= MAX_PENDING_CALLBACKS:
                    self.dropped += 1  # the callback falls behind: never queue without bound
                    return
                task = asyncio.ensure_future(self._guard_async(callback, ev))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        else:

            def deliver(ev: Event) -> None:
                try:
                    callback(ev)
                except Exception:
                    log.exception("event callback %r raised; event dropped", callback)

        return self._add(chosen, deliver)

    def listen(self, kinds: Iterable[str] | str | None = None, *, buffer: int = 1000) -> Listener:
        """An async iterator over events (of ``kinds``) with a buffer of ``buffer`` events."""
        return Listener(self, _kinds(kinds), buffer)

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def emit(self, kind: str, stage: str | None, **fields: Any) -> None:
        ev = Event(kind, stage, time.monotonic(), fields)
        for sub in tuple(self._subs):
            if sub.kinds is None or kind in sub.kinds:
                sub.deliver(ev)
            elif kind == "pipeline_closed" and sub.on_close is not None:
                sub.on_close()

    async def drain(self) -> None:
        """Wait for async callbacks still running (at pipeline close)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    async def _guard_async(callback: Callable[[Event], Any], ev: Event) -> None:
        try:
            await callback(ev)
        except Exception:
            log.exception("async event callback %r raised", callback)

    def _add(
        self,
        kinds: frozenset[str] | None,
        deliver: Callable[[Event], None],
        on_close: Callable[[], None] | None = None,
    ) -> Subscription:
        sub = Subscription(self, kinds, deliver, on_close)
        self._subs.append(sub)
        if len(self._subs) == 1:
            self._on_change(self.emit)
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if not self._subs:
            self._on_change(None)


class Watchdog:
    """Decides when a pipeline is stalled: requests in flight and no progress for ``timeout``
    seconds. Sync and clock-free (callers pass ``now``), so tests drive it with any clock."""

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"stall_timeout={timeout!r} must be > 0 seconds")
        self.timeout = timeout
        self._last_progress: int | None = None
        self._since = 0.0
        self._reported = False

    def check(self, now: float, progress: int, in_flight: int) -> bool:
        """True once per stall: when nothing moved for ``timeout`` while requests wait."""
        if progress != self._last_progress or in_flight == 0:
            self._last_progress, self._since, self._reported = progress, now, False
            return False
        if not self._reported and now - self._since >= self.timeout:
            self._reported = True
            return True
        return False


def describe_stall(where: dict[str, Any], in_flight: int, timeout: float) -> str:
    """The warning for a stall, from where the oldest request is held (``locate_oldest``)."""
    stage = where.get("stage")
    detail = (
        f"stage {stage!r} holds the oldest request ({where.get('where')}; input "
        f"{'empty' if where.get('input_empty') else 'not empty'}, output "
        f"{'full' if where.get('output_full') else 'not full'})"
        if stage
        else "the oldest request is between stages"
    )
    return (
        f"pipeline stalled: {in_flight} request(s) in flight and no progress for "
        f"{timeout:.1f}s; {detail}"
    )


class Watched(Protocol):
    """What the stall watchdog reads of a running graph (a ``Runtime``)."""

    def progress(self) -> int: ...

    def in_flight(self) -> int: ...

    def locate_oldest(self) -> dict[str, Any] | None: ...


async def watch_stalls(wd: Watchdog, graph: Watched, bus: EventBus) -> None:
    """The stall watchdog's loop: looks every quarter timeout; reports each stall once, as a
    logged warning and a ``stall`` event."""
    while True:
        await anyio.sleep(wd.timeout / 4)
        if wd.check(time.monotonic(), graph.progress(), graph.in_flight()):
            where = graph.locate_oldest() or {}
            in_flight = graph.in_flight()
            log.warning("%s", describe_stall(where, in_flight, wd.timeout))
            if bus.active:
                fields = {k: v for k, v in where.items() if k != "stage"}
                bus.emit(
                    "stall", where.get("stage"), seconds=wd.timeout, in_flight=in_flight, **fields
                )
