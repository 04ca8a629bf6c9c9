"""Sync map-style datasets: a whole batch per thread call, through __getitems__ or a loop."""

import threading
import time
from typing import ClassVar

import pytest
import torch

from asyncnn import AsyncLoader, LoaderError


class Counting:
    """Counts thread calls into the dataset, per thread."""

    def __init__(self, n=64, fail=None, getitems=False, delay=0.0, work=0):
        self.n, self.fail, self.delay, self.work = n, fail, delay, work
        self.calls = 0
        self.batched_calls = 0
        self.threads: set[str] = set()
        self.running = self.most_at_once = 0
        self.lock = threading.Lock()
        if getitems:
            self.__getitems__ = self._getitems

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with self.lock:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        if self.delay:
            time.sleep(self.delay)
        sum(range(self.work))  # decoding: this thread computes, holding the GIL
        with self.lock:
            self.running -= 1
        if i == self.fail:
            raise ValueError(f"bad sample {i}")
        return torch.tensor([float(i)])

    def _getitems(self, idxs):
        self.batched_calls += 1
        return [self[i] for i in idxs]


async def collect(loader):
    return [b.flatten().tolist() async for b in loader]


async def test_getitems_is_called_once_per_batch_and_order_is_kept():
    ds = Counting(40, getitems=True)
    got = await collect(AsyncLoader(ds, batch_size=8, shuffle=False))
    assert got == [[float(i) for i in range(s, s + 8)] for s in range(0, 40, 8)]
    assert ds.batched_calls == 5 + 1  # one per batch; the first batch's first samples go alone


async def test_without_getitems_a_batch_is_one_thread_call_in_a_loop():
    ds = Counting(32)
    got = await collect(AsyncLoader(ds, batch_size=8, threads=1))
    assert [x for b in got for x in b] == [float(i) for i in range(32)]
    assert ds.calls == 32 and len(ds.threads) == 1


@pytest.mark.parametrize("getitems", [False, True])
async def test_a_failing_index_is_still_named(getitems):
    ds = Counting(32, fail=13, getitems=getitems)
    with pytest.raises(LoaderError, match="fetching sample 13 failed with ValueError"):
        await collect(AsyncLoader(ds, batch_size=8))
    skipped = AsyncLoader(Counting(32, fail=13, getitems=getitems), batch_size=8, on_error="skip")
    got = await collect(skipped)
    assert 13.0 not in [x for b in got for x in b] and skipped.stats().skipped == 1


class ShortGetitems(Counting):
    """A ``__getitems__`` that drops a sample: its samples cannot be matched to indices."""

    def _getitems(self, idxs):
        return [self[i] for i in idxs[:-1]]


class NoneGetitems(Counting):
    def _getitems(self, idxs):
        return None


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("dataset", [ShortGetitems, NoneGetitems])
async def test_a_getitems_that_breaks_its_contract_is_an_error_naming_it(dataset, on_error, kind):
    # Before, a __getitems__ returning the wrong count was silently replaced by reads index by
    # index (and DataLoader collates what it returns): a dataset bug, said as one, even with skip.
    loader = AsyncLoader(
        dataset(32, getitems=True), batch_size=8, on_error=on_error, worker_kind=kind, workers=1
    )
    with pytest.raises(LoaderError, match=rf"{dataset.__name__}.__getitems__ returned .* for 8 "):
        await collect(loader)


async def test_a_waiting_source_is_spread_over_threads_and_one_thread_stays_one():
    # Sleeping fetches compute nothing, on any machine load: the probe sees I/O and widens.
    # (Whether a decoding source stays on one thread depends on CPU time measured under load,
    # so it is measured in the bench, not asserted here.)
    waiting = Counting(64, delay=0.002)
    await collect(AsyncLoader(waiting, batch_size=16))
    assert waiting.most_at_once > 1
    pinned = Counting(64, delay=0.002)
    await collect(AsyncLoader(pinned, batch_size=16, threads=1))
    assert pinned.most_at_once == 1


class Sample:
    """A sample that records the thread it is freed on."""

    freed_on: ClassVar[list[str]] = []

    def __init__(self, i):
        self.i = i

    def __del__(self):
        Sample.freed_on.append(threading.current_thread().name)


class Objects(Counting):
    def __getitem__(self, i):
        super().__getitem__(i)
        return Sample(i)


def values(samples):
    return torch.tensor([s.i for s in samples])


@pytest.mark.parametrize("threads", [1, 4])
async def test_samples_are_freed_on_the_thread_that_collated_them_not_on_the_loop(threads):
    # 64 small tensors take ~0.5 ms to free: on the loop that is time the decoding thread
    # waits for the GIL, every batch.
    Sample.freed_on.clear()
    ds = Objects(64, getitems=True, delay=0.001)
    loader = AsyncLoader(ds, batch_size=16, collate=values, threads=threads)
    got = [b.tolist() async for b in loader]
    assert got == [list(range(s, s + 16)) for s in range(0, 64, 16)]
    assert len(Sample.freed_on) == 64
    assert threading.current_thread().name not in Sample.freed_on, Sample.freed_on


async def test_decoding_stays_on_one_thread_at_a_time_with_the_next_batch_queued_behind():
    ds = Counting(96, getitems=True)
    got = await collect(AsyncLoader(ds, batch_size=8, threads=1))
    assert [x for b in got for x in b] == [float(i) for i in range(96)]
    assert ds.most_at_once == 1 and len(ds.threads) == 1


async def test_a_sync_iterable_is_read_and_collated_on_its_reader_thread_and_freed_there():
    Sample.freed_on.clear()
    loader = AsyncLoader((Sample(i) for i in range(50)), batch_size=16, collate=values)
    got = [b.tolist() async for b in loader]
    assert got == [list(range(s, min(s + 16, 50))) for s in range(0, 50, 16)]
    assert len(Sample.freed_on) == 50
    assert threading.current_thread().name not in Sample.freed_on, Sample.freed_on
    short = AsyncLoader(iter(range(50)), batch_size=16, drop_last=True)
    assert [len(b) async for b in short] == [16, 16, 16]

    # one thread reads and collates (no second thread taking turns with it for the GIL)
    readers, collators = set(), set()

    def read():
        for i in range(50):
            readers.add(threading.current_thread().name)
            yield i

    def collate(samples):
        collators.add(threading.current_thread().name)
        return torch.tensor(samples)

    got = [b.tolist() async for b in AsyncLoader(read(), batch_size=16, collate=collate)]
    assert [x for b in got for x in b] == list(range(50))
    assert len(readers) == 1 and collators == readers


async def test_a_sync_iterable_batch_that_does_not_collate_is_named():
    def collate(samples):
        if samples[0] == 16:
            raise ValueError("ragged")
        return torch.tensor(samples)

    loader = AsyncLoader(iter(range(50)), batch_size=16, collate=collate)
    with pytest.raises(LoaderError, match="batch 1") as info:
        [b async for b in loader]
    assert isinstance(info.value.__cause__, ValueError)
