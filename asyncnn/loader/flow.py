"""Flow control for an epoch: sample slots, and sources read in chunks as room allows."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Coroutine, Iterator
from typing import Any

from ..executors import ThreadWorker
from .plan import next_chunk
from .reorder import Failed

__all__ = [
    "GetitemsError",
    "Slots",
    "async_chunks",
    "fetch_many",
    "finish",
    "sync_chunks",
    "to_collate",
]


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


async def sync_chunks(
    it: Iterator[Any], n: int, room: asyncio.Semaphore, reader: ThreadWorker
) -> AsyncGenerator[list[Any], None]:
    """Lists of ``n`` samples read on the reader thread; each read begins once ``room`` allows."""
    while True:
        await room.acquire()
        chunk = await reader.run(next_chunk, (it, n))
        if not chunk:
            return
        yield chunk


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
