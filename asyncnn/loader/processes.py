"""Worker processes for a sync map-style dataset whose decoding computes (and so holds the GIL),
or whose fetching waits on I/O but computes enough between waits to keep one process's GIL busy.

Each worker process fetches whole batches (``__getitems__`` or a loop, as on a fetch thread;
with ``threads`` > 1, in one part per thread of its own, at once, as the parent's fetch threads
spread a batch that waits) and collates them; the batch goes back through its pipe, small
tensors inline and large ones through shared memory (``transport``). As in a ``DataLoader``,
batch ``k`` goes to worker ``k % workers`` (with per-worker seeds, augmentations are
reproducible), ``get_worker_info()`` works inside the dataset, and ``default_collate`` writes a
batch too large for the pipe straight into shared memory (``transport.worker_collate``).

The parent never blocks its event loop: a job (a batch's indices) is put on its worker's queue
(a feeder thread writes it), and one receiver thread waits on every worker's result pipe and
process at once, unpickles results and hands them to the loop with ``call_soon_threadsafe``. A
worker pickles its batch itself, so a batch that does not pickle is reported, not lost; a worker
that dies (killed, segfault) is reported with its pid and how it ended. ``close()`` asks every
worker to stop, then terminates and kills what is left, so no process outlives its epoch;
workers also exit on their own when their parent is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import queue
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import Any

import torch
import torch.multiprocessing as mp

from ..errors import describe
from .flow import fetch_many, parts_of, to_collate
from .reorder import Failed
from .transport import receive, send, worker_collate

__all__ = ["CollateError", "Fetched", "ProcessPool", "WorkerDied"]

_WATCH = 0.5  # seconds between a worker's checks that its parent lives, and the receiver's
_JOIN = 5.0  # seconds a closing worker is given to finish its batch before it is terminated

Fetched = tuple[int, int, list[Failed], int, Any]  # worker, batch k, failures, samples, batch


class CollateError:
    """In place of a batch: collating it raised ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class WorkerDied(RuntimeError):
    """A loader worker process ended while the epoch still needed it."""


def _portable(exc: BaseException) -> Exception:
    """``exc`` as it can cross to the parent: its own type when it pickles, else a
    ``RuntimeError`` with its text; either way noting the traceback in the worker."""
    note = f"in AsyncLoader worker process {os.getpid()}:\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )
    out: Exception = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
    _note(out, note)
    try:
        pickle.loads(pickle.dumps(out))  # unpickles: from our own worker, on our pipe
        return out
    except Exception:
        plain = RuntimeError(describe(exc))
        _note(plain, note)
        return plain


