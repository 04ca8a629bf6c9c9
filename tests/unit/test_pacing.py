"""Latency-target batching, sync with an injected clock: the service-time fit, the arrival
rate, the pacer's release rule and reasons, and a batcher that takes the most urgent first."""

import asyncio
import math
import random
import sys

import pytest

from asyncnn import Batching
from asyncnn.batcher import HOLD_GUARD, HOLD_SHARE, Batcher, Item
from asyncnn.batching import Request
from asyncnn.pacing import GUARD, ArrivalRate, Pacer, ServiceTimes


def req(i, deadline=None, priority=0):
    loop = asyncio.new_event_loop()
    r = Request(i, loop.create_future(), None, deadline, priority, 0.0)
    loop.close()
    return r


def item(i, at=0.0, deadline=None, priority=0):
    return Item(req(i, deadline, priority), None, 0, 1, at)


def test_service_times_fit_a_fixed_and_a_per_row_cost():
    s = ServiceTimes()
    assert s.estimate(10) == 0.0  # nothing measured: no cost assumed
    for rows in (1, 8, 32, 64) * 5:
        s.observe(rows, 0.002 + 0.0001 * rows)
    fixed, per_row = s.line()
    assert fixed == pytest.approx(0.002, rel=1e-6) and per_row == pytest.approx(1e-4, rel=1e-6)
    assert s.estimate(16) == pytest.approx(0.0036)


def test_service_times_with_one_size_scale_by_rows_and_follow_a_slowdown():
    s = ServiceTimes(forget=0.5)
    for _ in range(10):
        s.observe(64, 0.0064)
    assert s.estimate(32) == pytest.approx(0.0032)
    for _ in range(20):
        s.observe(64, 0.0128)  # the machine got twice as slow
    assert s.estimate(64) == pytest.approx(0.0128, rel=1e-3)


def test_service_times_track_how_far_calls_spread_around_the_estimate():
    s = ServiceTimes()
    rng = random.Random(1)
    s.observe(64, 0.005)
    assert (s.fast, s.slow) == (1.0, 1.0)  # no line yet to measure the spread from
    for _ in range(2000):
        s.observe(64, 0.010 * rng.uniform(0.7, 1.3))
    assert s.estimate(64) == pytest.approx(0.010, rel=0.1)
    assert s.fast == pytest.approx(0.76, abs=0.06)  # the 10th percentile of uniform(0.7, 1.3)
    assert s.slow == pytest.approx(1.24, abs=0.06)  # the 90th
    for _ in range(500):
        s.observe(64, 0.010 * rng.uniform(0.97, 1.03))  # the machine calms down
    assert 0.9 < s.fast < 1.0 < s.slow < 1.1


def test_arrival_rate_folds_windows():
    a = ArrivalRate(window=0.01, alpha=1.0)
    t = 0.0
    for _ in range(100):
        a.add(t, 1)
        t += 0.001  # 1000 rows/s
    assert a.current(t) == pytest.approx(1000, rel=0.15)


def pacer(fixed=0.001, per_row=0.0001, rate=0.0, runners=1, target=None, max_size=64):
    p = Pacer(max_size, runners, target)
    for rows in (1, 64) * 4:
        p.service.observe(rows, fixed + per_row * rows)
    if rate:
        t = -1.0
        while t < 0:
            p.arrivals.add(t, 1)
            t += 1.0 / rate
    return p


def test_idle_runner_and_light_load_release_at_once():
    p = pacer(rate=100)  # one row costs 1.1 ms, 100/s arrive: a batch of 1 keeps up
    assert p.decide(0.0, 1, 0.0, None, idle=True) == ("idle", None)


def test_heavy_load_waits_for_a_batch_that_keeps_up_then_the_timer():
    p = pacer(rate=5000)  # 5000/s: a runner needs ~7 rows a call to keep up
    assert p.rows_needed(0.0) == math.ceil(1.1 * 5000 * 0.001 / (1 - 1.1 * 5000 * 0.0001))
    reason, recheck = p.decide(0.0, 2, 0.0, None, idle=True)
    assert reason is None and 0.0 < recheck <= p.service.estimate(64)
    assert p.decide(0.0, p.rows_needed(0.0), 0.0, None, idle=True)[0] == "idle"
    # Nothing more arrives: after one full batch's time the timer releases what waits.
    assert p.decide(p.service.estimate(64), 2, 0.0, None, idle=True)[0] == "delay"


