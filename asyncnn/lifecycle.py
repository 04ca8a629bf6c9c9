"""One run of a pipeline, hosted in a task of its own, so any task may start or stop it.

A :class:`Run` owns a :class:`~asyncnn.runtime.Runtime` whose task group lives in a *host* task
that ``start()`` creates. The task that calls ``start()`` and the one that calls ``stop()`` may
differ (a pytest-asyncio fixture's setup and teardown, an app's startup and shutdown hooks), and
neither owns a cancel scope of the run. When a runtime task fails (a bug of ours), the host ends
the run at once: every pending request fails with ``PipelineClosed`` (the failure chained), the
threads stop, and the failure is kept until ``stop()`` raises it, so it is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import anyio

from .events import EventBus, Watchdog, watch_stalls
from .runtime import Runtime
from .runtime.supervisor import Supervisor

__all__ = ["Run", "uncancel"]

log = logging.getLogger("asyncnn")

RunState = Literal["starting", "running", "closing", "closed"]
_THREAD_JOIN_TIMEOUT = 5.0


class Run:
    """A runtime started once and stopped once (the pipeline makes a new Run to restart).

    Args:
        runtime: the graph to run (fresh channels, counters and threads).
        events: the pipeline's event bus (``stage_started``, ``pipeline_closed``).
        watchdog: the stall watchdog, if any.
        on_failure: called once, on the loop, when a runtime task fails while running.
    """

    def __init__(
        self,
        runtime: Runtime,
        events: EventBus,
        watchdog: Watchdog | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.state: RunState = "starting"
        self.error: BaseException | None = None  # the runtime's failure, until stop() raises it
        self._events = events
        self._watchdog = watchdog
        self._on_failure = on_failure
        self._sup: Supervisor | None = None
        self._host: asyncio.Task[None] | None = None
        self._release = asyncio.Event()  # set once the runtime is stopped: the host may leave
        self._closed = asyncio.Event()
        self._reported = False

    # -- start -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the runtime's tasks in a host task; return once they run. On failure (or if the
        caller is cancelled meanwhile) nothing is left running."""
        rt = self.runtime
        try:
            await rt.prepare()
        except BaseException:
            rt.release_remote()
            raise
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._host = asyncio.create_task(self._serve(started), name="asyncnn:run")
        try:
            await asyncio.shield(started)
        except BaseException:
            # The start failed, or our caller gave up while it ran: take the run down again.
            with anyio.CancelScope(shield=True):
                await self._shutdown()
                self._release.set()
                await asyncio.wait([self._host])
            if started.done() and not started.cancelled() and started.exception() is not None:
                raise started.exception() from None  # type: ignore[misc]
            raise
        self.state = "running"
        if self._events.active:
            for stage in rt.plan.stages:
                self._events.emit("stage_started", stage.name)

    async def _serve(self, started: asyncio.Future[None]) -> None:
        """The host task: the runtime's task group lives here until the run is released."""
        rt = self.runtime
        try:
            async with anyio.create_task_group() as tg:
                self._sup = sup = rt.start(tg)
                if self._watchdog is not None:
                    sup.spawn("watchdog", watch_stalls, self._watchdog, rt, self._events)
                started.set_result(None)
                await self._release.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)  # start() raises it and cleans up
                return
            await self._fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise  # the loop is shutting down: the host leaves as cancelled

    async def _fail(self, exc: BaseException) -> None:
        """A runtime task failed (or the host was cancelled): end the run now."""
        if not isinstance(exc, asyncio.CancelledError):
            self.error = exc
            log.error("pipeline runtime failed; every pending request ends", exc_info=exc)
        with anyio.CancelScope(shield=True):
            await self._shutdown()
        if self.error is not None and self._on_failure is not None:
            self._on_failure()

    # -- stop --------------------------------------------------------------------------------------

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` as a task of the run (cancelled when it stops)."""
        assert self._sup is not None
        self._sup.spawn(name, fn, *args)

    async def stop(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Drain for up to ``timeout`` seconds (None: no bound), then end the rest with
        ``PipelineClosed`` and stop every task and thread. Raises the runtime's failure, once."""
        if self.state == "running":
            self.state = "closing"
            rt = self.runtime
            rt.close_admission()
            try:
                with anyio.move_on_after(math.inf if timeout is None else timeout):
                    await rt.drained()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._shutdown()
                    self._release.set()
                    if self._host is not None:
                        await asyncio.wait([self._host])
        else:
            with anyio.CancelScope(shield=True):
                await self._closed.wait()
        if self.error is not None and not self._reported:
            self._reported = True
            raise self.error

    async def _shutdown(self) -> None:
        """Cancel the tasks, end what is left, stop the threads: once, whoever asks first."""
        if self.state == "closed" or self._closed.is_set():
            await self._closed.wait()
            return
        self.state = "closed"
        rt = self.runtime
        await rt.stop(_THREAD_JOIN_TIMEOUT)
        if self._events.active:
            k = rt.ledger.counters
            self._events.emit(
                "pipeline_closed",
                None,
                admitted=k.admitted,
                completed=k.completed,
                failed=k.failed,
                cancelled=k.cancelled,
            )
        await self._events.drain()
        self._closed.set()


def uncancel() -> None:
    """Take back a cancellation we made of the current task (Python 3.11+ counts them)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()
