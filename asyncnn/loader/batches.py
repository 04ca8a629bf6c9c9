"""Sync map-style datasets, a whole batch per thread call: fetch (``__getitems__`` or a loop)
and collate on the same thread, as a DataLoader worker does.

One hand-off per batch instead of one per sample, and no second Python thread (a separate
collate thread) competing for the GIL with the one decoding samples. Decoding runs on one
thread with the next batch queued behind the running one, so the thread does not wait for the
loop between batches; the thread that collates a batch also frees its samples (on the loop,
that was ~0.5 ms of GIL a batch of 64 small tensors). Batches are fetched in plan order as
``room`` allows (``prefetch`` ahead of the consumer) and handed over in plan order, or as they
finish with ``ordered=False``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..errors import LoaderError, describe
from ..executors import ThreadWorker
from .choice import (
    MIN_BATCHES_PER_CORE,
    MIN_WAITING_BATCHES_PER_CORE,
    for_workers,
    processes_unsuitable,
)
from .config import LoaderConfig, usable_cores
from .flow import Entry, collate_batch, fetch_and_collate, finish, parts_of
from .gather import Gather
from .plan import batch_count, batches_of, epoch_indices
from .probe import probe, timed_fetch
from .processes import CollateError, Fetched, ProcessPool, WorkerDied
from .reorder import Failed, collate_failed

__all__ = ["produce_map_batches"]


class _Epoch(Protocol):
    cfg: LoaderConfig
    room: asyncio.Semaphore
    ready: asyncio.Queue[Any]
    buffered: int
    counters: Any

    def _finish_batch(self, samples: list[Any]) -> Any: ...

    def _place(self, batch: Any) -> Any: ...

    def _check(self, samples: list[Any]) -> list[Any]: ...


class _Feeds:
    """What fills ``done``: the fetch-thread tasks, and worker processes once chosen."""

    def __init__(self, ep: _Epoch, collator: ThreadWorker) -> None:
        self.ep = ep
        self.collator = collator
        self.done: dict[int, Entry] = {}
        self.raw: set[int] = set()  # batches from processes: not yet checked nor placed
        self.changed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.lost: list[BaseException] = []
        self.pool: ProcessPool | None = None
        self.source = ep.cfg.source  # what worker processes fetch from

    def put(self, k: int, entry: Entry) -> None:
        self.done[k] = entry
        self.changed.set()

    def failed(self) -> BaseException | None:
        if self.lost:
            return self.lost[0]
        for t in self.tasks:  # a feed only stops early on a bug of ours: surface it
            if t.done() and not t.cancelled() and t.exception() is not None:
                return t.exception()
        return None

    async def start_processes(self, todo: Iterator[tuple[int, list[int]]], threads: int) -> None:
        """Fetch the batches left in ``todo`` in worker processes from now on, each batch
        spread over ``threads`` threads of its worker when more than one."""
        cfg = self.ep.cfg

        def arrived(item: Fetched) -> None:
            worker, k, failures, n, batch = item
            if k < 0:
                self.lost.append(_worker_failed(worker, batch))
                self.changed.set()
            else:
                self.raw.add(k)
                self.put(k, (failures, n, batch))

        self.pool = ProcessPool(
            self.source,
            cfg.collate,
            cfg.process_workers,
            skip=cfg.on_error == "skip",
            seed=int(torch.empty((), dtype=torch.int64).random_(generator=cfg.generator).item()),
            context=cfg.start_method,
            init=cfg.worker_init_fn,
            loop=asyncio.get_running_loop(),
            deliver=arrived,
            threads=threads,
        )
        await self.collator.run(self.pool.start, ())
        self.ep.counters["process_epochs"] += 1
        for _ in range(cfg.prefetch_batches - cfg.prefetch):  # prefetch per worker from now on
            self.ep.room.release()
        self.tasks.append(asyncio.create_task(self._dispatch(todo), name="asyncnn:loader-dispatch"))

    async def _dispatch(self, todo: Iterator[tuple[int, list[int]]]) -> None:
        assert self.pool is not None
        for k, idxs in todo:
            await self.ep.room.acquire()  # a batch may be prepared: hand it to its worker
            _count(self.ep, len(idxs))
            self.pool.submit(k, idxs)

    async def settle(self, k: int) -> Entry:
        """Batch ``k`` as the consumer gets it: collate errors named, placed on the device."""
        failures, n, batch = self.done.pop(k)
        if k not in self.raw:
            return failures, n, batch
        self.raw.discard(k)
        if isinstance(batch, CollateError):
            return failures, n, collate_failed(k, n - len(failures), batch.error)
        if batch is not None:
            ep = self.ep
            placing = ep.cfg.pin_memory or ep.cfg.device is not None
            batch = await self.collator.run(ep._place, (batch,)) if placing else (batch, None)
        return failures, n, batch

    async def close(self) -> None:
        """Stop the feeds; no worker process outlives its epoch, even when cancelled."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pool is not None:
            await self.collator.run(self.pool.close, ())


