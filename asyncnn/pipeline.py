"""The face of asyncnn: build a pipeline, run it with ``async with``, send it work."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio import EndOfStream, WouldBlock

from .batching import Envelope, Request
from .channels import Channel
from .errors import AsyncnnError, PipelineClosed, PipelineFull
from .graph import Graph, Plan
from .metrics import PipelineStats, snapshot
from .scheduler import Scheduler
from .stage import Stage

__all__ = ["Pipeline"]

_State = Literal["new", "running", "closing", "closed"]
_THREAD_JOIN_TIMEOUT = 5.0


def _as_stage(item: Any) -> Stage:
    if isinstance(item, Stage):
        return item
    if callable(item):
        return Stage(item)
    raise TypeError(f"Pipeline: expected Stage objects or callables, got {type(item).__name__}")


class Pipeline:
    """A graph of stages run as asyncio tasks joined by bounded queues.

    Args:
        stages: a list of stages (a chain; bare callables are wrapped in ``Stage``) or a ``Graph``.
        queue_size: capacity of every queue between stages (backpressure beyond it), >= 1.
        drain_timeout: the most seconds leaving ``async with`` waits for in-flight requests
            before ending the rest with ``PipelineClosed``; ``None`` waits as long as it takes.

    Raises:
        GraphError: the graph is invalid (the message names the stage and the fix).
        TypeError, ValueError: a bad argument.

    Example::

        pipe = Pipeline([Stage(decode), Stage(model, workers=2), Stage(encode)], queue_size=8)
        async with pipe:
            y = await pipe.send(x)
            async for y in pipe.stream(xs):
                ...
    """

    def __init__(
        self,
        stages: Sequence[Stage | Callable[..., Any]] | Graph,
        *,
        queue_size: int = 64,
        drain_timeout: float | None = 30.0,
    ) -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"Pipeline: queue_size={queue_size!r} must be a whole number >= 1")
        if drain_timeout is not None and not drain_timeout >= 0:
            raise ValueError(f"Pipeline: drain_timeout={drain_timeout!r} must be >= 0 or None")
        if isinstance(stages, Graph):
            graph = stages
        elif isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
            raise TypeError(
                f"Pipeline: expected a list of stages or a Graph, got {type(stages).__name__}"
            )
        else:
            graph = Graph.chain([_as_stage(s) for s in stages])
        self._plan: Plan = graph.validate()
        self.queue_size = queue_size
        self.drain_timeout = drain_timeout
        self._sched = Scheduler(self._plan, queue_size)
        self._state: _State = "new"
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopped: asyncio.Event | None = None
        self._feeders: set[anyio.CancelScope] = set()

    # -- introspection ---------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages in topological order, with their unique names."""
        return self._plan.stages

    @property
    def state(self) -> _State:
        return self._state

    def stats(self) -> PipelineStats:
        """Per-stage figures by name, and request outcomes as attributes (see ``PipelineStats``)."""
        return snapshot(self._sched)

    def __repr__(self) -> str:
        names = " -> ".join(s.name for s in self.stages)
        return f"<Pipeline {self._state} [{names}] queue_size={self.queue_size}>"

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Pipeline:
        if self._state != "new":
            raise AsyncnnError(
                f"this pipeline is {self._state}: a Pipeline runs once; build a new one to rerun"
            )
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            self._sched.start(tg, self._loop)
        except BaseException as exc:
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._tg = tg
        self._state = "running"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._tg is None:
            return None
        own: BaseException | None = None
        try:
            # A failed or cancelled body does not wait on a drain: everything ends now.
            await self._stop(self.drain_timeout if exc is None else 0)
        except BaseException as err:  # the drain was cancelled: a runtime task crashed, or
            own = err  # our caller gave up; either way the task group decides below
        pending = exc if exc is not None else own
        # The caller's own exception propagates as it is, not wrapped in an ExceptionGroup;
        # cancellations go to the task group, which does the cancel-scope bookkeeping.
        forward = pending if isinstance(pending, asyncio.CancelledError) else None
        tg, self._tg = self._tg, None
        suppress = await tg.__aexit__(
            type(forward) if forward else None, forward, forward.__traceback__ if forward else None
        )
        if own is not None and not suppress:
            raise own
        return bool(suppress) and forward is not None and forward is exc

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds (``None``:
        no bound), then end the rest with ``PipelineClosed`` and stop every task and thread.

        Any task may call it; leaving ``async with`` afterwards only tidies up. Requests still
        in flight at the deadline end with ``PipelineClosed`` at once, even while a stage's
        thread is still busy with them.
        """
        await self._stop(timeout)

    async def _stop(self, timeout: float | None) -> None:  # noqa: ASYNC109
        if self._state == "new":
            self._state = "closed"
            return
        assert self._stopped is not None
        if self._state != "running":
            await self._stopped.wait()
            return
        self._state = "closing"
        sched = self._sched
        sched.close_admission()
        try:
            finished = sched.finished
            assert finished is not None
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await finished.wait()
        finally:
            sched.cancel_tasks()
            for scope in self._feeders:
                scope.cancel()
            sched.fail_all(sched.crash)
            with anyio.CancelScope(shield=True):
                await sched.stop_threads(_THREAD_JOIN_TIMEOUT)
            self._state = "closed"
            self._stopped.set()

    # -- requests --------------------------------------------------------------------------------

    def _closed_error(self) -> PipelineClosed:
        if self._state == "new":
            return PipelineClosed("pipeline is not running: enter it first with `async with pipe:`")
        return PipelineClosed(f"pipeline is {self._state}: it accepts no new requests")

    def submit_nowait(self, x: Any) -> asyncio.Future[Any]:
        """Admit ``x`` now and return a future of its result.

        Raises:
            PipelineFull: the admission queue is full (shed the load, or use ``submit``).
            PipelineClosed: the pipeline is not running.
        """
        if self._state != "running":
            raise self._closed_error()
        if not self._sched.admission.has_room():
            raise PipelineFull(
                f"pipeline is full ({self.queue_size} requests waiting for the first stage): "
                "retry later, use `await pipe.submit(x)` to wait, or raise queue_size"
            )
        return self._admit(x)

    def _admit(self, x: Any) -> asyncio.Future[Any]:
        # Callers checked that the pipeline runs and admission has room.
        req = Request(next(self._ids), self._loop.create_future())  # type: ignore[union-attr]
        self._sched.admit(req)
        self._sched.admission.send_nowait(Envelope(x, [req]))
        return req.future

    async def submit(self, x: Any) -> asyncio.Future[Any]:
        """Admit ``x``, waiting while the pipeline is full, and return a future of its result.

        Raises:
            PipelineClosed: the pipeline is not running, or closed while we waited.
        """
        admission = self._sched.admission
        while self._state == "running" and not admission.has_room():
            await admission.wait_room()
        if self._state != "running":
            raise self._closed_error()
        return self._admit(x)

    async def send(self, x: Any) -> Any:
        """Run one request through the pipeline and return its result.

        Raises:
            StageError: a stage raised on this request (``.stage`` names it, the cause is chained).
            PipelineClosed: the pipeline is not running, or closed before the request finished.

        Cancelling the caller drops the request at the next stage boundary.
        """
        if self._state == "running" and self._sched.admission.has_room():
            fut = self._admit(x)  # the fast path: no suspension before the result
        else:
            fut = await self.submit(x)
        return await fut

    async def stream(
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
        if self._state != "running":
            raise self._closed_error()
        assert self._tg is not None
        window = self._sched.capacity
        pending: Channel[asyncio.Future[Any]] = Channel(window, "stream")
        slots = asyncio.Semaphore(window)
        feed_error: list[BaseException] = []
        scope = anyio.CancelScope()
        outstanding: set[asyncio.Future[Any]] = set()  # unordered: admitted, not yet done
        feeding = True

        def on_done(fut: asyncio.Future[Any]) -> None:
            outstanding.discard(fut)
            if not pending.closed:
                pending.send_nowait(fut)  # never full: at most `window` are outstanding
                if not feeding and not outstanding:
                    pending.close()

        async def feed() -> None:
            nonlocal feeding
            with scope:
                try:
                    if isinstance(inputs, AsyncIterable):
                        async for x in inputs:
                            await self._feed_one(x, ordered, pending, slots, outstanding, on_done)
                    else:
                        for x in inputs:
                            await self._feed_one(x, ordered, pending, slots, outstanding, on_done)
                except Exception as exc:
                    feed_error.append(exc)
                finally:
                    feeding = False
                    self._feeders.discard(scope)
                    if ordered or not outstanding:
                        pending.close()  # unordered: else the last on_done closes it

        self._feeders.add(scope)
        self._tg.start_soon(feed, name="asyncnn:stream-feed")
        try:
            while True:
                try:
                    fut = pending.receive_nowait()
                except WouldBlock:
                    try:
                        fut = await pending.receive()
                    except EndOfStream:
                        break
                except EndOfStream:
                    break
                if not ordered:
                    slots.release()
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
            for fut in [*pending.drain_nowait(), *outstanding]:
                fut.cancel()

    async def _feed_one(
        self,
        x: Any,
        ordered: bool,
        pending: Channel[asyncio.Future[Any]],
        slots: asyncio.Semaphore,
        outstanding: set[asyncio.Future[Any]],
        on_done: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        if ordered:
            await pending.wait_room()
            fut = await self.submit(x)
            pending.send_nowait(fut)
        else:
            await slots.acquire()
            fut = await self.submit(x)
            outstanding.add(fut)
            fut.add_done_callback(on_done)
