"""Spawns, cancels and stops what a running pipeline owns: its tasks and its threads."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from ..executors import ThreadWorker

__all__ = ["ACCELERATOR_NICE", "Supervisor"]

ACCELERATOR_NICE = 10  # a launching thread's niceness under compute_nice="idle"


class Supervisor:
    """The tasks and threads of one run.

    Each task gets its own cancel scope, so that a forced stop cancels the runtime without
    cancelling the task that owns the pipeline. The first exception a task dies of (a runtime
    bug) is kept in ``crash``: every request failed at shutdown chains it. torch's intra-op
    thread count, which is process-wide, is restored when the threads stop.
    """

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        torch_threads: int | None = None,
        compute_nice: int | str = 0,
    ) -> None:
        self._tg = tg
        self._loop = asyncio.get_running_loop()
        self._scopes: set[anyio.CancelScope] = set()  # of the tasks still running
        self.threads: list[ThreadWorker] = []
        self.crash: BaseException | None = None
        self.torch_threads = torch_threads
        self.compute_nice = compute_nice  # compute threads yield the CPU to the loop's thread
        self._saved_threads: int | None = None
        if torch_threads is not None:
            import torch

            self._saved_threads = torch.get_num_threads()

    def spawn(self, name: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        scope = anyio.CancelScope()
        self._scopes.add(scope)

        async def run() -> None:
            with scope:
                try:
                    await fn(*args)
                except BaseException as exc:
                    if not isinstance(exc, asyncio.CancelledError) and self.crash is None:
                        self.crash = exc  # the cause that every failed request will chain
                    raise
                finally:
                    self._scopes.discard(scope)

        self._tg.start_soon(run, name=f"asyncnn:{name}")

    def thread(
        self, name: str, compute: bool = True, threads: int = 1, accelerator: bool = False
    ) -> ThreadWorker:
        """A dedicated thread (``threads`` of them sharing one queue of calls), stopped with the
        run; ``compute`` threads get torch's count and yield the CPU to the loop. A thread that
        launches an ``accelerator``'s work is never put in the idle class (it would wait behind
        every busy thread of the machine while the device starves): it gets a niceness."""
        nice = self.compute_nice if compute else 0
        if nice == "idle" and accelerator:
            nice = ACCELERATOR_NICE
        init = None
        if compute and self.torch_threads is not None:
            import torch

            init = functools.partial(torch.set_num_threads, self.torch_threads)  # per thread
        worker = ThreadWorker(name, self._loop, threads, nice, init)
        self.threads.append(worker)
        return worker

    def cancel_all(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def stop_threads(self, timeout: float | None) -> None:  # noqa: ASYNC109
        for w in self.threads:
            w.stop()
        for w in self.threads:
            await w.wait_stopped(timeout)
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)  # torch's setting is process-wide
            self._saved_threads = None
