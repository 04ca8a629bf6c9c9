"""Spreading a paced stage's runners (``Pacer.stagger_rows``), sync with an injected clock: a
runner that would come free with another takes a smaller batch, only while the stage serves
tight deadlines, and never cuts its most urgent request's own class."""

from __future__ import annotations

from asyncnn import Batching
from asyncnn.batcher import Batcher
from asyncnn.pacing import STAGGER_BELOW, STAGGER_FLOOR, STAGGER_MEMORY, STAGGER_SLACK, Pacer
from tests.unit.test_pacing import item, pacer

FULL = 0.001 + 0.0001 * 64  # pacer(): 1 ms a call + 0.1 ms a row: a full call 7.4 ms
TIGHT = 0.010  # a budget of 10 ms: well under STAGGER_BELOW full calls


def two_runners() -> Pacer:
    return pacer(runners=2)


def test_a_runner_in_step_with_the_other_takes_a_batch_that_ends_apart_from_it():
    p = two_runners()
    p.started("other", 0.0, 64)  # ends at 7.4 ms
    rows = p.stagger_rows(FULL, TIGHT)  # this runner starts as the other ends: in step
    took = 0.001 + 0.0001 * rows
    apart = FULL / (2 * STAGGER_SLACK)  # the least time between two runners' ends
    assert rows < 64 and FULL - apart - 0.0001 < took <= FULL - apart  # the longest call that
    # comes free that far from the other's next end (a full call after this one starts)
    p.ended("other")
    assert p.stagger_rows(FULL, TIGHT) == 64  # nobody else running: nothing to keep apart


def test_runners_already_apart_keep_full_batches():
    p = two_runners()
    p.started("other", 0.0, 64)
    assert p.stagger_rows(FULL / 2, TIGHT) == 64  # the other is half way through its call


def test_a_runner_far_out_of_step_shrinks_its_batch_at_most_to_the_floor():
    p = two_runners()
    p.started("other", 0.0, 64)
    p.ends["other"] = 0.0  # overdue: it comes free any moment
    rows = p.stagger_rows(0.0, TIGHT)
    assert 64 * STAGGER_FLOOR <= rows < 64


def test_no_stagger_without_tight_deadlines_with_one_runner_or_before_measuring():
    p = two_runners()
    p.started("other", 0.0, 64)
    loose = STAGGER_BELOW * FULL * 2
    assert p.stagger_rows(FULL, loose) == 64  # deadlines loose: full batches
    assert p.stagger_rows(FULL, None) == 64  # no deadline at all
    one = pacer(runners=1)
    assert one.stagger_rows(FULL, TIGHT) == 64
    fresh = Pacer(64, 2, None)  # nothing measured yet
    fresh.started("other", 0.0, 64)
    assert fresh.stagger_rows(0.0, TIGHT) == 64


def test_a_tight_budget_is_remembered_for_a_while_then_forgotten():
    p = two_runners()
    p.started("other", 0.0, 64)
    assert p.stagger_rows(FULL, TIGHT) < 64  # a tight request seen now
    p.started("other", FULL, 64)
    later = 2 * FULL  # in step again, the batch without a tight request
    assert p.stagger_rows(later, None) < 64  # still remembered
    p.started("other", later + STAGGER_MEMORY * FULL, 64)
    much_later = later + (STAGGER_MEMORY + 1) * FULL
    assert p.stagger_rows(much_later, None) == 64


def staggered_batcher() -> tuple[Batcher, Pacer]:
    p = pacer(runners=2, rate=5000)
    return Batcher(Batching(max_size=64, max_delay="auto"), p), p


def test_a_paced_batch_is_cut_to_stagger_without_cutting_the_urgent_class():
    b, p = staggered_batcher()
    p.started("other", 0.0, 64)
    for i in range(4):  # urgent: 20 ms from admission (at 0) to deadline; a full call fits
        b.add(item(i, at=FULL, deadline=0.020, priority=0), "k")
    for i in range(4, 100):
        b.add(item(i, at=FULL, deadline=1.0, priority=1), "k")
    batch = b.pop(now=FULL, idle=True)
    assert batch.reason == "deadline" and 64 * STAGGER_FLOOR <= batch.rows < 64
    assert [it.request.id for it in batch.items[:4]] == [0, 1, 2, 3]

    b, p = staggered_batcher()
    p.started("other", 0.0, 64)
    for i in range(100):  # one class fills the batch: nothing less urgent to cut
        b.add(item(i, at=FULL, deadline=0.020, priority=0), "k")
    assert b.pop(now=FULL, idle=True).rows == 64