async def produce_map_batches(
    ep: _Epoch, pool: ThreadWorker | None, collator: ThreadWorker, gather: Gather | None
) -> None:
    """Batches of a sync map-style source: fetched and collated on fetch threads, or in worker
    processes (chosen, or measured with ``worker_kind="auto"``), handed over in plan order;
    ``gather``'s batches on the loop when there is no fetch thread."""
    cfg = ep.cfg
    indices = epoch_indices(len(cfg.source), cfg.sampler, cfg.shuffle, cfg.generator)
    count = batch_count(len(indices), cfg.batch_size, cfg.drop_last)
    todo = enumerate(batches_of(indices, cfg.batch_size, cfg.drop_last))
    if gather is not None and pool is None:
        await _gather_on_loop(ep, gather, todo)
        return
    feeds = _Feeds(ep, collator)
    try:
        if cfg.processes:
            await feeds.start_processes(todo, 1)
        else:
            assert pool is not None
            _start_threads(feeds, pool, todo, count, gather)
        await _deliver(ep, feeds, count)
    finally:
        await finish(feeds.close())


async def _gather_on_loop(
    ep: _Epoch, gather: Gather, todo: Iterator[tuple[int, list[int]]]
) -> None:
    """A small TensorDataset's batches, gathered on the loop as ``room`` allows (an index it
    cannot take is fetched one by one there, to name it)."""
    cfg = ep.cfg
    skip = cfg.on_error == "skip"
    for k, idxs in todo:
        await ep.room.acquire()
        _count(ep, len(idxs))
        entry = fetch_and_collate(
            cfg.source, idxs, k, skip, ep._finish_batch, [], (gather, ep._place)
        )
        if not _hand_over(ep, *entry):
            return


def _start_threads(
    feeds: _Feeds,
    pool: ThreadWorker,
    todo: Iterator[tuple[int, list[int]]],
    batches: int,
    gather: Gather | None,
) -> None:
    ep = feeds.ep
    cfg = ep.cfg
    skip = cfg.on_error == "skip"
    # Unless the user chose: one fetcher until the first samples show whether fetching waits
    # (I/O: spread batches over the threads) or computes (decoding holds the GIL: more threads
    # only contend for it; with worker_kind="auto", worker processes take over).
    # Decoding runs on one thread (the only fetch thread, or the collator's, idle otherwise on
    # this path) with the next batch queued behind the running one (a second fetcher), so the
    # thread goes from batch to batch without waiting for the loop to take the last one.
    decoder = pool if cfg.fetch_threads == 1 else feeds.collator
    widen = asyncio.Event()  # I/O-bound: every fetcher runs
    ahead = asyncio.Event()  # computing: the second fetcher runs too
    waiting: list[bool] = []  # non-empty: batches are spread over the threads (I/O-bound)
    probed: list[bool] = []  # non-empty once the first samples were measured
    if gather is not None:  # one indexing per tensor: nothing to measure, nothing to spread
        probed.append(True)
        ahead.set()
    elif cfg.workers is not None and cfg.worker_kind == "thread":
        probed.append(True)
        if cfg.workers > 1:
            waiting.append(True)
            widen.set()
        ahead.set()
    gathered = None if gather is None else (gather, ep._place)

    async def fetcher(i: int) -> None:
        if i:
            await (ahead if i == 1 else widen).wait()
        while True:
            await ep.room.acquire()  # a batch may be prepared: take the next one in plan order
            job = next(todo, None)
            if job is None:
                ep.room.release()
                return
            k, idxs = job
            _count(ep, len(idxs))
            head: list[Any] = []
            handing_off = False
            if not probed:  # the first batch: a few samples show what fetching is
                probed.append(True)
                head, spread, per_batch, idxs, bound = await probe(pool, cfg, idxs)
                if spread:
                    waiting.append(True)  # mostly waiting on I/O: spread batches over threads
                    if bound and await _use_processes(
                        feeds, batches, per_batch, per_core=MIN_WAITING_BATCHES_PER_CORE
                    ):
                        # ... but computing enough between waits to keep the GIL busy: the
                        # rest of the epoch in processes, each spreading over threads
                        await feeds.start_processes(todo, cfg.fetch_threads)
                        handing_off = True
                    else:
                        widen.set()
                        ahead.set()
                elif await _use_processes(feeds, batches, per_batch):
                    await feeds.start_processes(todo, 1)  # the rest of the epoch, in processes
                    handing_off = True
                else:
                    ahead.set()
            if waiting:
                head += await _spread(pool, cfg.source, idxs, cfg.fetch_threads)
                entry = await pool.run(collate_batch, (head, k, skip, ep._finish_batch))
            else:
                entry = await decoder.run(
                    fetch_and_collate,
                    (
                        cfg.source,
                        idxs,
                        k,
                        skip,
                        ep._finish_batch,
                        head,
                        gathered,
                    ),
                )
            feeds.put(k, entry)
            if handing_off:
                return

    feeds.tasks += [
        asyncio.create_task(fetcher(i), name="asyncnn:loader-fetch")
        for i in range(min(max(2, cfg.fetch_threads), batches) or 1)
    ]


