"""One epoch of an ``AsyncLoader``: a producer task prepares batches ahead of the consumer.

``room`` counts the batches the producer may prepare: ``prefetch`` ahead of the consumer plus the
one it is waiting for. Map-style sources also bound, with ``slots``, the samples fetched (or being
fetched) and not yet handed to the consumer. Everything that belongs to one epoch (the buffer
count, the copy stream, the threads) lives here, so two epochs never share it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import torch

from ..devices import map_tensors
from ..errors import LoaderError, describe
from ..executors import ThreadWorker
from .batches import produce_map_batches
from .config import LoaderConfig
from .flow import GetitemsError, Slots, async_chunks, sync_batches
from .gather import Gather, gather_for
from .plan import END, batch_plan, epoch_indices, next_or_end, rows
from .reorder import Failed, Reassembler, collate_failed

__all__ = ["Epoch"]

_THREAD_JOIN_TIMEOUT = 5.0


class Epoch:
    def __init__(self, cfg: LoaderConfig, counters: Counter[str]) -> None:
        self.cfg = cfg
        self.counters = counters
        self.buffered = 0  # samples fetched (or being fetched) and not handed over
        self.ready: asyncio.Queue[Any] = asyncio.Queue()  # bounded by `room`
        self.room = asyncio.Semaphore(cfg.prefetch)
        self._read = 0  # samples read from an iterable source so far (named when it fails)
        self.slots = Slots(cfg.buffer_bound)
        self.copy_stream: Any = None

    async def batches(self) -> AsyncIterator[Any]:
        """The consumer's side: take prepared batches, release their slots, wait for copies."""
        cfg = self.cfg
        threads = (cfg.fetch_threads if cfg.kind == "map" else 0) if cfg.map_style else 1
        gather, on_loop = gather_for(cfg)
        if cfg.processes or on_loop:
            threads = 0
        async with self._helpers(threads) as (collator, waiter, pool):
            producer = asyncio.create_task(
                self._produce(collator, pool, gather), name="asyncnn:loader-produce"
            )
            try:
                while True:
                    self.room.release()  # the consumer asks for the next batch
                    item = await self.ready.get()
                    if item is END:
                        return
                    if isinstance(item, Failed):
                        raise item.error
                    batch, n, held, pending = item
                    if held:
                        self.buffered -= held
                        self.slots.give(held)
                    if pending is not None and not pending[0].query():  # the wait is a thread's
                        await waiter.run(pending[0].synchronize, ())
                    self.counters["batches"] += 1
                    self.counters["samples"] += n
                    yield batch
            finally:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

    async def _produce(
        self, collator: ThreadWorker, pool: ThreadWorker | None, gather: Gather | None
    ) -> None:
        try:
            if self.cfg.kind == "map":
                await produce_map_batches(self, pool, collator, gather)
            elif self.cfg.map_style:
                await self._produce_map(collator)
            else:
                assert pool is not None
                await self._produce_iterable(collator, pool)
        except Exception as exc:  # a bug of ours: source and collate errors are items
            self.ready.put_nowait(Failed(-1, exc))
        self.ready.put_nowait(END)

    @contextlib.asynccontextmanager
    async def _helpers(
        self, fetchers: int
    ) -> AsyncIterator[tuple[ThreadWorker, ThreadWorker, ThreadWorker | None]]:
        loop = asyncio.get_running_loop()
        collator = ThreadWorker("loader:collate", loop)
        waiter = ThreadWorker("loader:wait", loop)
        pool = ThreadWorker("loader:fetch", loop, fetchers) if fetchers else None
        device = self.cfg.device
        workers = [w for w in (collator, waiter, pool) if w is not None]
        try:
            if device is not None and device.type == "cuda":
                self.copy_stream = await collator.run(torch.cuda.Stream, (device,))
            yield collator, waiter, pool
        finally:
            for w in workers:
                w.stop()
            with anyio.CancelScope(shield=True):
                for w in workers:
                    await w.wait_stopped(_THREAD_JOIN_TIMEOUT)

    # -- collation -------------------------------------------------------------------------------

    def _finish_batch(self, samples: list[Any]) -> Any:
        """Collate, pin and start the copy to the device: runs on the collate thread."""
        return self._place(self.cfg.collate(samples))

    def _place(self, batch: Any) -> Any:
        """Pin a collated batch and start its copy to the device: ``(batch, pending copy)``."""
        cfg = self.cfg
        if cfg.pin_memory:
            batch = map_tensors(batch, lambda t: t if t.is_pinned() else t.pin_memory())
        device = cfg.device
        if device is None or device.type == "cpu":
            if device is not None:
                batch = map_tensors(batch, lambda t: t.to(device))
            return batch, None
        with torch.cuda.stream(self.copy_stream):
            moved = map_tensors(batch, lambda t: t.to(device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return moved, (done, batch)  # the host batch stays referenced until the copy is done

    async def _prepare(self, collator: ThreadWorker, samples: list[Any], held: int, k: int) -> Any:
        """Batch ``k``, collated (pinned, its copy started) on the collate thread, as an item of
        the ready queue: ``(batch, samples, slots held, pending copy)`` or a ``Failed``."""
        try:
            batch, pending = await collator.run(self._finish_batch, (samples,))
        except Exception as exc:
            return collate_failed(k, len(samples), exc)
        return batch, len(samples), held, pending

    def _check(self, samples: list[Any]) -> list[Any]:
        """Raise for a failed sample, or leave it out in skip mode."""
        good = []
        for s in samples:
            if isinstance(s, Failed):
                if isinstance(s.error, GetitemsError):  # the dataset's bug: never skipped
                    raise LoaderError(f"AsyncLoader: {s.error}", s.index) from s.error
                if self.cfg.on_error == "raise":
                    raise LoaderError(
                        f"AsyncLoader: fetching sample {s.index} failed with "
                        f"{describe(s.error)} (on_error='skip' leaves such samples out)",
                        s.index,
                    ) from s.error
                self.counters["skipped"] += 1
            else:
                good.append(s)
        return good

    # -- map-style sources -----------------------------------------------------------------------

    async def _fetch(self, index: int) -> Any:
        cfg = self.cfg
        try:
            if cfg.fetch is not None:
                return await cfg.fetch(index)
            return await cfg.source[index]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Failed(index, exc)

    async def _produce_map(self, collator: ThreadWorker) -> None:
        """Async map-style sources: up to ``concurrency`` fetches on the loop, samples put back
        into batches as they arrive."""
        cfg, slots = self.cfg, self.slots
        indices = epoch_indices(len(cfg.source), cfg.sampler, cfg.shuffle, cfg.generator)
        plan = batch_plan(indices, cfg.batch_size, cfg.drop_last)
        parts = Reassembler(plan, cfg.ordered, cfg.batch_size)
        changed = asyncio.Event()
        # Long-lived fetchers share one iterator of work: no task per sample, and at most
        # `concurrency` fetches in flight. Each takes the next sample in sampler order.
        work = ((b, pos, index) for b, idxs in enumerate(plan) for pos, index in enumerate(idxs))

        async def fetcher() -> None:
            for b, pos, index in work:
                if not slots.take_nowait():
                    await slots.take()  # FIFO: earlier samples get their slot first
                value = await self._fetch(index)
                self.buffered += 1
                if self.buffered > self.counters["peak_buffered"]:
                    self.counters["peak_buffered"] = self.buffered
                if parts.put(b, pos, value):
                    changed.set()  # wake the producer only when a batch is complete

        fetchers = [
            asyncio.create_task(fetcher(), name="asyncnn:loader-fetch")
            for _ in range(min(cfg.concurrency, parts.total))
        ]
        fetching = asyncio.gather(*fetchers)
        try:
            for k in range(len(plan)):  # unordered batches fill to the same sizes as the plan's
                await self.room.acquire()
                while not parts.ready(k):
                    await _wait(changed, fetching)
                if not await self._hand_over(collator, parts.take(k), k):
                    return
        finally:
            for f in fetchers:
                f.cancel()
            await asyncio.gather(*fetchers, return_exceptions=True)
            if fetching.done() and not fetching.cancelled():
                fetching.exception()  # retrieved: it was raised above if it mattered

    async def _hand_over(self, collator: ThreadWorker, samples: list[Any], k: int) -> bool:
        """Check, collate and queue batch ``k``; False when the epoch must end (an error)."""
        try:
            good = self._check(samples)
        except LoaderError as exc:
            self.ready.put_nowait(Failed(exc.index or 0, exc))
            return False
        if not good:  # every sample skipped: nothing to hand over
            self.buffered -= len(samples)
            self.slots.give(len(samples))
            self.room.release()
            return True
        item = await self._prepare(collator, good, len(samples), k)
        self.ready.put_nowait(item)
        return not isinstance(item, Failed)

    # -- iterable sources ------------------------------------------------------------------------

    async def _read_iterable(self, reader: ThreadWorker) -> None:
        """A sync iterable: each batch read and collated in one call on the reader thread,
        the next one queued behind it (``sync_batches``)."""
        cfg = self.cfg
        batches = sync_batches(
            iter(cfg.source), cfg.batch_size, self.room, reader, self._finish_batch, cfg.drop_last
        )
        async with contextlib.aclosing(batches):
            k = 0
            async for count, made in batches:
                self._read += count
                if made is None:
                    return  # a short last batch, dropped
                if isinstance(made, Exception):
                    self.ready.put_nowait(collate_failed(k, count, made))
                    return
                batch, pending = made
                self.ready.put_nowait((batch, count, 0, pending))
                k += 1

    async def _produce_iterable(self, collator: ThreadWorker, reader: ThreadWorker) -> None:
        """One reader thread reads a sync source (a DataLoader too), in order."""
        cfg = self.cfg
        try:
            if cfg.kind == "dataloader":
                it = iter(cfg.source)
                while True:
                    await self.room.acquire()
                    batch = await reader.run(next_or_end, (it,))
                    if batch is END:
                        return
                    n = rows(batch)
                    self._read += n
                    self.ready.put_nowait((batch, n, 0, None))
            if cfg.kind != "async-iterable":
                await self._read_iterable(reader)
                return
            chunks = async_chunks(cfg.source, cfg.batch_size, self.room)
            async with contextlib.aclosing(chunks):
                k = 0
                async for chunk in chunks:
                    self._read += len(chunk)
                    if len(chunk) < cfg.batch_size and cfg.drop_last:
                        return
                    item = await self._prepare(collator, chunk, 0, k)
                    self.ready.put_nowait(item)
                    if isinstance(item, Failed):
                        return
                    k += 1
        except Exception as exc:
            position = self._read
            err = LoaderError(
                f"AsyncLoader: reading the source failed after {position} samples "
                f"with {describe(exc)}",
                position,
            )
            err.__cause__ = exc
            self.ready.put_nowait(Failed(position, err))


async def _wait(changed: asyncio.Event, fetching: asyncio.Future[Any]) -> None:
    # A fetcher only stops early on a bug of ours (fetch errors are caught): surface it.
    if fetching.done() and not fetching.cancelled() and fetching.exception() is not None:
        raise fetching.exception()  # type: ignore[misc]
    await changed.wait()
    changed.clear()
