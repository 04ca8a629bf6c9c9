"""Where a stage's function runs: on the event loop, inline, or on its own threads.

A stage that is not a coroutine gets dedicated worker threads (never the shared default pool),
so a slow model cannot starve other stages, and torch releases the GIL while it computes. A call
is handed to a thread through a ``SimpleQueue``; the result comes back to the loop through
``call_soon_threadsafe``, which resolves an asyncio future. The loop never waits on a thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any

Invoke = Callable[[Any], Awaitable[Any]]

__all__ = [
    "SKIPPED",
    "Invoke",
    "ThreadWorker",
    "invoker",
    "is_module",
    "prepare_call",
    "returned_coroutine",
    "yield_cpu",
]

log = logging.getLogger("asyncnn")

_STOP = object()
SKIPPED = object()  # the result of a call skipped because its request had ended (``run``)


def is_module(fn: object) -> bool:
    """True when ``fn`` is a ``torch.nn.Module`` (without importing torch when nobody has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(fn, torch.nn.Module)


def prepare_call(
    fn: Callable[..., Any], runs_on: str, inference: bool = True
) -> Callable[..., Any]:
    """The callable the runtime invokes for a stage. Calls that run off the loop (threads,
    devices; modules run inline too) run under ``torch.inference_mode()`` when ``inference``."""
    if inference and (runs_on == "thread" or (runs_on == "inline" and is_module(fn))):
        import torch

        def call_in_inference_mode(*args: Any) -> Any:
            with torch.inference_mode():
                return fn(*args)

        return call_in_inference_mode
    return fn


def invoker(
    call: Callable[..., Any],
    runs_on: str,
    *,
    join: bool = False,
    worker: ThreadWorker | None = None,
    pool: Any = None,
) -> Invoke:
    """``invoke(payload)``: an awaitable of one call of a stage, wherever the stage runs.

    Chosen once per stage. A join's payload is the tuple of its parts, spread into the call.
    Loop stages are called directly (their coroutine is the awaitable); thread stages hand the
    call to their ``worker``; Ray stages to their ``pool``; inline stages run on the loop.
    """
    if runs_on == "loop":
        return (lambda parts: call(*parts)) if join else call
    if runs_on == "inline":
        if join:

            async def inline_join(parts: Any) -> Any:
                return call(*parts)

            return inline_join

        async def inline(payload: Any) -> Any:
            return call(payload)

        return inline
    if runs_on == "ray":
        remote = pool.call
        if join:
            return lambda parts: remote("run", parts)
        return lambda payload: remote("run", (payload,))
    assert worker is not None, "a thread stage needs its worker"
    run = worker.run
    if join:
        return lambda parts: run(call, parts)
    return lambda payload: run(call, (payload,))


def returned_coroutine(stage: str, coro: CoroutineType[Any, Any, Any]) -> TypeError:
    """The error for a sync stage function that returned a coroutine (closed, never awaited)."""
    coro.close()  # never awaited on purpose: close it so Python does not warn about it
    return TypeError(
        f"stage {stage!r} returned a coroutine: its function is sync but calls an "
        "async one; make the stage's function `async def` and await it there"
    )


def _futureproof(exc: BaseException) -> BaseException:
    """``exc`` as a future can hold it: asyncio refuses a ``StopIteration`` (the future would
    never end), so it becomes a ``RuntimeError`` with it chained, as Python does for one
    raised in a coroutine (PEP 479)."""
    if not isinstance(exc, StopIteration):
        return exc
    err = RuntimeError(
        "the function raised StopIteration (a next() past the end of an iterator?): catch it "
        "there, or give next() a default"
    )
    err.__cause__ = exc
    return err


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not fut.done():
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


# The niceness ``"idle"`` falls back to where the OS has no idle scheduling class (or refuses it).
IDLE_FALLBACK_NICE = 19


def yield_cpu(nice: int | str) -> bool:
    """Lower the calling thread's scheduling priority (Linux: per thread), so that where cores
    are oversubscribed the event loop's thread runs first and the compute threads take the rest.

    An int is added to the thread's niceness: a smaller share of a contended core, but on Linux
    6.6+ (the EEVDF scheduler) a woken loop may still wait out the running thread's time slice
    (~5 ms stalls measured on the 2-core VM). ``"idle"``: the ``SCHED_IDLE`` class, which any
    ordinary thread that wakes preempts at once (the niceness ``IDLE_FALLBACK_NICE`` where the
    class is missing or refused). False where the OS has no per-thread priority (a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    if nice == "idle":
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return True
        except (AttributeError, OSError):
            nice = IDLE_FALLBACK_NICE
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + int(nice))
    except OSError:
        return False
    return True


class ThreadWorker:
    """Dedicated daemon thread(s) that run the calls handed to them.

    ``run(fn, args)`` returns an asyncio future of ``fn(*args)`` without blocking the loop. With
    ``threads=1`` calls run in order; with more, the threads share one queue of calls. A call
    whose future was cancelled before a thread reached it is skipped. ``init()`` runs on each
    thread as it starts (torch's intra-op thread count is set per thread).
    """

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        threads: int = 1,
        nice: int | str = 0,
        init: Callable[[], Any] | None = None,
    ) -> None:
        self.name = name
        self._nice = nice  # each thread's lower priority, set when it starts (``yield_cpu``)
        self._init = init
        self._loop = loop
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._live = threads
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._main,
                name=f"asyncnn:{name}" + (f":{i}" if threads > 1 else ""),
                daemon=True,
            )
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], unless: Any = None
    ) -> asyncio.Future[Any]:
        """The future of ``fn(*args)`` on a thread. ``unless``: a future (a request's) that,
        once done when a thread reaches the call, makes it skip the call: the result is then
        :data:`SKIPPED`."""
        fut = self._loop.create_future()
        self._jobs.put((fut, fn, args, unless))
        return fut

    def stop(self) -> None:
        """Ask the threads to exit once the calls queued before this one are done."""
        for _ in self._threads:
            self._jobs.put(_STOP)

    async def wait_stopped(self, timeout: float | None) -> bool:
        """Wait (without blocking the loop) for the threads to exit; False if one is still busy."""
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), timeout)
        except asyncio.TimeoutError:
            log.warning(
                "a thread of %r is still running a call after %.1fs; leaving it "
                "(it is a daemon thread); make the function return or time out",
                self.name,
                timeout,
            )
            return False
        for t in self._threads:
            t.join()
        return True

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _main(self) -> None:
        loop = self._loop
        if self._nice:
            yield_cpu(self._nice)
        try:
            if self._init is not None:
                try:
                    self._init()
                except Exception:  # a thread set up less well still runs its calls
                    log.exception("thread of %r: its set-up failed", self.name)
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    return
                fut, fn, args, unless = job
                if fut.done():  # cancelled while queued; a racy read only costs one wasted call
                    continue
                if unless is not None and unless.done():  # its request ended while it waited
                    value, ok = SKIPPED, True
                else:
                    try:
                        value, ok = fn(*args), True
                    except BaseException as exc:  # handed to the loop, which re-raises it there
                        value, ok = _futureproof(exc), False
                try:
                    loop.call_soon_threadsafe(_settle, fut, ok, value)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
        finally:
            with self._lock:
                self._live -= 1
                last = self._live == 0
            if last:
                try:
                    loop.call_soon_threadsafe(_settle, self._stopped, True, None)
                except RuntimeError:
                    pass

    def __repr__(self) -> str:
        return f"<ThreadWorker {self.name!r} {'alive' if self.alive else 'stopped'}>"
