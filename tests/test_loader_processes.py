"""Worker processes for sync map-style datasets: the same batches, errors and skips as the
thread path, shared-memory tensors intact, and no process left behind however an epoch ends."""

import asyncio
import contextlib
import functools
import multiprocessing
import operator
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest
import torch

from asyncnn import AsyncLoader, LoaderError
from asyncnn.loader import batches as loader_batches
from asyncnn.loader import choice as loader_choice
from asyncnn.loader import probe as loader_probe
from asyncnn.loader.choice import pickles, processes_unsuitable
from asyncnn.loader.config import LoaderConfig

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="worker tests fork"
)


class Samples:
    """Sample ``i`` is a dict of tensors of several dtypes, and the pid that made it."""

    def __init__(self, n=40, fail=(), spin=0.0, kill_at=None):
        self.n, self.fail, self.spin, self.kill_at = n, set(fail), spin, kill_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.spin:  # decoding: computes, holding the GIL
            end = time.perf_counter() + self.spin
            while time.perf_counter() < end:
                pass
        if i in self.fail:
            raise ValueError(f"bad sample {i}")
        if i == self.kill_at and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        info = torch.utils.data.get_worker_info()
        return {
            "x": torch.full((3, 5), float(i)),
            "i": torch.tensor(i, dtype=torch.int64),
            "half": torch.full((2,), float(i), dtype=torch.float16),
            "pid": os.getpid(),
            "worker": -1 if info is None else info.id,
        }


async def batches(loader):
    return [b async for b in loader]


