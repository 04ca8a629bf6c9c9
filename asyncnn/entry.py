"""The request entry points of a pipeline: ``send``, ``submit``, ``submit_nowait``,
``send_stream`` and ``stream``; admission into the running graph.

``Requests`` is the half of :class:`~asyncnn.Pipeline` that takes work in; the other half
(``pipeline``) builds the graph and owns its lifecycle, and sets the attributes declared here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from .batching import Envelope, Request, Urgency, check_urgency, default_urgency
from .errors import Overloaded, PipelineClosed, PipelineFull
from .options import check_request_rows
from .runtime.deadlines import RESOLUTION, Deadlines
from .streaming import OrderedWindow, UnorderedWindow, stream
from .streams import PartStream, StreamReader, one_part

if TYPE_CHECKING:
    from .lifecycle import Run
    from .runtime import Runtime
    from .tracing import Tracing

__all__ = ["Requests"]


def _expire(runtime: Runtime, rid: int, timeout: float | None) -> None:
    """A request's deadline came: end it wherever it is (a no-op when it already ended)."""
    req = runtime.ledger.inflight.get(rid)
    if req is not None:
        where = runtime.where_request(req)
        runtime.ledger.expire(req, TimeoutError(f"request timed out after {timeout:g} s: {where}"))


class Requests:
    """How requests enter a pipeline (see ``Pipeline``)."""

    # Set by Pipeline.__init__ and its lifecycle.
    _run: Run | None
    _runtime: Runtime
    _loop: asyncio.AbstractEventLoop | None
    _ids: Iterator[int]
    _check_rows: bool
    _yields: bool  # a generator or step stage: requests carry a PartStream
    _plain: bool  # no row checks, tracing, parts or admission control (``_submit_now``)
    _tracing: Tracing | None
    aging: float
    max_request_rows: int | None
    microbatch: int | None
    queue_size: int

    if TYPE_CHECKING:

        @property
        def state(self) -> str: ...

    def _running(self) -> bool:
        run = self._run
        return run is not None and run.state == "running"

    def _check_loop(self, what: str) -> None:
        """A running pipeline's queues and ledger belong to its loop's thread: a call from
        another loop or thread would change them unguarded (and wait on a future of the
        wrong loop). Raise before anything is touched."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is not self._loop:
            where = "another event loop" if current is not None else "a thread with no loop"
            raise RuntimeError(
                f"pipe.{what}() was called from {where}, not the loop the pipeline runs on: "
                "call it there (from another thread: asyncio.run_coroutine_threadsafe("
                "pipe.send(x), loop) or anyio.from_thread.run(pipe.send, x))"
            )

    def _urgency(self, timeout: Any, priority: Any) -> Urgency:
        """``timeout``/``priority`` checked, the deadline on the loop's clock (running)."""
        assert self._loop is not None
        return check_urgency(self._loop.time(), timeout, priority)

    def _closed_error(self) -> PipelineClosed:
        if self.state == "new":
            return PipelineClosed("pipeline is not running: enter it first with `async with pipe:`")
        return PipelineClosed(f"pipeline is {self.state}: it accepts no new requests")

    def submit_nowait(
        self, x: Any, *, timeout: float | None = None, priority: int = 0
    ) -> asyncio.Future[Any]:
        """Admit ``x`` now and return a future of its result (``timeout``/``priority``: as
        for ``send``; at the deadline the future ends with ``TimeoutError``).

        Raises:
            PipelineFull: the admission queue is full (shed the load, or use ``submit``).
            Overloaded: admission control refused it (see ``Pipeline(max_in_flight=...)``).
            PipelineClosed: the pipeline is not running.
        """
        if not self._running():
            raise self._closed_error()
        self._check_loop("submit_nowait")
        if not self._runtime.admission.has_room():
            raise PipelineFull(
                f"pipeline is full ({self.queue_size} requests waiting for the first stage): "
                "retry later, use `await pipe.submit(x)` to wait, or raise queue_size"
            )
        return self._admit(x, urgency=self._urgency(timeout, priority)).future

    def _admit(
        self,
        x: Any,
        *,
        over: bool = False,
        stream: PartStream | None = None,
        urgency: Urgency | None = None,
    ) -> Request:
        """Admit ``x`` as a request (callers checked that the pipeline runs, and that admission
        has room unless ``over``: the request may wait past a full first queue). ``urgency``:
        its (timeout, deadline, priority, now), from ``batching.check_urgency``."""
        if self._check_rows:
            check_request_rows(x, self.max_request_rows, self.microbatch)
        runtime = self._runtime
        loop = self._loop
        assert loop is not None
        if urgency is None:
            if runtime.control is not None:
                urgency = check_urgency(loop.time(), None, 0)  # admission control needs the time
            elif runtime.ranked:  # aging in ranked queues counts from admission
                req = Request(next(self._ids), loop.create_future(), since=loop.time())
                return self._enter(req, x, over, stream)
            else:
                return self._enter(Request(next(self._ids), loop.create_future()), x, over, stream)
        timeout, deadline, priority, now = urgency
        if runtime.control is not None:
            refusal = runtime.control.check(now, priority, deadline)
            if refusal is not None:
                why, retry_after = refusal
                raise Overloaded(
                    f"pipeline is overloaded: {why}; retry after {retry_after:.3f} s (raise "
                    "max_in_flight, allow a longer timeout, or add capacity)",
                    retry_after,
                )
        req = Request(next(self._ids), loop.create_future(), None, deadline, priority, now)
        if req.urgent and not runtime.ranked:
            runtime.rank(self.aging)
        self._enter(req, x, over, stream)
        if deadline is not None:
            deadlines = runtime.deadlines
            if deadlines is None:  # one timer for every deadline of this run
                deadlines = runtime.deadlines = Deadlines(
                    loop.call_at,
                    loop.time,
                    functools.partial(_expire, runtime),
                    getattr(loop, "_clock_resolution", RESOLUTION),  # asyncio's; uvloop: 1 ms
                )
            deadlines.add(deadline, req.id, timeout)
        return req

    def _enter(self, req: Request, x: Any, over: bool, stream: PartStream | None) -> Request:
        if self._tracing is not None:
            self._tracing.begin(req)
        if self._yields:  # its parts come back through a stream, collected into a list
            req.stream = stream if stream is not None else PartStream()
        self._runtime.admit(req, x, over=over)
        return req

    def _submit_now(self, x: Any) -> asyncio.Future[Any] | None:
        """``submit``'s future when it would not wait (running, with room, and under
        ``max_in_flight``), else None. The stream feeder's path for every item: one call, no
        coroutine."""
        run, runtime = self._run, self._runtime
        admission = runtime.admission
        if run is None or run.state != "running" or not admission.has_room():
            return None
        if not self._plain or runtime.ranked:
            control = runtime.control
            if control is not None and len(runtime.ledger) >= control.limit:
                return None  # the feeder waits (``_submit_in_turn``), as for a full queue
            return self._admit(x).future
        return self._admit_plain(x, False)

    async def _submit_in_turn(self, x: Any) -> asyncio.Future[Any]:
        """``submit`` for a stream's items: a stream has no deadline, so admission control
        can refuse an item only for ``max_in_flight``, and the item waits its turn (as for
        a full queue) instead of ending the stream with ``Overloaded``."""
        while True:
            try:
                return await self.submit(x)
            except Overloaded as exc:
                await asyncio.sleep(exc.retry_after)

    def _admit_plain(self, x: Any, over: bool) -> asyncio.Future[Any]:
        """A plain request (no row check, urgency, admission control, trace or parts, and no
        ranked queue: the caller checked ``_plain`` and ``ranked``): what ``_admit``,
        ``_enter`` do for it before ``Runtime.admit`` (the hot path of ``send`` and ``stream``)."""
        fut = self._loop.create_future()  # type: ignore[union-attr]  # set while running
        self._runtime.admit(Request(next(self._ids), fut), x, over=over)
        return fut

    def _room_now(self) -> int:
        """How many plain requests ``_submit_many`` may admit now without waiting (0: none, or
        they are not plain: take the one-at-a-time path)."""
        if not self._plain or not self._running() or self._runtime.ranked:
            return 0
        return self._runtime.admission.room()

    def _submit_many(self, xs: list[Any]) -> list[asyncio.Future[Any]]:
        """Admit every item of ``xs`` as a plain request at once, in order, and return their
        futures (``_room_now()`` said they fit): the stream feeder's burst, one wake-up of the
        first stage and one count for all of them."""
        create, ids, runtime = self._loop.create_future, self._ids, self._runtime  # type: ignore[union-attr]
        reqs = [Request(next(ids), create()) for _ in xs]
        runtime.ledger.admit_many(reqs)
        runtime.admission.extend_nowait(
            [Envelope(x, [req]) for x, req in zip(xs, reqs, strict=True)]
        )
        return [req.future for req in reqs]

    async def submit(
        self,
        x: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        priority: int = 0,
    ) -> asyncio.Future[Any]:
        """Admit ``x``, waiting while the pipeline is full, and return a future of its result.
        ``timeout``/``priority``: as for ``send`` (the wait for room counts toward the timeout).

        Raises:
            PipelineClosed: the pipeline is not running, or closed while we waited.
            Overloaded: admission control refused it (see ``Pipeline(max_in_flight=...)``).
            TimeoutError: ``timeout`` passed while waiting for room.
        """
        urgency = None
        if self._running():
            self._check_loop("submit")
            urgency = self._urgency(timeout, priority)
        admission = self._runtime.admission
        if urgency is not None and urgency[1] is not None:
            try:
                with anyio.fail_after(max(0.0, urgency[1] - urgency[3])):
                    while self._running() and not admission.has_room():
                        await admission.wait_room()
            except TimeoutError:
                raise TimeoutError(
                    f"request timed out after {timeout:g} s: {self._runtime.where(None)}"
                ) from None
        while self._running() and not admission.has_room():
            await admission.wait_room()
        if not self._running():
            raise self._closed_error()
        if urgency is not None and urgency[1] is not None:
            urgency = (*urgency[:3], self._loop.time())  # type: ignore[union-attr]
        return self._admit(x, urgency=urgency).future

    async def send(
        self,
        x: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        priority: int = 0,
    ) -> Any:
        """Run one request through the pipeline and return its result.

        Args:
            x: the request's payload.
            timeout: seconds from now to its deadline (``None`` or ``math.inf``: none). The
                deadline travels with the request through every stage: a stage that finds it
                passed, or nearer than a call of that stage takes, ends the request before
                computing it; and at the deadline the request is ended wherever it is. Either
                way ``TimeoutError`` is raised.
            priority: lower is more urgent (default 0; a whole number from -2**31 to
                2**31 - 1, negative ones allowed). Every queue serves the most urgent class
                first, earliest deadline first within a class; a waiting request rises one
                level every ``Pipeline(aging=...)`` seconds, so no class starves. A batch
                takes the most urgent compatible requests first.

        Raises:
            StageError: a stage raised on this request (``.stage`` names it, the cause is chained).
            PipelineClosed: the pipeline is not running, or closed before the request finished.
            TimeoutError: ``timeout`` passed.
            Overloaded: admission control refused it at once (``Pipeline(max_in_flight=...)``:
                too many in flight, or it could not finish by its deadline); ``.retry_after``.

        Cancelling the caller drops the request at the next stage boundary. The request is
        admitted at once even when the first queue is full: it waits past the bound, in order
        and ahead of ``submit`` callers, and its caller waits once, for the result. What waits
        there is bounded by the callers, who hold their requests anyway.
        """
        if not self._running() or self._runtime.admission.closed:
            return await (await self.submit(x))  # raises PipelineClosed
        self._check_loop("send")
        urgency = None
        if not default_urgency(timeout, priority):
            urgency = self._urgency(timeout, priority)
        elif self._plain and not self._runtime.ranked:
            return await self._admit_plain(x, True)
        return await self._admit(x, over=True, urgency=urgency).future

    def send_stream(
        self, x: Any, *, buffer: int = 16, timeout: float | None = None, priority: int = 0
    ) -> AsyncIterator[Any]:
        """Run one request and yield its parts as they are produced, in order: the outputs of
        the pipeline's generator stage, each through the stages after it (a pipeline without
        one yields its one result). ``async for part in pipe.send_stream(x)``.

        ``buffer``: parts produced and not yet read; when it is full the generator waits for
        this reader (only this request pauses). Leaving early (``break``, ``aclose()``,
        cancellation) ends the request: its generator is closed at its next yield and its parts
        in flight are dropped. Errors are raised in order, after the parts before them.
        ``timeout``/``priority``: as for ``send``, for the whole stream (at the deadline the
        iteration raises ``TimeoutError`` after the parts already delivered).

        Raises:
            PipelineClosed: the pipeline is not running.
            Overloaded: admission control refused it.
            ValueError: ``buffer`` is not a whole number >= 1.
        """
        if not self._running() or self._runtime.admission.closed:
            raise self._closed_error()
        self._check_loop("send_stream")
        stream = PartStream(buffer)  # checks buffer before anything is admitted
        urgency = None if default_urgency(timeout, priority) else self._urgency(timeout, priority)
        if not self._yields:
            return one_part(self._admit(x, over=True, urgency=urgency).future)
        req = self._admit(x, over=True, stream=stream, urgency=urgency)
        ledger = self._runtime.ledger

        def leave() -> None:  # counted once, wherever the request was
            req.future.cancel()
            ledger.abandon(req)

        return StreamReader(stream, req.future, leave)

    def stream(
        self,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        """Run every item of ``inputs`` (a sync or async iterable) and yield the results.

        Results come in input order, or in completion order with ``ordered=False``. A failed item
        raises its ``StageError`` from the iteration (ending it) unless ``return_exceptions=True``,
        which yields the exception in its place. At most about the pipeline's capacity of items
        are in flight (and no more than ``max_in_flight``: an item waits for room, as other
        callers' requests take it, rather than being refused), so memory stays flat however
        long ``inputs`` is. Leaving the loop early
        cancels the items still in flight (use ``contextlib.aclosing`` to leave promptly).
        """

        def open_window() -> OrderedWindow | UnorderedWindow:
            # Checked when iteration starts, not when stream() is called.
            if not self._running():
                raise self._closed_error()
            self._check_loop("stream")
            size, control = self._runtime.capacity, self._runtime.control
            if control is not None:  # the stream alone never meets max_in_flight
                size = min(size, control.limit)
            return OrderedWindow(size) if ordered else UnorderedWindow(size)

        return stream(
            inputs,
            self._submit_in_turn,
            open_window,
            self._start_feeder,
            return_exceptions,
            self._submit_now,
            (self._room_now, self._submit_many),
        )

    def _start_feeder(self, feed: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
        assert self._run is not None
        self._run.spawn("stream-feed", feed)  # a task of the run: cancelled when it stops
