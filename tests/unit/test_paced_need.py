"""How much time a request must have left to be filed into a paced (``max_delay="auto"``)
batch: the batch about to form's call, on the mean when its row would otherwise go unused or to
a less urgent class, at the slow end of the spread when one of its own class waits to take it."""

import math
from types import SimpleNamespace

import pytest

from asyncnn import Batching
from asyncnn.batcher import Batcher
from asyncnn.channels import Channel
from asyncnn.pacing import Pacer
from asyncnn.runtime.probe import StageProbe
from asyncnn.runtime.workers.filing import PacedNeed


def setup(waiting, slow=1.5):
    """A paced stage (max_size 64, a call 1 ms + 0.1 ms a row) whose inbox holds ``waiting``:
    a list of priorities, in a ranked inbox."""
    probe = StageProbe("m")
    for rows in (1, 64) * 8:
        probe.service.observe(rows, 0.001 + 0.0001 * rows)
    probe.service.slow = slow
    inbox = Channel(1024, "m:in")
    inbox.rank(lambda p: (p, math.inf, 0.0), 1.0, lambda: 0.0)
    for p in waiting:
        inbox.send_nowait(p)
    spec = Batching(max_size=64, max_delay="auto")
    batcher = Batcher(spec, Pacer(64, 1, None, probe.service))
    return SimpleNamespace(inbox=inbox, probe=probe), batcher


def call(rows, spread=1.0):
    return (0.001 + 0.0001 * rows) * spread


def test_a_request_whose_class_overflows_the_batch_needs_time_for_a_slow_call():
    ctx, batcher = setup([1] * 100)
    assert PacedNeed(ctx, batcher)(1, 1) == pytest.approx(call(64, 1.5))


def test_an_urgent_request_among_less_urgent_ones_needs_the_mean():
    ctx, batcher = setup([1] * 100 + [0] * 5)
    # Five of its class wait and the batch has room for all: its row would go to a normal one.
    assert PacedNeed(ctx, batcher)(1, 0) == pytest.approx(call(64))


def test_a_batch_that_takes_everything_waiting_needs_the_mean_of_its_own_size():
    ctx, batcher = setup([1] * 9)
    assert PacedNeed(ctx, batcher)(1, 1) == pytest.approx(call(10))


def test_a_spread_narrower_than_the_mean_never_lowers_the_need():
    ctx, batcher = setup([1] * 100, slow=0.8)
    assert PacedNeed(ctx, batcher)(1, 1) == pytest.approx(call(64))


def test_nothing_is_needed_before_the_stage_has_measured_its_calls():
    ctx, batcher = setup([1] * 100)
    ctx.probe = StageProbe("fresh")
    assert PacedNeed(ctx, batcher)(1, 1) == 0.0


def test_in_a_fifo_inbox_everything_waiting_goes_first_and_can_take_the_row():
    ctx, batcher = setup([])
    ctx.inbox = Channel(1024, "m:in")  # not ranked: all requests are equal
    for _ in range(100):
        ctx.inbox.send_nowait(object())
    assert ctx.inbox.waiting_upto(5) == 100
    assert PacedNeed(ctx, batcher)(1, 0) == pytest.approx(call(64, 1.5))