def gone(pid: int) -> bool:
    """Ended and reaped (or at least ended: a zombie whose parent is gone)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or while, it was read
        return True
    return "\nState:\tZ" in state


async def test_processes_give_the_thread_path_batches_in_order():
    ds = Samples(50)
    threads = await batches(AsyncLoader(ds, batch_size=8, worker_kind="thread"))
    procs = await batches(AsyncLoader(ds, batch_size=8, worker_kind="process", workers=2))
    assert len(procs) == len(threads) == 7
    for t, p in zip(threads, procs, strict=True):
        for key in ("x", "i", "half"):
            assert p[key].dtype == t[key].dtype and torch.equal(p[key], t[key])
    parent = os.getpid()
    assert {int(pid) for b in procs for pid in b["pid"]}.isdisjoint({parent})
    # Batch k is worker k % 2's, and get_worker_info() answers in the dataset.
    assert [set(b["worker"].tolist()) for b in procs] == [{k % 2} for k in range(7)]


async def test_processes_follow_shuffle_sampler_drop_last_and_unordered():
    ds = Samples(30)
    kw = dict(batch_size=4, shuffle=True, drop_last=True)
    one = await batches(AsyncLoader(ds, generator=torch.Generator().manual_seed(3), **kw))
    two = await batches(
        AsyncLoader(ds, generator=torch.Generator().manual_seed(3), worker_kind="process", **kw)
    )
    assert [b["i"].tolist() for b in one] == [b["i"].tolist() for b in two]
    assert len(two) == 7  # 30 // 4: the last short batch dropped
    loose = await batches(
        AsyncLoader(ds, batch_size=4, ordered=False, worker_kind="process", workers=3)
    )
    assert sorted(i for b in loose for i in b["i"].tolist()) == list(range(30))


async def test_large_shared_memory_tensors_arrive_intact():
    class Big:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.randn(256, 1024, generator=g)  # 1 MiB a sample

    got = await batches(AsyncLoader(Big(), batch_size=3, worker_kind="process", workers=2))
    want = [torch.stack([Big()[i] for i in range(s, s + 3)]) for s in (0, 3)]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


async def test_a_failing_sample_is_named_with_its_cause_and_worker_traceback():
    loader = AsyncLoader(Samples(40, fail={13}), batch_size=8, worker_kind="process")
    with pytest.raises(LoaderError) as err:
        await batches(loader)
    assert err.value.index == 13 and "sample 13" in str(err.value)
    cause = err.value.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "bad sample 13"
    assert any("in AsyncLoader worker process" in n for n in getattr(cause, "__notes__", []))


async def test_skip_leaves_failing_samples_out_and_counts_them():
    loader = AsyncLoader(
        Samples(24, fail={2, 9, 10}), batch_size=8, worker_kind="process", on_error="skip"
    )
    got = await batches(loader)
    assert [i for b in got for i in b["i"].tolist()] == [
        i for i in range(24) if i not in (2, 9, 10)
    ]
    assert loader.stats().skipped == 3 and loader.stats().samples == 21


class Unsendable:
    pass


def unsendable_collate(samples):
    return {"rows": len(samples), "thing": Unsendable, "lock": __import__("threading").Lock()}


async def test_a_batch_that_does_not_pickle_is_named_not_lost():
    loader = AsyncLoader(
        Samples(16), batch_size=8, worker_kind="process", collate=unsendable_collate
    )
    with pytest.raises(LoaderError, match="batch 0") as err:
        await batches(loader)
    assert "does not pickle" in str(err.value.__cause__)


def failing_init(worker):
    raise OSError(f"no shard for worker {worker}")


async def test_a_failing_worker_init_fn_is_named():
    loader = AsyncLoader(
        Samples(16), batch_size=4, worker_kind="process", worker_init_fn=failing_init
    )
    with pytest.raises(LoaderError, match=r"worker_init_fn\(\d\) raised OSError"):
        await batches(loader)


async def test_a_killed_worker_is_reported_with_its_signal():
    loader = AsyncLoader(Samples(64, kill_at=20), batch_size=4, worker_kind="process", workers=2)
    with pytest.raises(LoaderError, match=r"worker process \d \(pid \d+\) was killed by SIGKILL"):
        await batches(loader)
    assert not multiprocessing.active_children()


async def worker_pids(loader, stop_after: int) -> set[int]:
    pids: set[int] = set()
    async for b in loader:
        pids |= {int(p) for p in b["pid"]}
        if len(pids) >= stop_after:
            break
    return pids


async def test_no_worker_outlives_an_early_exit():
    loader = AsyncLoader(Samples(400), batch_size=4, worker_kind="process", workers=2)
    async with contextlib.aclosing(aiter(loader)) as it:
        pids: set[int] = set()
        async for b in it:
            pids |= {int(p) for p in b["pid"]}
            if len(pids) == 2:
                break
    assert len(pids) == 2 and all(gone(p) for p in pids)
    assert not multiprocessing.active_children()


async def all_gone(pids: set[int]) -> None:
    """An abandoned ``async for`` closes its epoch (and so its workers) on the loop's next
    turns, not at once: give it a few."""
    with anyio.fail_after(10):
        # No event says that a process ended: poll.
        while not all(gone(p) for p in pids) or multiprocessing.active_children():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_no_worker_outlives_a_cancelled_or_failing_consumer():
    seen: set[int] = set()
    # Cancelled while it consumes (after a few batches, however long the workers took to
    # start on a loaded machine), with the loader's epoch open.
    with anyio.fail_after(30), anyio.CancelScope() as scope:
        async for b in AsyncLoader(Samples(400), batch_size=4, worker_kind="process"):
            seen.update(int(p) for p in b["pid"])
            if len(seen) > 1 or b["i"][0] >= 12:
                scope.cancel()
            await asyncio.sleep(0.01)
    assert scope.cancelled_caught and seen
    await all_gone(seen)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async for b in AsyncLoader(Samples(400), batch_size=4, worker_kind="process"):
            seen.update(int(p) for p in b["pid"])
            raise Boom
    await all_gone(seen)
    assert not multiprocessing.active_children()


class Rows:
    """Sample ``i``: a row of 1,024 float32 (batches of 64: 256 KiB, sent through the pipe and
    past its buffer), decoded in ~1 ms (a batch in ~64 ms: workers are mid-batch most of the
    time)."""

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        return torch.full((1_024,), float(i))


async def test_an_early_exit_stops_workers_that_hold_unread_batches(monkeypatch):
    """Workers with batches in hand that nobody will read (larger than a pipe's buffer) stop
    when asked, leaving the jobs queued behind: none has to be terminated. (They once blocked
    writing to a pipe the parent no longer read, so every early exit and Ctrl-C waited 5 s a
    worker before terminating them.)"""
    from multiprocessing.process import BaseProcess

    terminated: list[int | None] = []
    terminate = BaseProcess.terminate
    monkeypatch.setattr(
        BaseProcess, "terminate", lambda p: (terminated.append(p.pid), terminate(p))[-1]
    )
    ended = asyncio.Event()
    close = loader_batches.ProcessPool.close
    workers: set[int | None] = set()

    def closing(pool):
        workers.update(p.pid for p in pool._procs)  # this pool's, not an earlier test's
        try:
            close(pool)
        finally:  # on the thread that closes the pool
            loop.call_soon_threadsafe(ended.set)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loader_batches.ProcessPool, "close", closing)
    loader = AsyncLoader(Rows(), batch_size=64, worker_kind="process", workers=2, prefetch=4)
    async with contextlib.aclosing(aiter(loader)) as it:
        async for b in it:
            assert b.shape == (64, 1_024)
            break  # both workers are decoding a batch that nobody will read
    with anyio.fail_after(60):
        await ended.wait()
    assert len(workers) == 2 and not workers & set(terminated)
    assert not multiprocessing.active_children()


async def script_with_workers(tmp_path, loop_body, **popen):
    """Start a script whose ``main()`` runs ``loop_body`` (an ``async for b in AsyncLoader(...)``
    that prints its workers' pids for each batch) and return it once two workers have shown."""
    script = tmp_path / "train.py"
    script.write_text(
        "import asyncio, multiprocessing, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from tests.test_loader_processes import Rows, Samples\n"
        "from asyncnn import AsyncLoader\n\n"
        "async def main():\n"
        + textwrap.indent(textwrap.dedent(loop_body), "    ")
        + "\nasyncio.run(main())\n"
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 (starting it does not wait)
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, **popen
    )
    assert proc.stdout is not None
    pids: set[int] = set()
    while len(pids) < 2:
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        assert line, "the script ended early"
        pids |= {int(p) for p in line.split()}
    return proc, pids


@pytest.mark.hang_guard(90)
async def test_ctrl_c_ends_a_script_with_process_workers_and_leaves_none(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole process group, workers included. The script
    ends with KeyboardInterrupt and no worker is left."""
    proc, workers = await script_with_workers(
        tmp_path,
        """
        while True:
            async for b in AsyncLoader(Rows(), batch_size=64, worker_kind="process", workers=2):
                print(*[p.pid for p in multiprocessing.active_children()], flush=True)
                await asyncio.sleep(0.05)
        """,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a process group of its own, as a terminal's job
        # A shell that runs this suite in the background ignores SIGINT in its children.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.killpg(proc.pid, signal.SIGINT)
    _, err = await anyio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in err, err[-2000:]
    assert all(gone(p) for p in workers)


@pytest.mark.hang_guard(60)
async def test_workers_exit_when_their_parent_is_killed(tmp_path):
    parent, pids = await script_with_workers(
        tmp_path,
        """
        async for b in AsyncLoader(Samples(10_000, spin=0.001), batch_size=4,
                                   worker_kind="process", workers=2):
            print(*sorted(set(int(p) for p in b["pid"])), flush=True)
            await asyncio.sleep(0.05)
        """,
    )
    parent.kill()
    parent.wait()
    assert parent.stdout is not None
    parent.stdout.close()
    await all_gone(pids)


def test_bad_settings_say_what_to_do_instead():
    async def fetch(i):
        return i

    with pytest.raises(ValueError, match="sync map-style dataset"):
        AsyncLoader(Samples(4), fetch=fetch, worker_kind="process")
    with pytest.raises(ValueError, match="pass workers= only"):
        AsyncLoader(Samples(4), threads=2, workers=2)
    with pytest.raises(ValueError, match="not a start method"):
        AsyncLoader(Samples(4), worker_kind="process", multiprocessing_context="teleport")
    with pytest.raises(ValueError, match="worker_init_fn runs in worker processes"):
        AsyncLoader(Samples(4), worker_kind="thread", worker_init_fn=failing_init)
    with pytest.raises(ValueError, match="worker_init_fn runs in worker processes"):
        AsyncLoader(Samples(4), threads=2, worker_init_fn=failing_init)  # never runs
    with pytest.raises(ValueError, match="worker_kind='fiber'"):
        AsyncLoader(Samples(4), worker_kind="fiber")  # type: ignore[arg-type]


# -- worker_kind="auto" ---------------------------------------------------------------------


def config(source, **kw) -> LoaderConfig:
    return AsyncLoader(source, batch_size=8, **kw)._config()


class Handle:
    def __init__(self):
        self.lock = __import__("threading").Lock()  # stands for an open file, a connection

    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.tensor(i)


def test_auto_says_why_it_keeps_threads():
    ds, ms = Samples(100), 0.005
    assert processes_unsuitable(config(ds), 100, 2, ms) is None
    assert "too little" in processes_unsuitable(config(ds), 100, 2, 0.0001)
    assert "one core" in processes_unsuitable(config(ds), 100, 1, ms)
    assert "too few" in processes_unsuitable(config(ds), 5, 2, ms)
    assert "0.20 s on a thread" in processes_unsuitable(config(ds), 41, 2, ms)
    assert processes_unsuitable(config(ds), 1000, 2, 0.0006) is None  # 0.6 ms a batch pays
    assert "cannot be forked" in processes_unsuitable(
        config(ds, multiprocessing_context="spawn"), 100, 2, ms
    )
    assert "does not pickle" in processes_unsuitable(config(Handle()), 100, 2, ms)
    assert pickles(torch.zeros(1000)) and not pickles(Handle())


class Table:
    def __init__(self):
        self.buffer = pickle.PickleBuffer(bytearray(1 << 20))


def test_code_in_a_dataset_is_no_handle():
    # A lambda transform or a class defined in a function does not pickle, but a forked
    # worker inherits it: auto kept threads for such datasets, "holding a handle".
    class Local(Samples):
        pass

    ds = Local(8)
    ds.transform = lambda x: x * 2
    ds.scale = functools.partial(operator.mul, 2)
    assert pickles(ds)
    # ... but what code holds is state: a handle in a closure, or a method bound to it
    lock = Handle()
    ds.transform = lambda x: (lock, x)
    assert not pickles(ds)
    ds.transform = lock.lock.acquire
    assert not pickles(ds)
    ds.transform = lambda x: x * 2
    ds.lock = Handle()
    assert not pickles(ds)


def test_a_dataset_whose_pickle_writes_large_buffers_as_they_are_pickles():
    # Protocol 5 hands a large buffer to the file's write() as a PickleBuffer (pyarrow's
    # tables: a Hugging Face dataset), which has no len(): it was judged not to pickle, and
    # auto never chose processes for it.
    assert pickles(Table())


async def test_auto_hands_costly_decoding_to_processes(monkeypatch):
    monkeypatch.setattr(loader_batches, "usable_cores", lambda: 2)
    monkeypatch.setattr(loader_choice, "MIN_EPOCH_SECONDS", 0.0)  # a short epoch, to be quick
    # The spin holds a core for 0.5 ms of wall time; on a shared VM the hypervisor may take
    # the core for part of it (steal time, which Linux's schedstat does not show), so the
    # measured share of computing can fall below the production threshold. Any share above a
    # tenth is computing for this test: what it checks is the hand-off itself.
    monkeypatch.setattr(loader_probe, "IO_BOUND", 0.1)
    loader = AsyncLoader(Samples(160, spin=0.0005), batch_size=8)  # 4 ms a batch: decoding
    got = await batches(loader)
    assert [i for b in got for i in b["i"].tolist()] == list(range(160))
    pids = {int(p) for b in got[1:] for p in b["pid"]}
    assert os.getpid() not in pids and len(pids) == 2
    assert {int(p) for p in got[0]["pid"]} == {os.getpid()}  # the measured batch: a thread's
    assert loader.stats().process_epochs == 1


class LazyHandle(Samples):
    """Opens its handle on first use, as DataLoader's docs advise for HDF5 or LMDB."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.handle = None

    def __getitem__(self, i):
        if self.handle is None:
            self.handle = Handle()  # does not pickle, and must not be shared with a fork
            self.handle.pid = os.getpid()
        return {**super().__getitem__(i), "opener": self.handle.pid}


async def test_auto_gives_workers_the_dataset_as_it_was_before_the_probe_opened_its_handle(
    monkeypatch,
):
    # The probe's first samples open the handle in the parent's dataset, which then no longer
    # pickles: auto kept threads for the very pattern that lets worker processes open their
    # own. Now the workers get the dataset as it was before it fetched, in every epoch.
    monkeypatch.setattr(loader_batches, "usable_cores", lambda: 2)
    monkeypatch.setattr(loader_choice, "MIN_EPOCH_SECONDS", 0.0)  # a short epoch, to be quick
    monkeypatch.setattr(loader_probe, "IO_BOUND", 0.1)  # as above: computing, on any VM
    ds = LazyHandle(160, spin=0.0005)
    loader = AsyncLoader(ds, batch_size=8)
    for epoch in (1, 2):
        got = await batches(loader)
        assert [i for b in got for i in b["i"].tolist()] == list(range(160))
        assert loader.stats().process_epochs == epoch
        made = {
            (int(p), int(o)) for b in got[1:] for p, o in zip(b["pid"], b["opener"], strict=True)
        }
        assert all(p == o != os.getpid() for p, o in made)  # each worker opened its own
    assert ds.handle is not None and ds.handle.pid == os.getpid()  # the probe's, in the parent


async def test_threads_means_thread_workers_even_for_costly_decoding(monkeypatch):
    monkeypatch.setattr(loader_batches, "usable_cores", lambda: 2)
    monkeypatch.setattr(loader_probe, "IO_BOUND", 0.1)
    loader = AsyncLoader(Samples(160, spin=0.0005), batch_size=8, threads=2)
    got = await batches(loader)
    assert {int(p) for b in got for p in b["pid"]} == {os.getpid()}
    assert loader.stats().process_epochs == 0 and loader.worker_kind == "thread"


async def test_auto_keeps_cheap_or_unpicklable_datasets_on_threads(monkeypatch):
    monkeypatch.setattr(loader_batches, "usable_cores", lambda: 2)
    cheap = AsyncLoader(Samples(160), batch_size=8)
    got = await batches(cheap)
    assert {int(p) for b in got for p in b["pid"]} == {os.getpid()}
    assert cheap.stats().process_epochs == 0

    class SlowHandle(Handle):
        def __getitem__(self, i):
            time.sleep(0)
            end = time.perf_counter() + 0.0005
            while time.perf_counter() < end:
                pass
            return torch.tensor(i)

    held = AsyncLoader(SlowHandle(), batch_size=8)
    assert len(await batches(held)) == 13
    assert held.stats().process_epochs == 0
