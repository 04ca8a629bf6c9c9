"""The bench's LoopWatch: it counts the collector's passes on its thread's run and their length,
the thread's CPU time, and (on Linux) the kernel's preemptions, and leaves nothing behind."""

import gc
import sys
import time

import pytest

from asyncnn.bench.loopwatch import LoopWatch


def test_counts_collector_passes_and_cpu():
    callbacks = list(gc.callbacks)
    with LoopWatch() as watch:
        gc.collect()
        gc.collect()
        end = time.thread_time() + 0.02
        while time.thread_time() < end:  # 20 ms of this thread's CPU
            pass
    assert gc.callbacks == callbacks  # unhooked
    assert watch.gc_passes == 2
    assert 0.0 < watch.gc_longest <= watch.gc_total <= watch.seconds
    assert 0.02 <= watch.cpu <= watch.seconds + 0.01
    assert "collector 2 passes" in watch.describe()


def test_outside_the_block_nothing_counts():
    watch = LoopWatch()
    with watch:
        pass
    gc.collect()
    assert watch.gc_passes == 0 and watch.gc_total == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RUSAGE_THREAD is Linux's")
def test_preemptions_are_counted_on_linux():
    with LoopWatch() as watch:
        time.sleep(0.001)
    assert watch.preempted is not None and watch.preempted >= 0
    assert "preempted" in watch.describe()


def test_unhooked_when_the_block_raises():
    callbacks = list(gc.callbacks)
    with pytest.raises(RuntimeError), LoopWatch():
        raise RuntimeError("boom")
    assert gc.callbacks == callbacks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_the_share_of_cpu_stolen_by_the_hypervisor_is_read_on_linux(monkeypatch):
    from asyncnn.bench import loopwatch

    ticks = iter([(100, 10_000), (130, 10_200)])  # 30 of 200 ticks stolen meanwhile
    monkeypatch.setattr(loopwatch, "_cpu_ticks", lambda: next(ticks))
    with LoopWatch() as watch:
        pass
    assert watch.stolen == pytest.approx(0.15)
    assert "15% of the CPU stolen" in watch.describe()
    monkeypatch.undo()
    with LoopWatch() as real:  # the real /proc/stat: a share, whatever this machine's is
        time.sleep(0.02)
    assert real.stolen is None or 0.0 <= real.stolen <= 1.0
