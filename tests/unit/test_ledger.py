"""The ledger, without an event loop: every request ends once, and the counts add up."""

import itertools

import pytest

from asyncnn.errors import PipelineClosed, StageError
from asyncnn.runtime.joins import PartTable
from asyncnn.runtime.ledger import Ledger
from tests.fakes import envelope, request


def balanced(ledger: Ledger) -> bool:
    k = ledger.counters
    return k.admitted == k.completed + k.failed + k.cancelled + len(ledger)


def test_complete_ends_once_and_counts():
    led, r = Ledger(), request(1)
    led.admit(r)
    assert led.complete(r, "y") and r.future.result() == "y"
    assert not led.complete(r, "again") and not led.fail(r, ValueError())
    assert led.counters.completed == 1 and len(led) == 0 and balanced(led)


def test_a_failed_request_stays_failed():
    led, r = Ledger(), request(1)
    led.admit(r)
    led.fail_stage("model", [r], ValueError("bad row"))
    assert not led.complete(r, "late result")
    err = r.future.exception()
    assert isinstance(err, StageError) and err.stage == "model"
    assert "stage 'model' raised ValueError: bad row" in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert led.counters.failed == 1 and led.counters.completed == 0 and balanced(led)


def test_live_drops_dead_requests_and_counts_a_cancellation_once():
    led = Ledger()
    a, b, c = request(1), request(2), request(3)
    for r in (a, b, c):
        led.admit(r)
    b.future.cancel()
    env = envelope("p", a, b, c)
    assert led.live(env)
    assert env.requests == [a, c]
    assert not led.live(envelope("p", b))  # seen again at another boundary: counted once
    assert led.counters.cancelled == 1 and len(led) == 2 and balanced(led)
    a.future.cancel()
    c.future.cancel()
    assert not led.live(envelope("p", a, c))
    assert led.counters.cancelled == 3 and len(led) == 0


def test_fail_all_ends_everything_with_pipeline_closed_and_chains_the_reason():
    led = Ledger()
    reqs = [request(i) for i in range(3)]
    for r in reqs:
        led.admit(r)
    reqs[1].future.cancel()
    crash = RuntimeError("runtime bug")
    led.fail_all(crash)
    assert len(led) == 0 and balanced(led)
    assert led.counters.failed == 2 and led.counters.cancelled == 1
    for r in (reqs[0], reqs[2]):
        assert isinstance(r.future.exception(), PipelineClosed)
        assert r.future.exception().__cause__ is crash


def test_parts_parked_for_a_request_are_forgotten_when_it_ends():
    led = Ledger()
    join, sink = PartTable(led), PartTable(led)
    r, s = request(1), request(2)
    led.admit(r)
    led.admit(s)
    assert join.offer(r, 0, 2, "left") is None
    assert sink.offer(r, 1, 3, "out") is None
    assert join.offer(s, 1, 2, "right") is None
    led.fail(r, ValueError("other branch failed"))
    assert len(join) == 1 and len(sink) == 0 and r.id not in led.parked
    s.future.cancel()
    led.drop(s)
    assert len(join) == 0 and led.parked == {}


OPS = ("complete", "fail", "cancel", "drop", "fail_all", "stage_fail")


def apply(led: Ledger, op: str, r) -> None:
    if op == "complete":
        led.complete(r, "y")
    elif op == "fail":
        led.fail(r, ValueError("x"))
    elif op == "cancel":
        r.future.cancel()
    elif op == "drop":
        if r.future.done():
            led.drop(r)
    elif op == "fail_all":
        led.fail_all(None)
    else:
        led.fail_stage("s", [r], ValueError("x"))


@pytest.mark.parametrize("ops", list(itertools.product(OPS, repeat=3)))
def test_every_interleaving_ends_each_request_once(ops):
    """Two requests, three steps each drawn from every way a request can end or be seen ended,
    interleaved in every order: outcomes are set at most once, and the counts add up after
    every step and agree with the futures at the end."""
    led = Ledger()
    reqs = [request(0), request(1)]
    for r in reqs:
        led.admit(r)
    for step, op in enumerate(ops):
        apply(led, op, reqs[step % 2])
        assert balanced(led)
        assert all(r.future.settled <= 1 for r in reqs)
    for r in reqs:  # a final sweep, as the shutdown does
        if r.future.done():
            led.drop(r)
    led.fail_all(None)
    k = led.counters
    assert len(led) == 0 and balanced(led)
    assert k.cancelled == sum(r.future.cancelled() for r in reqs)
    assert k.failed == sum(r.future.exception() is not None for r in reqs)
    assert k.completed == sum(
        r.future.done() and not r.future.cancelled() and r.future.exception() is None for r in reqs
    )


def test_admit_many_counts_a_burst_once_and_each_request_ends_once():
    led = Ledger()
    reqs = [request(i) for i in range(1, 4)]
    led.admit_many(reqs)
    assert led.counters.admitted == 3 and len(led) == 3
    for r in reqs:
        assert led.complete(r, r.id) and not led.complete(r, "again")
    assert len(led) == 0 and balanced(led)
    led.by_priority = {}  # admission control counts by class: the burst is counted per request
    led.admit_many([request(7), request(8)])
    assert led.by_priority == {0: 2} and led.counters.admitted == 5