def test_nothing_is_released_while_every_runner_is_busy():
    p = pacer(rate=5000)
    # Not even a full batch, nor one at its deadline: it could not run sooner, and a request
    # arriving more urgent meanwhile belongs in the batch formed when a runner is free.
    assert p.decide(0.0, 64, 0.0, None, idle=False) == (None, None)
    assert p.decide(1.0, 3, 0.0, 0.5, idle=False) == (None, None)


def test_an_idle_runner_waits_for_more_rows_only_while_the_deadline_allows():
    p = pacer(rate=5000)  # batches of 3 do not keep up: it would rather wait
    took = p.service.estimate(3)
    reason, recheck = p.decide(0.0, 3, 0.0, 0.004, idle=True)
    assert reason is None and recheck <= 0.004 - took - GUARD
    assert p.decide(0.004 - took - GUARD, 3, 0.0, 0.004, idle=True) == ("deadline", None)


def test_target_latency_is_a_deadline_for_requests_without_one():
    p = pacer(rate=5000, target=0.003)
    took = p.service.estimate(3)
    assert p.decide(0.001, 3, 0.001, None, idle=True)[0] is None
    assert p.decide(0.004 - took, 3, 0.001, None, idle=True)[0] == "deadline"


def test_full_releases_at_max_size():
    p = pacer(rate=5000, max_size=8)
    assert p.decide(0.0, 8, 0.0, None, idle=True) == ("full", None)


def test_a_ranked_batcher_takes_the_most_urgent_compatible_requests_first():
    b = Batcher(Batching(max_size=3, max_delay=1.0))
    b.add(item(0, at=0.0), "k")
    b.add(item(1, at=0.1, priority=1), "k")
    b.add(item(2, at=0.2, deadline=5.0), "k")
    b.add(item(3, at=0.3, deadline=1.0), "k")
    assert b.ranked
    batch = b.pop(now=0.3)
    assert batch.reason == "full" and [i.request.id for i in batch.items] == [3, 2, 0]
    assert b.most_urgent() == 1


def test_a_fixed_delay_never_holds_a_request_past_the_time_its_call_needs():
    # max_delay 1 s, a request with a deadline at 0.5 s and calls of 0.1 s: it goes by 0.375 s
    # (0.5 - 0.1 - a twentieth of the 0.5 s since the oldest came), released for its deadline,
    # not held until it times out.
    b = Batcher(Batching(max_size=8, max_delay=1.0), need=lambda rows: 0.1)
    b.add(item(0, at=0.0), "k")
    b.add(item(1, at=0.01, deadline=0.5), "k")
    assert b.next_deadline() == pytest.approx(0.5 - 0.1 - HOLD_SHARE * 0.5)
    assert b.pop(now=0.37) is None
    batch = b.pop(now=0.375)
    assert batch.reason == "deadline" and [i.request.id for i in batch.items] == [1, 0]
    assert b.next_deadline() is None
    # a short wait keeps HOLD_GUARD in hand
    b.add(item(2, at=1.0, deadline=1.05), "k")
    assert b.next_deadline() == pytest.approx(1.05 - 0.1 - HOLD_GUARD)


def test_a_fixed_delay_with_a_far_deadline_still_waits_its_delay():
    b = Batcher(Batching(max_size=8, max_delay=0.005), need=lambda rows: 0.1)
    b.add(item(0, at=0.0, deadline=60.0), "k")
    assert b.next_deadline() == pytest.approx(0.005)
    assert b.pop(now=0.004) is None and b.pop(now=0.005).reason == "delay"


def test_a_fixed_delay_goes_at_once_for_a_deadline_before_it_until_calls_are_measured():
    b = Batcher(Batching(max_size=8, max_delay=1.0), need=lambda rows: None)
    b.add(item(0, at=0.0, deadline=2.0), "k")  # after the delay's end: waits for it
    assert b.next_deadline() == pytest.approx(1.0) and b.pop(now=0.5) is None
    b.add(item(1, at=0.5, deadline=0.9), "k")  # before it, with no call measured: goes now
    batch = b.pop(now=0.5)
    assert batch.reason == "deadline" and [i.request.id for i in batch.items] == [1, 0]