def _note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` where Python has it (3.11+)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def fetch_batch(
    source: Any,
    collate: Callable[[list[Any]], Any],
    idxs: list[int],
    skip: bool,
    fetch: Callable[[Any, list[int]], list[Any]] = fetch_many,
) -> tuple[list[Failed], Any]:
    """A worker's job: the failed samples (their errors made portable) and the collated batch
    of the good ones (None when none is left, or a sample failed and errors raise)."""
    samples = fetch(source, idxs)
    failures = [Failed(s.index, _portable(s.error)) for s in samples if isinstance(s, Failed)]
    good = to_collate(samples, skip)
    if good is None:
        return failures, None
    try:
        return failures, collate(good)
    except Exception as exc:
        return failures, CollateError(_portable(exc))


class _Spread:
    """A worker's fetch for batches that wait on I/O: ``fetch_many`` in one part per thread,
    at once, the samples in order. The worker's first sample is fetched alone, as the parent's
    first samples are: a dataset that opens its handle (a client, a connection) on first use in
    a process would otherwise open one per thread at once (``httpx.Client``: ~30 ms of CPU
    each, a second a worker for 32 threads)."""

    def __init__(self, worker: int, threads: int) -> None:
        self.threads, self.warm = threads, False
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"asyncnn:loader-w{worker}")

    def __call__(self, source: Any, idxs: list[int]) -> list[Any]:
        head: list[Any] = []
        if not self.warm:
            self.warm = True
            head, idxs = fetch_many(source, idxs[:1]), idxs[1:]
        parts = parts_of(idxs, self.threads)
        got = self.pool.map(lambda p: fetch_many(source, p), parts)
        return head + [s for samples in got for s in samples]


def _seed(seed: int, worker: int, workers: int, source: Any) -> None:
    """Seed the worker's generators and make ``torch.utils.data.get_worker_info()`` answer, as
    in a DataLoader worker."""
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    with contextlib.suppress(Exception):  # a private hook of torch's; only an optimisation
        from torch.utils.data._utils import worker as torch_worker

        torch_worker._worker_info = torch_worker.WorkerInfo(
            id=worker, num_workers=workers, seed=seed, dataset=source
        )


def _serve(
    worker: int,
    workers: int,
    source: Any,
    collate: Callable[[list[Any]], Any],
    skip: bool,
    seed: int,
    init: Callable[[int], None] | None,
    jobs: Any,
    results: Connection,
    stop: Any,
    parent: int,
    threads: int = 1,
) -> None:
    """A worker process: batches until told to stop (``stop`` set: the jobs still queued are
    left), or until its parent is gone; each spread over ``threads`` when more than one."""
    # What the parent held is never collected here: no parent object's finalizer runs in a
    # worker, and its pages stay shared (copy-on-write) rather than touched by the collector.
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    _seed(seed, worker, workers, source)
    collate = worker_collate(collate)
    if init is not None:
        try:
            init(worker)
        except Exception as exc:
            send(results, (worker, -1, [], 0, _portable(exc)))
            return
    spread = _Spread(worker, threads) if threads > 1 else None
    try:
        _jobs(worker, source, collate, skip, jobs, results, stop, parent, spread or fetch_many)
    finally:
        if spread is not None:
            spread.pool.shutdown(wait=False, cancel_futures=True)


def _jobs(
    worker: int,
    source: Any,
    collate: Callable[[list[Any]], Any],
    skip: bool,
    jobs: Any,
    results: Connection,
    stop: Any,
    parent: int,
    fetch: Callable[[Any, list[int]], list[Any]],
) -> None:
    """A worker's loop: each job's batch fetched, collated and sent, until told to stop."""
    while True:
        try:
            job = jobs.get(timeout=_WATCH)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if job is None or stop.is_set():
            return
        k, idxs = job
        failures, batch = fetch_batch(source, collate, idxs, skip, fetch)
        if not send(results, (worker, k, failures, len(idxs), batch)):
            unsent = RuntimeError(
                f"batch {k} cannot be sent from a worker process: {type(batch).__name__} does "
                "not pickle; return tensors, numbers, strings or containers of them from "
                "collate, or use worker_kind='thread'"
            )
            send(results, (worker, k, failures, len(idxs), CollateError(unsent)))


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class ProcessPool:
    """``workers`` processes fetching and collating batches of ``source`` (each batch spread
    over ``threads`` threads of its worker when more than one).

    ``deliver`` (called on the loop) receives each ``Fetched`` result; ``(worker, -1, [], 0,
    error)`` says the epoch cannot go on: a ``WorkerDied``, or what ``init`` raised. ``start``
    and ``close`` block (forking, joining): call them off the loop.
    """

    def __init__(
        self,
        source: Any,
        collate: Callable[[list[Any]], Any],
        workers: int,
        *,
        skip: bool,
        seed: int,
        context: str | None,
        init: Callable[[int], None] | None,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[Fetched], None],
        threads: int = 1,
    ) -> None:
        self._ctx: Any = mp.get_context(context)
        self._threads = threads
        self._args = (workers, source, collate, skip, seed, init)
        self._loop = loop
        self._deliver = deliver
        self._jobs: list[Any] = []  # queues: a feeder thread writes, so sending never blocks
        self._results: list[Connection] = []
        self._procs: list[Any] = []
        self._closing = False
        self._stop = self._ctx.Event()
        self._receiver = threading.Thread(
            target=self._receive, name="asyncnn:loader-receive", daemon=True
        )

    def start(self) -> None:
        workers, source, collate, skip, seed, init = self._args
        for i in range(workers):
            jobs = self._ctx.Queue()
            results_r, results_w = self._ctx.Pipe(duplex=False)
            p = self._ctx.Process(
                target=_serve,
                args=(i, workers, source, collate, skip, seed + i, init, jobs, results_w),
                kwargs={"stop": self._stop, "parent": os.getpid(), "threads": self._threads},
                name=f"asyncnn:loader-worker:{i}",
                daemon=True,
            )
            p.start()
            results_w.close()  # the child's end: the parent keeps only its own
            self._procs.append(p)
            self._jobs.append(jobs)
            self._results.append(results_r)
        self._receiver.start()

    def submit(self, k: int, idxs: list[int]) -> None:
        """Queue batch ``k`` for its worker (without blocking: a feeder thread writes it)."""
        self._jobs[k % len(self._jobs)].put((k, idxs))

    def _receive(self) -> None:
        """The receiver thread: results to the loop (unpickled here, off the loop); a worker
        that ends unasked is reported once, after what it sent. It reads until every worker
        has ended, closing too (what is read then is dropped): a worker writing a batch
        larger than the pipe's buffer must not block on it while it is asked to stop."""
        conns = {c: i for i, c in enumerate(self._results)}
        sentinels = {p.sentinel: i for i, p in enumerate(self._procs)}
        while sentinels:
            for r in mp_wait([*conns, *sentinels]):
                if r in conns:
                    self._take(conns, r)
                elif r in sentinels:
                    i = sentinels.pop(r)
                    conn = self._results[i]
                    while conn in conns and conn.poll(0):  # what it sent before it ended
                        self._take(conns, conn)
                    conns.pop(conn, None)
                    if not self._closing:  # (closing, close() reaps the workers, alone)
                        self._procs[i].join(_WATCH)  # its pipe closed first: let it be reaped
                        self._lost(i, _describe(self._procs[i].exitcode))

    def _take(self, conns: dict[Connection, int], conn: Connection) -> None:
        try:
            self._post(receive(conn))
        except Exception as exc:
            i = conns.pop(conn)
            if self._closing:  # stopped mid-send: nobody waits for its batch
                return
            proc = self._procs[i]
            proc.join(_WATCH)  # a worker that died mid-send: its sentinel will say how
            if proc.exitcode is None:  # alive, yet its batch was lost in transit
                self._lost(i, f"could not send a batch ({exc!r})")

    def _lost(self, i: int, how: str) -> None:
        if not self._closing:
            p = self._procs[i]
            err = WorkerDied(
                f"AsyncLoader: worker process {i} (pid {p.pid}) {how} while the epoch needed it"
            )
            self._post((i, -1, [], 0, err))

    def _post(self, item: Fetched) -> None:
        if self._closing:  # the epoch is over: nobody waits for it
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._deliver, item)

    def close(self) -> None:
        """Stop every worker (asked, then terminated, then killed) and the receiver."""
        self._closing = True
        self._stop.set()  # the jobs queued behind a worker's current batch are left
        for q in self._jobs:
            q.put(None)  # wakes a worker waiting for a job
        # The receiver reads (and drops) what the workers still send, and ends once every one
        # of them has; the workers are reaped here, only after it (a process joined from two
        # threads at once can look alive to one of them, and be terminated, after it ended).
        end = time.monotonic() + _JOIN  # for the current batches of all of them together
        if self._receiver.is_alive():
            self._receiver.join(_JOIN)
        for p in self._procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in self._procs:
            if p.exitcode is None:
                p.terminate()
                p.join(_JOIN)
            if p.exitcode is None:
                p.kill()
                p.join()
        if self._receiver.is_alive():
            self._receiver.join()
        for q in self._jobs:
            q.cancel_join_thread()  # a stopped worker reads no more: do not wait to flush
            q.close()
        for c in self._results:
            c.close()
        for p in self._procs:
            p.close()
