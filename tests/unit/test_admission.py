"""Predictive admission, sync: refuse exactly when the work ahead cannot finish in time."""

import asyncio

import pytest

from asyncnn.batching import Request
from asyncnn.runtime.admission import MOST, ROOM, WINDOW, Admission
from asyncnn.runtime.ledger import Ledger
from asyncnn.runtime.probe import StageProbe


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def admit(ledger, loop, rid, priority=0):
    r = Request(rid, loop.create_future(), None, None, priority, 0.0)
    ledger.admit(r)
    return r


def busy(loop, rate=1000.0):
    """An admission whose ledger has measured ``rate`` requests/s ending."""
    ledger = Ledger()
    adm = Admission(100, ledger, lambda: 0.002)
    reqs = [admit(ledger, loop, i) for i in range(60)]
    assert adm.check(0.0, 0, None) is None  # the first sample
    for r in reqs[: int(rate * WINDOW)]:
        ledger.complete(r, None)
    assert adm.check(WINDOW, 0, None) is None
    assert adm.rate == pytest.approx(rate)
    return ledger, adm


def test_refuses_exactly_when_the_work_ahead_cannot_finish_by_the_deadline(loop):
    ledger, adm = busy(loop)
    ahead = len(ledger)  # 10 in flight, 1000/s end: ~10 ms, plus 2 ms of service
    finish = WINDOW + ahead / 1000.0 + 0.002
    assert adm.check(WINDOW, 0, finish + 1e-6) is None
    refusal = adm.check(WINDOW, 0, finish - 0.003)
    assert refusal is not None
    why, retry_after = refusal
    assert retry_after == pytest.approx(0.003) and f"behind {ahead} requests" in why
    assert adm.refused == 1


def test_only_work_at_least_as_urgent_counts_ahead(loop):
    ledger, adm = busy(loop)
    for i in range(100, 130):
        admit(ledger, loop, i, priority=5)  # less urgent work piles up
    assert len(ledger) == 40
    tight = WINDOW + 10 / 1000.0 + 0.002 + 1e-6  # enough behind the 10 of priority <= 0
    assert adm.check(WINDOW, 0, tight) is None
    assert adm.check(WINDOW, 5, tight) is not None


def test_the_limit_refuses_with_a_retry_after(loop):
    ledger = Ledger()
    adm = Admission(3, ledger, lambda: 0.0)
    for i in range(3):
        admit(ledger, loop, i)
    why, retry_after = adm.check(0.0, 0, None)
    assert "max_in_flight=3" in why and retry_after > 0


def test_nothing_measured_admits(loop):
    ledger = Ledger()
    adm = Admission(100, ledger, lambda: 0.0)
    admit(ledger, loop, 0)
    assert adm.check(0.0, 0, 0.0001) is None  # no rate yet: no prediction


def measured(loop, ended, stage_busy):
    """An admission over one window of ``WINDOW`` in which ``ended`` requests ended and each
    stage's workers spent ``stage_busy[i]`` seconds (per worker) inside calls."""
    ledger = Ledger()
    clock = [[0.0] * len(stage_busy)]
    adm = Admission(100, ledger, lambda: 0.002, lambda: clock[0])
    reqs = [admit(ledger, loop, i) for i in range(ended + 4)]
    assert adm.check(0.0, 0, None) is None
    for r in reqs[:ended]:
        ledger.complete(r, None)
    clock[0] = list(stage_busy)
    assert adm.check(WINDOW, 0, None) is None
    return ledger, adm


def test_a_window_with_room_counts_the_rate_the_stages_could_serve(loop):
    # Four requests in flight and 9 ended in 50 ms (180/s), but the busiest stage was inside
    # calls 5% of the time: it had room, and serves at least ROOM / 5% = 10x that rate
    # (unscaled, ~22 ms predicted behind 4 requests that one short call serves).
    ledger, adm = measured(loop, 9, [0.001, 0.05 * WINDOW])
    assert adm.rate == pytest.approx(180.0 * ROOM / 0.05)
    assert len(ledger) == 4
    assert adm.check(WINDOW, 0, WINDOW + 0.010) is None  # ~1 ms behind 4, plus 2 ms
    # The same window with its stage busy half the time or more: the rate stands as measured.
    ledger, adm = measured(loop, 9, [ROOM * WINDOW, 0.0])
    assert adm.rate == pytest.approx(180.0)
    assert adm.check(WINDOW, 0, WINDOW + 0.010) is not None  # 22 ms behind 4 at 180/s


def test_room_is_not_guessed_without_timed_calls_and_is_bounded(loop):
    _, adm = measured(loop, 9, [0.0, 0.0])  # no call timed in the window: nothing to judge by
    assert adm.rate == pytest.approx(180.0)
    _, adm = measured(loop, 9, [1e-9])  # a sliver of use: scaled at most MOST times
    assert adm.rate == pytest.approx(180.0 * MOST)


def test_a_stage_inside_a_long_call_is_not_judged_idle(loop):
    # A window shorter than a stage's calls (a transformer's batch) in which only a short call
    # ended: counted when calls end, the stage looked idle (5%) while its one worker was
    # inside a call the whole window; the running call counts up to the window's end.
    probe = StageProbe("model")  # two workers: one ends a short call, one is in a long one
    probe.batches += 2  # (a batching stage counts a batch when it starts)
    probe.begin(9.99)
    probe.begin(10.0)
    ledger = Ledger()
    now = [10.0]
    adm = Admission(100, ledger, lambda: 0.002, lambda: [probe.spent(now[0]) / 2])
    reqs = [admit(ledger, loop, i) for i in range(13)]
    assert adm.check(0.0, 0, None) is None
    for r in reqs[:9]:
        ledger.complete(r, None)
    probe.end(9.99)
    probe.timed_call(0.05 * WINDOW + 0.01, 9)  # the short call ended in the window
    now[0] = 10.0 + WINDOW
    assert adm.check(WINDOW, 0, None) is None
    assert adm.rate == pytest.approx(180.0)  # busy over half the window: as measured
    assert probe.spent(now[0]) == pytest.approx(0.05 * WINDOW + 0.01 + WINDOW)