def test_a_ranked_fixed_batcher_times_its_delay_from_the_oldest_not_the_most_urgent():
    b = Batcher(Batching(max_size=8, max_delay=0.005))
    b.add(item(0, at=0.0), "k")
    b.add(item(1, at=0.004, priority=-1), "k")  # ranked first, but arrived later
    assert b.next_deadline() == pytest.approx(0.005)
    assert b.pop(now=0.005).reason == "delay"


def test_an_auto_batcher_reports_why_it_released():
    spec = Batching(max_size=64, max_delay="auto")
    p = pacer(rate=5000)
    b = Batcher(spec, p)
    b.add(item(0, at=0.0, deadline=0.004), "k")
    assert b.pop(now=0.0, idle=False) is None  # every runner busy: it waits
    assert b.pop(now=0.0, idle=True) is None  # a runner is free: more rows are worth it
    when = b.next_deadline()
    assert when <= 0.004 - p.service.estimate(1) - GUARD
    batch = b.pop(now=0.004 - p.service.estimate(1) - GUARD, idle=True)
    assert batch.reason == "deadline" and len(batch.items) == 1
    b.add(item(1, at=1.0), "k")
    assert b.pop(now=1.0, draining=True).reason == "drain"


def test_batching_auto_options():
    assert Batching(max_delay="auto").auto
    assert Batching(target_latency=0.02).auto  # implied
    assert not Batching().auto
    with pytest.raises(ValueError, match="target_latency="):
        Batching(max_delay=0.01, target_latency=0.02)
    with pytest.raises(ValueError, match="'auto'"):
        Batching(max_delay="soon")
    with pytest.raises(ValueError, match="target_latency"):
        Batching(target_latency=0)


def test_rows_within_a_deadline_on_a_slow_call():
    p = pacer()  # 1 ms + 0.1 ms a row
    p.service.slow = 2.0
    assert p.rows_within(0.0, 2 * (0.001 + 0.0001 * 20) + GUARD) == 20
    assert p.rows_within(0.0, 1.0) == 64  # anything fits: max_size
    assert p.rows_within(0.0, 0.001) == 0  # not even one row
    assert Pacer(64, 1, None).rows_within(0.0, 0.0001) == 64  # nothing measured yet
    assert p.rows_within(0.0, sys.float_info.max) == 64  # a deadline ~forever away


def paced_batcher(max_size=64):
    spec = Batching(max_size=max_size, max_delay="auto")
    p = pacer(rate=5000, max_size=max_size)  # a full call: 7.4 ms
    return Batcher(spec, p), p


def test_a_paced_batch_is_cut_so_its_most_urgent_request_ends_in_time():
    b, p = paced_batcher()
    b.add(item(0, deadline=0.005, priority=0), "k")  # 5 ms: a full batch would end past it
    for i in range(1, 80):
        b.add(item(i, deadline=1.0, priority=1), "k")
    batch = b.pop(now=0.0, idle=True)
    fits = p.rows_within(0.0, 0.005)
    assert 1 < fits < 64 and batch.reason == "deadline" and batch.rows == fits
    assert batch.items[0].request.id == 0


def test_no_cut_for_requests_of_the_heads_own_class_or_a_head_out_of_reach():
    b, _ = paced_batcher()
    for i in range(80):  # one class: cutting would only trade a request for its own kind
        b.add(item(i, deadline=0.005 + i * 1e-6, priority=1), "k")
    assert b.pop(now=0.0, idle=True).rows == 64
    b, _ = paced_batcher()
    b.add(item(0, deadline=0.0005, priority=0), "k")  # not even alone would it end in time
    for i in range(1, 80):
        b.add(item(i, deadline=1.0, priority=1), "k")
    assert b.pop(now=0.0, idle=True).rows == 64
    b, _ = paced_batcher()
    b.add(item(0, deadline=0.02, priority=0), "k")  # the full batch ends in time
    for i in range(1, 80):
        b.add(item(i, deadline=1.0, priority=1), "k")
    batch = b.pop(now=0.0, idle=True)
    assert batch.rows == 64 and batch.reason == "full"
