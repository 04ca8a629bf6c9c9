"""Predictive admission, sync: refuse exactly when the work ahead cannot finish in time."""

import asyncio

import pytest

from asyncnn.batching import Request
from asyncnn.runtime.admission import WINDOW, Admission
from asyncnn.runtime.ledger import Ledger


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
