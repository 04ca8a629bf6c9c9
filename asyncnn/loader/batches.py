"""Sync map-style datasets, a whole batch per thread call: fetch (``__getitems__`` or a loop)
and collate on the same fetch thread, as a DataLoader worker does.

One hand-off per batch instead of one per sample, and no second Python thread (a separate
collate thread) competing for the GIL with the one decoding samples. Batches are fetched in plan
order as ``room`` allows (``prefetch`` ahead of the consumer) and handed over in plan order, or
as they finish with ``ordered=False``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import LoaderError
from ..executors import ThreadWorker
from .config import LoaderConfig
from .flow import fetch_many
from .plan import batch_plan, epoch_indices
from .reorder import Failed, collate_failed

__all__ = ["IO_BOUND", "produce_sync_batches"]

IO_BOUND = 0.5  # a fetch that computed less than this share of its time was waiting on I/O
PROBE = 4  # samples fetched alone first, to measure that


class _Epoch(Protocol):
    cfg: LoaderConfig
    room: asyncio.Semaphore
    ready: asyncio.Queue[Any]
    buffered: int
    counters: Any

    def _finish_batch(self, samples: list[Any]) -> Any: ...

    def _check(self, samples: list[Any]) -> list[Any]: ...


def _timed_fetch(source: Any, idxs: list[int]) -> tuple[list[Any], float]:
    """On a fetch thread: the samples, and the share of the fetch's wall time this thread
    spent computing (near 1: decoding, which holds the GIL; near 0: waiting on I/O)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    samples = fetch_many(source, idxs)
    return samples, (time.thread_time() - cpu) / max(1e-9, time.perf_counter() - wall)


def _collate(samples: list[Any], k: int, skip: bool, finish: Callable[[list[Any]], Any]) -> Any:
    """The collated batch of the good samples; None when a sample failed and errors raise, or
    when none is left; a ``Failed`` naming the batch when collate raised."""
    good = [s for s in samples if not isinstance(s, Failed)]
    if not good or (len(good) != len(samples) and not skip):
        return None
    try:
        return finish(good)
    except Exception as exc:
        return collate_failed(k, len(good), exc)


def _fetch_and_collate(
    source: Any,
    idxs: list[int],
    k: int,
    skip: bool,
    finish: Callable[[list[Any]], Any],
    head: list[Any],
) -> tuple[list[Any], Any, float]:
    """Decoding work: fetch (after ``head``, already fetched) and collate on one thread."""
    samples, busy = _timed_fetch(source, idxs)
    samples = head + samples
    return samples, _collate(samples, k, skip, finish), busy


async def produce_sync_batches(ep: _Epoch, pool: ThreadWorker) -> None:
    cfg = ep.cfg
    indices = epoch_indices(len(cfg.source), cfg.sampler, cfg.shuffle, cfg.generator)
    plan = list(enumerate(batch_plan(indices, cfg.batch_size, cfg.drop_last)))
    todo = iter(plan)
    done: dict[int, Any] = {}
    changed = asyncio.Event()
    skip = cfg.on_error == "skip"
    # threads=None: one fetcher until the first batch shows whether fetching waits (I/O) or
    # computes (decoding holds the GIL: more threads only contend for it).
    widen = asyncio.Event()
    waiting: list[bool] = []  # non-empty: batches are spread over the threads (I/O-bound)
    probed: list[bool] = []  # non-empty once the first samples were measured
    if cfg.threads is not None:  # the user chose: several threads share each batch
        probed.append(True)
        if cfg.threads > 1:
            waiting.append(True)
        widen.set()

    async def fetcher(i: int) -> None:
        if i:
            await widen.wait()
        while True:
            await ep.room.acquire()  # a batch may be prepared: take the next one in plan order
            job = next(todo, None)
            if job is None:
                ep.room.release()
                return
            k, idxs = job
            ep.buffered += len(idxs)
            ep.counters["peak_buffered"] = max(ep.counters["peak_buffered"], ep.buffered)
            head: list[Any] = []
            if not probed:  # the first batch: a few samples show what fetching is
                probed.append(True)
                head, busy = await pool.run(_timed_fetch, (cfg.source, idxs[:PROBE]))
                idxs = idxs[PROBE:]
                if busy < IO_BOUND:
                    waiting.append(True)  # mostly waiting on I/O: spread batches over threads
                    widen.set()
            if waiting:
                samples = head + await _spread(pool, cfg.source, idxs, cfg.fetch_threads)
                batch = await pool.run(_collate, (samples, k, skip, ep._finish_batch))
            else:
                samples, batch, _ = await pool.run(
                    _fetch_and_collate, (cfg.source, idxs, k, skip, ep._finish_batch, head)
                )
            done[k] = samples, batch
            changed.set()

    tasks = [
        asyncio.create_task(fetcher(i), name="asyncnn:loader-fetch")
        for i in range(min(cfg.fetch_threads, len(plan)) or 1)
    ]
    try:
        for n in range(len(plan)):
            k = n if cfg.ordered else None
            while (k not in done) if k is not None else not done:
                for t in tasks:  # a fetcher only stops early on a bug of ours: surface it
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                await changed.wait()
                changed.clear()
            samples, batch = done.pop(k if k is not None else next(iter(done)))
            if not _hand_over(ep, samples, batch):
                return
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _spread(pool: ThreadWorker, source: Any, idxs: list[int], threads: int) -> list[Any]:
    """An I/O-bound batch: its samples fetched in ``threads`` parts at once."""
    if not idxs:
        return []
    size = -(-len(idxs) // threads)
    parts = [idxs[i : i + size] for i in range(0, len(idxs), size)]
    got = await asyncio.gather(*(pool.run(_timed_fetch, (source, p)) for p in parts))
    return [s for samples, _ in got for s in samples]


def _hand_over(ep: _Epoch, samples: list[Any], batch: Any) -> bool:
    """Queue a fetched batch for the consumer; False when the epoch must end (an error)."""
    try:
        good = ep._check(samples)  # raises for a failed sample unless errors are skipped
    except LoaderError as exc:
        ep.ready.put_nowait(Failed(exc.index or 0, exc))
        return False
    if isinstance(batch, Failed):
        ep.ready.put_nowait(batch)
        return False
    if batch is None:  # every sample skipped: nothing to hand over, the slot is free again
        ep.buffered -= len(samples)
        ep.room.release()
        return True
    moved, pending = batch
    ep.ready.put_nowait((moved, len(good), len(samples), pending))
    return True