async def _use_processes(
    feeds: _Feeds, batches: int, per_batch: float, per_core: int = MIN_BATCHES_PER_CORE
) -> bool:
    """``worker_kind="auto"``: should worker processes fetch the rest of this epoch?"""
    cfg = feeds.ep.cfg
    if cfg.worker_kind != "auto":
        return False
    source = for_workers(cfg.source)
    why_not = await feeds.collator.run(
        functools.partial(processes_unsuitable, per_core=per_core),
        (cfg, batches, usable_cores(), per_batch, source),
    )
    if why_not is None:
        feeds.source = source
    return why_not is None


def _worker_failed(worker: int, error: BaseException) -> LoaderError:
    if isinstance(error, WorkerDied):
        return LoaderError(str(error))
    err = LoaderError(f"AsyncLoader: worker_init_fn({worker}) raised {describe(error)}")
    err.__cause__ = error
    return err


def _count(ep: _Epoch, n: int) -> None:
    ep.buffered += n
    ep.counters["peak_buffered"] = max(ep.counters["peak_buffered"], ep.buffered)


async def _deliver(ep: _Epoch, feeds: _Feeds, count: int) -> None:
    """Hand the ``count`` batches over as they are done: in plan order, or as they finish
    with ``ordered=False``; raise what ``failed`` reports."""
    done = feeds.done
    for n in range(count):
        k = n if ep.cfg.ordered else None
        while (k not in done) if k is not None else not done:
            err = feeds.failed()
            if err is not None:
                raise err
            await feeds.changed.wait()
            feeds.changed.clear()
        if not _hand_over(ep, *await feeds.settle(k if k is not None else next(iter(done)))):
            return


async def _spread(pool: ThreadWorker, source: Any, idxs: list[int], threads: int) -> list[Any]:
    """An I/O-bound batch: its samples fetched in ``threads`` parts at once."""
    if not idxs:
        return []
    parts = parts_of(idxs, threads)
    got = await asyncio.gather(*(pool.run(timed_fetch, (source, p)) for p in parts))
    return [s for fetched in got for s in fetched[0]]


def _hand_over(ep: _Epoch, failures: list[Failed], n: int, batch: Any) -> bool:
    """Queue a fetched batch of ``n`` samples for the consumer; False when the epoch must end
    (an error)."""
    try:
        ep._check(failures)  # raises for a failed sample unless errors are skipped
    except LoaderError as exc:
        ep.ready.put_nowait(Failed(exc.index or 0, exc))
        return False
    if isinstance(batch, Failed):
        ep.ready.put_nowait(batch)
        return False
    if batch is None:  # every sample skipped: nothing to hand over, the slot is free again
        ep.buffered -= n
        ep.room.release()
        return True
    moved, pending = batch
    ep.ready.put_nowait((moved, n - len(failures), n, pending))
    return True
