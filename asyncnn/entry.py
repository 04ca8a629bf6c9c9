"""The request entry points of a pipeline: ``send``, ``submit``, ``submit_nowait``,
``send_stream`` and ``stream``; admission into the running graph.

``Requests`` is the half of :class:`~asyncnn.Pipeline` that takes work in; the other half
(``pipeline``) builds the graph and owns its lifecycle, and sets the attributes declared here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from .batching import Request
from .errors import PipelineClosed, PipelineFull
from .options import check_request_rows
from .streaming import OrderedWindow, UnorderedWindow, stream
from .streams import PartStream, StreamReader, one_part

if TYPE_CHECKING:
    from .lifecycle import Run
    from .runtime import Runtime

__all__ = ["Requests"]


class Requests:
    """How requests enter a pipeline (see ``Pipeline``)."""

    # Set by Pipeline.__init__ and its lifecycle.
    _run: Run | None
    _runtime: Runtime
    _loop: asyncio.AbstractEventLoop | None
    _ids: Iterator[int]
    _check_rows: bool
    _yields: bool  # a generator or step stage: requests carry a PartStream
    max_request_rows: int | None
    microbatch: int | None
    queue_size: int

    if TYPE_CHECKING:

        @property
        def state(self) -> str: ...

    def _running(self) -> bool:
        run = self._run
        return run is not None and run.state == "running"

    def _closed_error(self) -> PipelineClosed:
        if self.state == "new":
            return PipelineClosed("pipeline is not running: enter it first with `async with pipe:`")
        return PipelineClosed(f"pipeline is {self.state}: it accepts no new requests")

    def submit_nowait(self, x: Any) -> asyncio.Future[Any]:
        """Admit ``x`` now and return a future of its result.

        Raises:
            PipelineFull: the admission queue is full (shed the load, or use ``submit``).
            PipelineClosed: the pipeline is not running.
        """
        if not self._running():
            raise self._closed_error()
        if not self._runtime.admission.has_room():
            raise PipelineFull(
                f"pipeline is full ({self.queue_size} requests waiting for the first stage): "
                "retry later, use `await pipe.submit(x)` to wait, or raise queue_size"
            )
        return self._admit(x).future

    def _admit(self, x: Any, *, over: bool = False, stream: PartStream | None = None) -> Request:
        """Admit ``x`` as a request (callers checked that the pipeline runs, and that admission
        has room unless ``over``: the request may wait past a full first queue)."""
        if self._check_rows:
            check_request_rows(x, self.max_request_rows, self.microbatch)
        req = Request(next(self._ids), self._loop.create_future())  # type: ignore[union-attr]
        if self._yields:  # its parts come back through a stream, collected into a list
            req.stream = stream if stream is not None else PartStream()
        self._runtime.admit(req, x, over=over)
        return req

    def _submit_now(self, x: Any) -> asyncio.Future[Any] | None:
        """``submit``'s future when it would not wait (running, with room), else None. The
        stream feeder's path for every item: one call, no coroutine."""
        run = self._run
        if run is None or run.state != "running" or not self._runtime.admission.has_room():
            return None
        return self._admit(x).future

    async def submit(self, x: Any) -> asyncio.Future[Any]:
        """Admit ``x``, waiting while the pipeline is full, and return a future of its result.

        Raises:
            PipelineClosed: the pipeline is not running, or closed while we waited.
        """
        admission = self._runtime.admission
        while self._running() and not admission.has_room():
            await admission.wait_room()
        if not self._running():
            raise self._closed_error()
        return self._admit(x).future

    async def send(self, x: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Run one request through the pipeline and return its result.

        Args:
            x: the request's payload.
            timeout: seconds to wait for admission and the result together; at the deadline
                the request is dropped (before compute if it has not started) and the built-in
                ``TimeoutError`` is raised.

        Raises:
            StageError: a stage raised on this request (``.stage`` names it, the cause is chained).
            PipelineClosed: the pipeline is not running, or closed before the request finished.
            TimeoutError: ``timeout`` passed.

        Cancelling the caller drops the request at the next stage boundary. Without a
        ``timeout`` the request is admitted at once even when the first queue is full: it waits
        past the bound, in order and ahead of ``submit`` callers, and its caller waits once, for
        the result. What waits there is bounded by the callers, who hold their requests anyway.
        """
        if timeout is not None:
            return await self._send_within(x, timeout)
        if not self._running() or self._runtime.admission.closed:
            return await (await self.submit(x))  # raises PipelineClosed
        return await self._admit(x, over=True).future  # past a full first queue: see above

    async def _send_within(self, x: Any, timeout: float) -> Any:  # noqa: ASYNC109
        fut: asyncio.Future[Any] | None = None
        try:
            with anyio.fail_after(timeout):
                fut = await self.submit(x)
                return await fut
        except TimeoutError:
            raise TimeoutError(
                f"request timed out after {timeout:g} s: {self._runtime.where(fut)}"
            ) from None

    def send_stream(self, x: Any, *, buffer: int = 16) -> AsyncIterator[Any]:
        """Run one request and yield its parts as they are produced, in order: the outputs of
        the pipeline's generator stage, each through the stages after it (a pipeline without
        one yields its one result). ``async for part in pipe.send_stream(x)``.

        ``buffer``: parts produced and not yet read; when it is full the generator waits for
        this reader (only this request pauses). Leaving early (``break``, ``aclose()``,
        cancellation) ends the request: its generator is closed at its next yield and its parts
        in flight are dropped. Errors are raised in order, after the parts before them.

        Raises:
            PipelineClosed: the pipeline is not running.
            ValueError: ``buffer`` is not a whole number >= 1.
        """
        if not self._running() or self._runtime.admission.closed:
            raise self._closed_error()
        stream = PartStream(buffer)  # checks buffer before anything is admitted
        if not self._yields:
            return one_part(self._admit(x, over=True).future)
        req = self._admit(x, over=True, stream=stream)
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
        are in flight, so memory stays flat however long ``inputs`` is. Leaving the loop early
        cancels the items still in flight (use ``contextlib.aclosing`` to leave promptly).
        """

        def open_window() -> OrderedWindow | UnorderedWindow:
            # Checked when iteration starts, not when stream() is called.
            if not self._running():
                raise self._closed_error()
            size = self._runtime.capacity
            return OrderedWindow(size) if ordered else UnorderedWindow(size)

        return stream(
            inputs,
            self.submit,
            open_window,
            self._start_feeder,
            return_exceptions,
            self._submit_now,
        )

    def _start_feeder(self, feed: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
        assert self._run is not None
        self._run.spawn("stream-feed", feed)  # a task of the run: cancelled when it stops
