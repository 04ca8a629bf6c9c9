"""Async data loading: fetch samples concurrently, collate them into batches, feed pipelines.

``AsyncLoader`` replaces a ``torch.utils.data.DataLoader``'s worker processes with concurrency on
one event loop: ``async`` fetches (network, object storage, databases) run on the loop, up to
``concurrency`` at once; a sync ``__getitem__`` runs on a small set of dedicated threads.
Collation, pinning and the early host-to-device copy run on a collate thread, never on the loop.
Batches are prepared ahead of the consumer by a producer task, ``prefetch`` of them and no more.
Memory is bounded: at most ``max(concurrency, batch_size) + prefetch * batch_size`` samples are
fetched (or being fetched) and not yet handed to the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import warnings
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import torch

from .devices import map_tensors, parse_device
from .errors import LoaderError
from .executors import ThreadWorker

__all__ = ["AsyncLoader", "LoaderStats"]

_MISSING = object()
_END = object()
_THREAD_JOIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class LoaderStats:
    """What a loader has done: ``epochs`` started, ``batches`` and ``samples`` yielded, samples
    ``skipped`` (``on_error="skip"``), and the most samples it ever held fetched-but-unconsumed
    (``peak_buffered``; never above ``buffer_bound``)."""

    epochs: int
    batches: int
    samples: int
    skipped: int
    peak_buffered: int
    buffer_bound: int


class _Failed:
    __slots__ = ("error", "index")

    def __init__(self, index: int, error: BaseException) -> None:
        self.index = index
        self.error = error


class _Slots:
    """A counting semaphore with a synchronous fast path and a bulk release."""

    __slots__ = ("free", "waiters")

    def __init__(self, n: int) -> None:
        self.free = n
        self.waiters: deque[asyncio.Future[None]] = deque()

    def take_nowait(self) -> bool:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut  # resolved by give(), which already counted this slot as taken
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give(1)  # handed a slot while being cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # give() may have dropped it already
                    self.waiters.remove(fut)
            raise

    def give(self, n: int) -> None:
        self.free += n
        while self.free > 0 and self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.free -= 1
                fut.set_result(None)


def _next_chunk(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _next_or_end(it: Iterator[Any]) -> Any:
    return next(it, _END)


class AsyncLoader:
    """Load samples concurrently and yield collated batches.

    Args:
        source: a map-style dataset (``__len__`` + ``__getitem__``, sync or ``async def``), a sync
            iterable of samples, an async iterable of samples, or a ``torch.utils.data.DataLoader``
            (its batches are passed through).
        batch_size: samples per batch (>= 1).
        concurrency: the most fetches in flight at once (map-style sources).
        prefetch: batches kept ready ahead of the consumer, and no more.
        shuffle: a new random order each epoch (map-style); seeded by ``generator``.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        collate: builds a batch from a list of samples (default: torch's ``default_collate``).
        pin_memory: collate into pinned (page-locked) host memory, for fast copies to a GPU.
        device: copy each batch to this device (e.g. ``"cuda:0"``) on a copy stream as soon as it
            is ready, ahead of the consumer.
        ordered: yield batches in sampler order (default) although fetches finish out of order;
            ``False`` yields batches as they fill, for the highest throughput.
        sampler: an iterable of indices (map-style) used instead of ``range`` or ``shuffle``.
        generator: a ``torch.Generator`` for ``shuffle`` (as in ``DataLoader``).
        fetch: ``async def fetch(index)`` used instead of ``source[index]``.
        on_error: ``"raise"`` (default: a ``LoaderError`` naming the index, cause chained) or
            ``"skip"`` (leave the sample out and count it in ``stats().skipped``; map-style).
        threads: threads for a sync ``__getitem__`` (default ``min(concurrency, 8)``).

    Leaving an ``async for`` early cancels the fetches in flight once the abandoned epoch is
    closed; ``async with contextlib.aclosing(aiter(loader)) as batches:`` closes it at once.

    Example::

        loader = AsyncLoader(dataset, batch_size=64, concurrency=64, shuffle=True)
        async for batch in loader:
            ...
        async for y in pipe.stream(loader):   # a loader feeds a pipeline
            ...
    """

    def __init__(
        self,
        source: Any,
        batch_size: int = 64,
        concurrency: int = 64,
        prefetch: int = 2,
        shuffle: bool = False,
        drop_last: bool = False,
        collate: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        ordered: bool = True,
        *,
        sampler: Iterable[int] | None = None,
        generator: torch.Generator | None = None,
        fetch: Callable[[int], Any] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        threads: int | None = None,
    ) -> None:
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("concurrency", concurrency, 1),
            ("prefetch", prefetch, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"AsyncLoader: {name}={value!r} must be a whole number >= {low}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"AsyncLoader: on_error={on_error!r}: use 'raise' or 'skip'")
        if fetch is not None and not inspect.iscoroutinefunction(fetch):
            raise TypeError("AsyncLoader: fetch must be an `async def fetch(index)`")
        self.source = source
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.collate = collate if collate is not None else torch.utils.data.default_collate
        self.pin_memory = pin_memory
        self.device = None if device is None else parse_device(device, "AsyncLoader")
        self.ordered = ordered
        self.sampler = sampler
        self.generator = generator
        self.fetch = fetch
        self.on_error = on_error
        self.threads = threads if threads is not None else min(concurrency, 8)
        self.kind = self._kind()
        if (shuffle or sampler is not None) and self.kind not in ("map", "async-map"):
            raise ValueError(
                f"AsyncLoader: shuffle/sampler need a map-style source (__len__ + __getitem__) "
                f"or fetch=; this source is {self.kind}"
            )
        if shuffle and sampler is not None:
            raise ValueError("AsyncLoader: pass shuffle=True or a sampler, not both")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn(
                "AsyncLoader(pin_memory=True): no accelerator here, so batches stay in pageable "
                "memory; drop pin_memory on CPU-only machines",
                RuntimeWarning,
                stacklevel=2,
            )
            self.pin_memory = False
        self._epochs = self._batches = self._samples = self._skipped = 0
        self._buffered = self._peak = 0
        self.buffer_bound = max(concurrency, batch_size) + prefetch * batch_size

    # -- shape of the source ---------------------------------------------------------------------

    def _kind(self) -> str:
        src = self.source
        if isinstance(src, torch.utils.data.DataLoader):
            return "dataloader"
        if self.fetch is not None:
            if not hasattr(src, "__len__"):
                raise TypeError("AsyncLoader(fetch=...): source must have a length (the indices)")
            return "async-map"
        getitem = getattr(type(src), "__getitem__", None)
        if getitem is not None and hasattr(src, "__len__"):
            return "async-map" if inspect.iscoroutinefunction(getitem) else "map"
        if isinstance(src, AsyncIterable):
            return "async-iterable"
        if isinstance(src, Iterable):
            return "iterable"
        raise TypeError(
            f"AsyncLoader: cannot load from {type(src).__name__}: give a map-style dataset "
            "(__len__ + __getitem__), an iterable or async iterable of samples, or a DataLoader"
        )

    def __len__(self) -> int:
        """Batches per epoch, where the source has a length."""
        if self.kind == "dataloader":
            return len(self.source)
        n: int
        if self.sampler is not None and hasattr(self.sampler, "__len__"):
            n = len(self.sampler)  # type: ignore[arg-type]
        elif self.kind in ("map", "async-map"):
            n = len(self.source)
        elif hasattr(self.source, "__len__"):
            n = len(self.source)
        else:
            raise TypeError(f"AsyncLoader: this {self.kind} source has no length")
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def stats(self) -> LoaderStats:
        return LoaderStats(
            epochs=self._epochs,
            batches=self._batches,
            samples=self._samples,
            skipped=self._skipped,
            peak_buffered=self._peak,
            buffer_bound=self.buffer_bound,
        )

    def __repr__(self) -> str:
        return (
            f"<AsyncLoader {self.kind} batch_size={self.batch_size} "
            f"concurrency={self.concurrency} prefetch={self.prefetch}>"
        )

    # -- epochs ----------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Any]:
        """One epoch; each ``async for`` starts a new one (reshuffled when ``shuffle``)."""
        self._epochs += 1
        return self._epoch()

    def _indices(self) -> list[int]:
        if self.sampler is not None:
            return list(self.sampler)
        n = len(self.source)
        if not self.shuffle:
            return list(range(n))
        gen = self.generator
        if gen is None:
            gen = torch.Generator()
            gen.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        return torch.randperm(n, generator=gen).tolist()

    def _plan(self) -> list[list[int]]:
        idx = self._indices()
        bs = self.batch_size
        plan = [idx[i : i + bs] for i in range(0, len(idx), bs)]
        if self.drop_last and plan and len(plan[-1]) < bs:
            plan.pop()
        return plan

    def _finish_batch(self, samples: list[Any]) -> Any:
        """Collate, pin and start the copy to the device: runs on the collate thread."""
        batch = self.collate(samples)
        if self.pin_memory:
            batch = map_tensors(batch, lambda t: t if t.is_pinned() else t.pin_memory())
        if self.device is None or self.device.type == "cpu":
            if self.device is not None:
                batch = map_tensors(batch, lambda t: t.to(self.device))
            return batch, None
        stream = self._copy_stream
        with torch.cuda.stream(stream):
            moved = map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(stream)
        return moved, (done, batch)  # the host batch stays referenced until the copy is done

    @contextlib.asynccontextmanager
    async def _helpers(
        self, fetchers: int
    ) -> AsyncIterator[tuple[ThreadWorker, ThreadWorker, ThreadWorker | None]]:
        loop = asyncio.get_running_loop()
        collator = ThreadWorker("loader:collate", loop)
        waiter = ThreadWorker("loader:wait", loop)
        pool = ThreadWorker("loader:fetch", loop, fetchers) if fetchers else None
        if self.device is not None and self.device.type == "cuda":
            self._copy_stream = await collator.run(torch.cuda.Stream, (self.device,))
        workers = [w for w in (collator, waiter, pool) if w is not None]
        try:
            yield collator, waiter, pool
        finally:
            for w in workers:
                w.stop()
            with anyio.CancelScope(shield=True):
                for w in workers:
                    await w.wait_stopped(_THREAD_JOIN_TIMEOUT)

    async def _epoch(self) -> AsyncIterator[Any]:
        """The consumer's side of an epoch; a producer task prepares the batches ahead of it.

        ``room`` counts the batches the producer may prepare: ``prefetch`` ahead of the consumer
        plus the one it is waiting for. Map-style sources also bound, with ``slots``, the samples
        fetched (or being fetched) and not yet handed to the consumer.
        """
        map_style = self.kind in ("map", "async-map")
        ready: asyncio.Queue[Any] = asyncio.Queue()  # bounded by `room`
        room = asyncio.Semaphore(self.prefetch)
        slots = _Slots(self.buffer_bound)
        threads = (self.threads if self.kind == "map" else 0) if map_style else 1
        async with self._helpers(threads) as (collator, waiter, pool):

            async def run() -> None:
                try:
                    if map_style:
                        await self._produce_map(collator, pool, room, slots, ready)
                    else:
                        assert pool is not None
                        await self._produce_iterable(collator, pool, room, ready)
                except Exception as exc:  # a bug of ours: source and collate errors are items
                    ready.put_nowait(_Failed(-1, exc))
                ready.put_nowait(_END)

            producer = asyncio.ensure_future(run())
            try:
                while True:
                    room.release()  # the consumer asks for the next batch
                    item = await ready.get()
                    if item is _END:
                        return
                    if isinstance(item, _Failed):
                        raise item.error
                    batch, n, held, pending = item
                    if held:
                        self._buffered -= held
                        slots.give(held)
                    if pending is not None and not pending[0].query():  # the wait is a thread's
                        await waiter.run(pending[0].synchronize, ())
                    self._batches += 1
                    self._samples += n
                    yield batch
            finally:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
                self._buffered = 0

    async def _prepare(self, collator: ThreadWorker, samples: list[Any], held: int, k: int) -> Any:
        """Batch ``k``, collated (pinned, its copy started) on the collate thread, as an item of
        the ready queue: ``(batch, samples, slots held, pending copy)`` or a ``_Failed``."""
        try:
            batch, pending = await collator.run(self._finish_batch, (samples,))
        except Exception as exc:
            err = LoaderError(
                f"AsyncLoader: collating batch {k} ({len(samples)} samples) failed with "
                f"{type(exc).__name__}: {exc} (check collate= against what the source returns)"
            )
            err.__cause__ = exc
            return _Failed(-1, err)
        return batch, len(samples), held, pending

    async def _produce_map(
        self,
        collator: ThreadWorker,
        pool: ThreadWorker | None,
        room: asyncio.Semaphore,
        slots: _Slots,
        ready: asyncio.Queue[Any],
    ) -> None:
        plan = self._plan()
        ordered, bs = self.ordered, self.batch_size
        changed = asyncio.Event()
        results: list[list[Any]] = [[_MISSING] * len(b) for b in plan]
        remaining = [len(b) for b in plan]
        filled: deque[list[Any]] = deque()  # unordered: batches in the order they filled
        filling: list[Any] = []
        delivered = 0
        total = sum(remaining)
        # Long-lived fetchers share one iterator of work: no task per sample, and at most
        # `concurrency` fetches in flight. Each takes the next sample in sampler order.
        work = ((b, pos, index) for b, idxs in enumerate(plan) for pos, index in enumerate(idxs))

        async def fetcher() -> None:
            nonlocal delivered, filling
            for b, pos, index in work:
                if not slots.take_nowait():
                    await slots.take()  # FIFO: earlier samples get their slot first
                try:
                    if pool is not None:
                        value: Any = await pool.run(self.source.__getitem__, (index,))
                    elif self.fetch is not None:
                        value = await self.fetch(index)
                    else:
                        value = await self.source[index]
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    value = _Failed(index, exc)
                self._buffered += 1
                if self._buffered > self._peak:
                    self._peak = self._buffered
                delivered += 1
                if ordered:
                    results[b][pos] = value
                    remaining[b] -= 1
                    if remaining[b] == 0:
                        changed.set()  # wake the producer only when a batch is complete
                else:
                    filling.append(value)
                    if len(filling) == bs or delivered == total:
                        filled.append(filling)
                        filling = []
                        changed.set()

        fetchers = [asyncio.ensure_future(fetcher()) for _ in range(min(self.concurrency, total))]
        fetching = asyncio.gather(*fetchers)
        try:
            for k in range(len(plan)):  # unordered batches fill to the same sizes as the plan's
                await room.acquire()
                if ordered:
                    while remaining[k]:
                        await self._wait(changed, fetching)
                    samples, results[k] = results[k], []
                else:
                    while not filled:
                        await self._wait(changed, fetching)
                    samples = filled.popleft()
                try:
                    good = self._check(samples)
                except LoaderError as exc:
                    ready.put_nowait(_Failed(exc.index or 0, exc))
                    return
                if not good:  # every sample skipped: nothing to hand over
                    self._buffered -= len(samples)
                    slots.give(len(samples))
                    room.release()
                    continue
                item = await self._prepare(collator, good, len(samples), k)
                ready.put_nowait(item)
                if isinstance(item, _Failed):
                    return
        finally:
            for f in fetchers:
                f.cancel()
            await asyncio.gather(*fetchers, return_exceptions=True)
            if fetching.done() and not fetching.cancelled():
                fetching.exception()  # retrieved: it was raised above if it mattered

    @staticmethod
    async def _wait(changed: asyncio.Event, fetching: asyncio.Future[Any]) -> None:
        # A fetcher only stops early on a bug of ours (fetch errors are caught): surface it.
        if fetching.done() and not fetching.cancelled() and fetching.exception() is not None:
            raise fetching.exception()  # type: ignore[misc]
        await changed.wait()
        changed.clear()

    def _check(self, samples: list[Any]) -> list[Any]:
        """Raise for a failed sample, or leave it out in skip mode."""
        good = []
        for s in samples:
            if isinstance(s, _Failed):
                if self.on_error == "raise":
                    raise LoaderError(
                        f"AsyncLoader: fetching sample {s.index} failed with "
                        f"{type(s.error).__name__}: {s.error} (on_error='skip' leaves such "
                        "samples out)",
                        s.index,
                    ) from s.error
                self._skipped += 1
            else:
                good.append(s)
        return good

    async def _produce_iterable(
        self,
        collator: ThreadWorker,
        reader: ThreadWorker,
        room: asyncio.Semaphore,
        ready: asyncio.Queue[Any],
    ) -> None:
        # One reader thread reads a sync source (a DataLoader too), in order.
        bs, k, position = self.batch_size, 0, 0
        try:
            if self.kind == "dataloader":
                it = iter(self.source)
                while True:
                    await room.acquire()
                    batch = await reader.run(_next_or_end, (it,))
                    if batch is _END:
                        return
                    n = _rows(batch)
                    position += n
                    ready.put_nowait((batch, n, 0, None))
            if self.kind == "async-iterable":
                chunks: AsyncGenerator[list[Any], None] = _chunks(self.source, bs, room)
            else:
                chunks = _sync_chunks(iter(self.source), bs, room, reader)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    position += len(chunk)
                    if len(chunk) < bs and self.drop_last:
                        return
                    item = await self._prepare(collator, chunk, 0, k)
                    ready.put_nowait(item)
                    if isinstance(item, _Failed):
                        return
                    k += 1
        except Exception as exc:
            err = LoaderError(
                f"AsyncLoader: reading the source failed after {position} samples "
                f"with {type(exc).__name__}: {exc}",
                position,
            )
            err.__cause__ = exc
            ready.put_nowait(_Failed(position, err))


async def _chunks(
    source: AsyncIterable[Any], n: int, room: asyncio.Semaphore
) -> AsyncGenerator[list[Any], None]:
    """Lists of ``n`` samples (the last may be shorter); each begins once ``room`` allows."""
    await room.acquire()
    chunk: list[Any] = []
    async for sample in source:
        chunk.append(sample)
        if len(chunk) == n:
            yield chunk
            chunk = []
            await room.acquire()
    if chunk:
        yield chunk


async def _sync_chunks(
    it: Iterator[Any], n: int, room: asyncio.Semaphore, reader: ThreadWorker
) -> AsyncGenerator[list[Any], None]:
    """Lists of ``n`` samples read on the reader thread; each read begins once ``room`` allows."""
    while True:
        await room.acquire()
        chunk = await reader.run(_next_chunk, (it, n))
        if not chunk:
            return
        yield chunk


def _rows(batch: Any) -> int:
    """Samples in a ``DataLoader`` batch: the leading size of its first tensor or list."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple) and batch:
        first = batch[0]
        return _rows(first) if isinstance(first, torch.Tensor | list | tuple | dict) else len(batch)
    return 1
