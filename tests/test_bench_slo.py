"""The slo workload's open-loop client: every scheduled arrival is sent and counted once, and
callers that ended are not kept (they were the garbage that stalled the loop)."""

import asyncio
import gc
import weakref

import pytest
import torch

from asyncnn import Batching, Pipeline, Stage
from asyncnn.bench.workloads_slo import _open_loop, _schedule

pytestmark = pytest.mark.hang_guard(30)


async def test_the_open_loop_client_counts_every_arrival_once():
    rows = [torch.full((1, 4), float(i)) for i in range(8)]
    plan = _schedule(2_000.0, 0.2, seed=3)
    pipe = Pipeline([Stage(lambda x: x * 2, batch=Batching(max_size=16, max_delay=0.001))])
    async with pipe:
        tally = await _open_loop(pipe, rows, plan, tight=1.0, loose=2.0, seconds=0.2)
    urgent = sum(u for _, u in plan)
    assert tally.offered == {"urgent": urgent, "normal": len(plan) - urgent}
    assert tally.in_time == tally.offered  # generous deadlines, light load: every one in time
    assert tally.missed == tally.shed == 0
    assert len(tally.latencies["urgent"]) == urgent
    assert tally.loop.seconds >= 0.2 and tally.loop.cpu > 0.0  # the loop watched over the run


async def test_the_open_loop_client_lets_ended_callers_go():
    rows = [torch.ones(1, 4)]
    plan = [(0.003 * i, False) for i in range(40)]
    callers: list[weakref.ref[asyncio.Task[None]]] = []
    kept: list[int] = []
    loop = asyncio.get_running_loop()

    def watched(coro):  # the client's create_task: each caller watched by a weak reference
        task = type(loop).create_task(loop, coro)
        callers.append(weakref.ref(task))
        if len(callers) == len(plan):  # the last arrival: the early callers ended long ago
            gc.collect()
            kept.append(sum(r() is not None for r in callers[:20]))
        return task

    pipe = Pipeline([Stage(lambda x: x, batch=Batching(max_size=8, max_delay=0.001))])
    async with pipe:
        loop.create_task = watched  # type: ignore[method-assign]
        try:
            tally = await _open_loop(pipe, rows, plan, tight=1.0, loose=2.0, seconds=0.12)
        finally:
            del loop.create_task
    assert tally.in_time["normal"] == len(plan)
    assert kept == [0]  # nothing held the first 20 callers once they had ended


def test_started_tunes_the_collector_and_puts_it_back():
    from asyncnn.bench.workloads_slo import _started
    from asyncnn.collector import LATENCY_THRESHOLDS

    before = gc.get_threshold()
    with _started():
        assert gc.get_threshold() == LATENCY_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what existed is out of the collector's reach
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cpu_timed_counts_full_calls_only_and_starts_afresh():
    from asyncnn.bench.workloads_slo import MAX_SIZE, _CpuTimed

    model = _CpuTimed(torch.nn.Linear(4, 4))
    assert model.take() == (0.0, 0.0)  # no full call yet
    model(torch.ones(3, 4))  # a partial batch: not a full call's cost
    assert model.take() == (0.0, 0.0)
    for _ in range(3):
        model(torch.ones(MAX_SIZE, 4))
    p50, p90 = model.take()
    assert 0.0 < p50 <= p90  # the thread's CPU seconds of a full batch
    assert model.take() == (0.0, 0.0)  # taken: the next run starts afresh


def test_the_note_compares_a_full_calls_cpu_time_with_the_closed_loop():
    from asyncnn.bench.workloads_slo import Tally, _note

    light = Tally(seconds=1.0)  # every call smaller than a full batch: nothing to compare
    assert _note([light]).endswith("no full batch")
    loaded = Tally(seconds=1.0, cpu=0.018, cpu_p90=0.024, calibrated_cpu=0.012)
    assert "CPU time p50/p90 18.0/24.0 ms, 1.50x the closed loop's p50" in _note([loaded])
