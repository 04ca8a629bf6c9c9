"""Where a stage's function runs: on the event loop, inline, or on its own threads.

A stage that is not a coroutine gets dedicated worker threads (never the shared default pool),
so a slow model cannot starve other stages, and torch releases the GIL while it computes. A call
is handed to a thread through a ``SimpleQueue``; the result comes back to the loop through
``call_soon_threadsafe``, which resolves an asyncio future. The loop never waits on a thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from .stage import Stage, is_module

__all__ = ["ThreadWorker", "prepare_call"]

log = logging.getLogger("asyncnn")

_STOP = object()


def prepare_call(stage: Stage) -> Callable[..., Any]:
    """The callable the scheduler invokes for ``stage``: modules run under inference mode."""
    fn = stage.fn
    if is_module(fn) and stage.runs_on == "thread":
        import torch

        module = fn

        def call_module(*args: Any) -> Any:
            with torch.inference_mode():
                return module(*args)

        return call_module
    return fn


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not fut.done():
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class ThreadWorker:
    """One dedicated daemon thread that runs the calls handed to it, in order.

    ``run(fn, args)`` returns an asyncio future of ``fn(*args)`` without blocking the loop. A call
    whose future was cancelled before the thread reached it is skipped.
    """

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self._loop = loop
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._main, name=f"asyncnn:{name}", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> asyncio.Future[Any]:
        fut = self._loop.create_future()
        self._jobs.put((fut, fn, args))
        return fut

    def stop(self) -> None:
        """Ask the thread to exit once the calls queued before this one are done."""
        self._jobs.put(_STOP)

    async def wait_stopped(self, timeout: float | None) -> bool:
        """Wait (without blocking the loop) for the thread to exit; False if it is still busy."""
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), timeout)
        except asyncio.TimeoutError:
            log.warning(
                "asyncnn: thread of stage %r is still running a call after %.1fs; leaving it "
                "(it is a daemon thread); make the stage's function return or time out",
                self.name,
                timeout,
            )
            return False
        self._thread.join()
        return True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        loop = self._loop
        try:
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    return
                fut, fn, args = job
                if fut.done():  # cancelled while queued; a racy read only costs one wasted call
                    continue
                try:
                    value, ok = fn(*args), True
                except BaseException as exc:  # handed to the loop, which re-raises it there
                    value, ok = exc, False
                try:
                    loop.call_soon_threadsafe(_settle, fut, ok, value)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
        finally:
            try:
                loop.call_soon_threadsafe(_settle, self._stopped, True, None)
            except RuntimeError:
                pass

    def __repr__(self) -> str:
        return f"<ThreadWorker {self.name!r} {'alive' if self.alive else 'stopped'}>"
