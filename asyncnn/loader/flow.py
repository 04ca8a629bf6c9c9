"""Flow control for an epoch: sample slots, sources read in chunks as room allows, and the
work a thread does for one batch (fetch or read, then collate, freeing the samples there)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine, Iterator
from typing import Any

from ..executors import ThreadWorker
from .plan import next_chunk
from .reorder import Failed, collate_failed

__all__ = [
    "Entry",
    "GetitemsError",
    "Slots",
    "async_chunks",
    "collate_batch",
    "fetch_and_collate",
    "fetch_many",
    "finish",
    "parts_of",
    "read_batch",
    "sync_batches",
    "to_collate",
]


Entry = tuple[list[Failed], int, Any]  # a batch's failed samples, its sample count, the batch


class GetitemsError(TypeError):
    """A dataset's ``__getitems__`` did not return one sample per index: a bug in the dataset,
    not a sample that failed, so ``on_error="skip"`` does not leave it out."""


class Slots:
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


async def async_chunks(
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


def collate_batch(
    samples: list[Any], k: int, skip: bool, finish: Callable[[list[Any]], Any]
) -> Entry:
    """On a thread: a batch's entry (its failed samples, its sample count, and the collated
    batch of the good ones: None when a sample failed and errors raise, or when none is left;
    a ``Failed`` naming the batch when collate raised). ``samples`` is emptied here, so the
    samples are freed on this thread, not on the loop (64 small tensors: ~0.5 ms)."""
    good = to_collate(samples, skip)
    failures = [s for s in samples if isinstance(s, Failed)]
    n = len(samples)
    if good is None:
        batch = None
    else:
        try:
            batch = finish(good)
        except Exception as exc:
            batch = collate_failed(k, len(good), exc)
        good.clear()
    samples.clear()
    return failures, n, batch


def fetch_and_collate(
    source: Any,
    idxs: list[int],
    k: int,
    skip: bool,
    finish: Callable[[list[Any]], Any],
    head: list[Any],
    gather: tuple[Callable[[list[int]], Any], Callable[[Any], Any]] | None = None,
) -> Entry:
    """Decoding work: fetch (after ``head``, already fetched) and collate on one thread.
    ``head`` is emptied with the rest: its samples are freed here too. ``gather``: (a
    ``loader.gather.Gather``, the placing of a collated batch), for sources whose batch is one
    indexing per tensor; an index it cannot take is fetched one by one to name it."""
    if gather is not None and not head:
        take, place = gather
        try:
            batch = take(idxs)
        except Exception:
            pass  # fetched one by one below: the failing index is named as any other's
        else:
            return [], len(idxs), place(batch)
    head += fetch_many(source, idxs)
    return collate_batch(head, k, skip, finish)


def read_batch(
    it: Iterator[Any], n: int, finish: Callable[[list[Any]], Any], drop_last: bool
) -> tuple[int, Any]:
    """On the reader thread: the next ``n`` samples of ``it``, collated there by ``finish``
    (and freed there): ``(samples read, what finish returned, or the exception it raised;
    None when nothing was left, or a short last batch is dropped)``. A read that fails
    raises."""
    chunk = next_chunk(it, n)
    count = len(chunk)
    if not chunk or (count < n and drop_last):
        return count, None
    try:
        return count, finish(chunk)
    except Exception as exc:
        return count, exc
    finally:
        chunk.clear()


async def sync_batches(
    it: Iterator[Any],
    n: int,
    room: asyncio.Semaphore,
    reader: ThreadWorker,
    finish: Callable[[list[Any]], Any],
    drop_last: bool,
) -> AsyncGenerator[tuple[int, Any], None]:
    """``read_batch`` results in order, read on the one reader thread as ``room`` allows, with
    the next read queued behind the running one (so the thread does not wait for the loop
    between batches); ends after the first short or empty read."""
    queued: deque[asyncio.Future[Any]] = deque()
    try:
        while True:
            if not queued:
                await room.acquire()
                queued.append(reader.run(read_batch, (it, n, finish, drop_last)))
            if len(queued) < 2 and not room.locked():
                await room.acquire()  # a permit is there: no wait
                queued.append(reader.run(read_batch, (it, n, finish, drop_last)))
            count, made = await queued.popleft()
            if count:
                yield count, made
            if count < n:
                return
    finally:
        for fut in queued:
            fut.cancel()


def to_collate(samples: list[Any], skip: bool) -> list[Any] | None:
    """The samples a batch is collated from: the good ones; None when none is left, or when
    one failed and errors raise (``skip`` false)."""
    good = [s for s in samples if not isinstance(s, Failed)]
    if not good or (len(good) != len(samples) and not skip):
        return None
    return good


def fetch_many(source: Any, indices: list[int]) -> list[Any]:
    """``source[i]`` for each index, in one call on a fetch thread: the dataset's own
    ``__getitems__`` when it has one (as DataLoader uses it), else a loop. A failing index
    becomes a ``Failed`` naming it (a failing ``__getitems__`` is retried index by index to
    find which one failed); a ``__getitems__`` that returns other than one sample per index
    fails every index with a ``GetitemsError`` (its samples cannot be matched to indices)."""
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            got = getitems(indices)
        except Exception:
            return _one_by_one(source, indices)
        try:
            values = list(got)
        except Exception:
            values = None
        if values is not None and len(values) == len(indices):
            return values
        shown = f"{len(values)} samples" if values is not None else repr(type(got).__name__)
        err = GetitemsError(
            f"{type(source).__name__}.__getitems__ returned {shown} for {len(indices)} "
            f"indices (from {indices[0]}): it must return a list of one sample per index, "
            "in the order given (or drop __getitems__ to read index by index)"
        )
        return [Failed(i, err) for i in indices]
    return _one_by_one(source, indices)


def parts_of(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` cut into at most ``parts`` runs of (nearly) equal length, in order: one
    batch spread over that many fetch threads."""
    size = max(1, -(-len(indices) // max(1, parts)))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _one_by_one(source: Any, indices: list[int]) -> list[Any]:
    out: list[Any] = []
    for i in indices:
        try:
            out.append(source[i])
        except Exception as exc:
            out.append(Failed(i, exc))
    return out


async def finish(clean_up: Coroutine[Any, Any, None]) -> None:
    """Run ``clean_up`` to its end even when the task awaiting it is cancelled (then cancelled
    again, after): stopping threads and processes must not be cut short."""
    task = asyncio.ensure_future(clean_up)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError
