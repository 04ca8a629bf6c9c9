"""A sync dataset whose reads wait on I/O but compute between waits (a sync HTTP client's ~2 ms
of Python a read): its fetch threads keep one process's GIL busy, so ``worker_kind="auto"``
hands the epoch to worker processes that each spread their batches over threads of their own.
The same batches, errors and skips as the thread path, and no process left behind."""

import contextlib
import multiprocessing
import os
import threading
import time

import pytest

from asyncnn import AsyncLoader, LoaderError
from asyncnn.loader import batches as loader_batches
from asyncnn.loader import choice as loader_choice
from asyncnn.loader.choice import gil_bound, processes_unsuitable
from asyncnn.loader.flow import parts_of
from tests.test_loader_processes import Samples, batches, config, gone

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="worker tests fork"
)


class Remote(Samples):
    """Each read waits ``wait`` seconds (the network) and computes ``spin`` seconds holding
    the GIL (the client's Python); the client is opened on first use in each process, slowly
    (100 ms of computing, as ``httpx.Client()`` builds its SSL context), and not atomically:
    threads racing on a fresh process's first reads would each open one."""

    def __init__(self, n, wait=0.01, spin=0.002, fail=()):
        super().__init__(n, fail=fail, spin=spin)
        self.wait = wait
        self.clients: dict[int, int] = {}  # pid -> clients opened there

    def __getitem__(self, i):
        pid = os.getpid()
        if pid not in self.clients:
            end = time.perf_counter() + 0.1
            while time.perf_counter() < end:
                pass
            self.clients[pid] = self.clients.get(pid, 0) + 1
        time.sleep(self.wait)
        sample = super().__getitem__(i)
        return {**sample, "thread": threading.get_ident(), "clients": self.clients[pid]}


def test_gil_bound_when_the_threads_compute_a_core_between_them():
    # 32 threads, each read computing 2 ms and waiting 20: 64 ms of GIL wanted per 22 ms
    assert gil_bound(0.002, 0.020, 32)
    assert not gil_bound(0.0002, 0.020, 32)  # 0.2 ms a read: 32 threads want a third of it
    assert not gil_bound(0.002, 0.020, 8)
    assert gil_bound(0.002, 0.020, 11)  # 11 threads: just a whole core


def test_batches_that_wait_pay_for_workers_with_fewer_batches_per_core():
    ds, per_batch = Samples(100), 0.13  # a batch of 64 reads computing 2 ms each
    assert "too few" in processes_unsuitable(config(ds), 8, 2, per_batch)
    assert processes_unsuitable(config(ds), 8, 2, per_batch, per_core=1) is None
    assert "too few" in processes_unsuitable(config(ds), 2, 2, per_batch, per_core=1)


def test_parts_of_keeps_every_index_in_order():
    assert parts_of(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert parts_of(list(range(3)), 32) == [[0], [1], [2]]
    assert parts_of([], 4) == []


async def test_auto_spreads_waiting_reads_over_threads_in_worker_processes(monkeypatch):
    monkeypatch.setattr(loader_batches, "usable_cores", lambda: 2)
    monkeypatch.setattr(loader_choice, "MIN_EPOCH_SECONDS", 0.0)  # a short epoch, to be quick
    ds = Remote(160)
    loader = AsyncLoader(ds, batch_size=16)
    got = await batches(loader)
    assert [i for b in got for i in b["i"].tolist()] == list(range(160))
    assert loader.stats().process_epochs == 1
    workers = {int(p) for b in got[1:] for p in b["pid"]}
    assert os.getpid() not in workers and len(workers) == 2
    # The first look's 8 reads paid the parent's client (a warm-up, not the fetching): the
    # second look alone said the reads wait, and the batches were spread in the workers.
    for b in got[1:]:
        assert len(set(b["thread"].tolist())) > 1
    # Each worker's first read went alone: one client per worker, not one per thread.
    assert {int(c) for b in got[1:] for c in b["clients"]} == {1}


async def test_spread_workers_name_a_failing_sample_and_skip_it(monkeypatch):
    monkeypatch.setattr(loader_batches, "usable_cores", lambda: 2)
    monkeypatch.setattr(loader_choice, "MIN_EPOCH_SECONDS", 0.0)
    with pytest.raises(LoaderError) as err:
        await batches(AsyncLoader(Remote(160, fail={100}), batch_size=16))
    assert err.value.index == 100 and "sample 100" in str(err.value)
    cause = err.value.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "bad sample 100"
    assert any("in AsyncLoader worker process" in n for n in getattr(cause, "__notes__", []))

    loader = AsyncLoader(Remote(160, fail={40, 41, 150}), batch_size=16, on_error="skip")
    got = await batches(loader)
    assert [i for b in got for i in b["i"].tolist()] == [
        i for i in range(160) if i not in (40, 41, 150)
    ]
    assert loader.stats().skipped == 3 and loader.stats().process_epochs == 1
    assert not multiprocessing.active_children()


async def test_no_spread_worker_outlives_an_early_exit(monkeypatch):
    monkeypatch.setattr(loader_batches, "usable_cores", lambda: 2)
    monkeypatch.setattr(loader_choice, "MIN_EPOCH_SECONDS", 0.0)
    loader = AsyncLoader(Remote(320), batch_size=16)
    pids: set[int] = set()
    async with contextlib.aclosing(aiter(loader)) as it:
        async for b in it:
            pids |= {int(p) for p in b["pid"]} - {os.getpid()}
            if len(pids) == 2:
                break
    assert len(pids) == 2 and all(gone(p) for p in pids)
    assert not multiprocessing.active_children()
