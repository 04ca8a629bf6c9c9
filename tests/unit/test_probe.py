"""StageProbe: counts, timing and events, with a recording observer."""

import math
import sys

import pytest

from asyncnn.runtime.probe import LatencyHistogram, StageProbe


def test_nothing_is_built_for_events_while_nobody_listens():
    p = StageProbe("m")
    p.timed_call(0.002, 3)
    p.waited(0.5)
    p.failed(ValueError("x"), 2)
    p.formed(8, "full")
    assert (p.busy, p.timed, p.blocked, p.failures) == (0.002, 1, 0.5, 1)
    assert p.released == {
        "full": 1,
        "preferred": 0,
        "deadline": 0,
        "idle": 0,
        "delay": 0,
        "drain": 0,
    }
    assert p.latency.total == 1


def test_the_observer_gets_each_kind_with_its_fields():
    seen = []
    p = StageProbe("m")
    p.observe = lambda kind, stage, **fields: seen.append((kind, stage, fields))
    p.timed_call(0.25, 4)
    p.waited(0.1)
    p.failed(KeyError("k"), 3)
    p.formed(16, "delay")
    assert seen == [
        ("batch_done", "m", {"size": 4, "seconds": 0.25}),
        ("backpressure", "m", {"seconds": 0.1}),
        ("request_failed", "m", {"error": "KeyError", "requests": 3}),
        ("batch_formed", "m", {"size": 16, "reason": "delay"}),
    ]


def test_progress_grows_with_calls_failures_and_retries():
    p = StageProbe("m")
    before = p.progress()
    p.batches += 1
    p.failed(ValueError(), 1)
    p.retries += 1
    assert p.progress() == before + 3


def test_ride_is_the_call_of_the_recent_batch_size_or_of_what_is_in_flight():
    p = StageProbe("m")
    assert p.ride(100) == 0.0  # nothing measured yet
    for _ in range(10):
        p.timed_call(0.001, 1)  # one request a call: 1 ms
    assert abs(p.ride(100) - 0.001) < 1e-9
    for _ in range(200):
        p.timed_call(0.016, 16)  # then full batches of 16: 1 ms a row
    assert 15.5 < p.service.typical() <= 16.0  # recent calls weigh most
    assert abs(p.ride(100) - p.service.estimate(p.service.typical())) < 1e-9
    assert p.ride(100) > 0.015  # a request under load rides in a full batch
    assert abs(p.ride(1) - p.service.estimate(1)) < 1e-9  # alone when nothing else is in flight
    assert p.ride(1) < 0.002


def test_the_histogram_takes_any_length_of_time():
    h = LatencyHistogram()
    for seconds in (0.0, 0.002, 3600.0, 1e300, sys.float_info.max, math.inf, math.nan):
        h.add(seconds)  # a request's slack may be ~forever: the last bucket holds it
    assert h.total == 7 and h.counts[-1] == 5  # ~18 minutes and longer (an hour), and NaN
    assert 0.0 < h.quantile(0.2) < 0.0025 and 1000.0 < h.quantile(1.0) < 2000.0


def test_a_probe_counts_running_calls_once():
    probe = StageProbe("s")
    assert probe.spent(5.0) == 0.0
    probe.begin(1.0)
    probe.begin(2.0)
    assert probe.spent(3.0) == pytest.approx(2.0 + 1.0)  # two calls running
    probe.end(1.0)
    probe.timed_call(2.0, 4)
    probe.batches += 1
    assert probe.spent(3.0) == pytest.approx(2.0 + 1.0)  # one ended (2 s), one running (1 s)
    # A batching stage counts a batch when it starts: the running one is not also taken as
    # a mean call of those ended.
    probe.batches += 1
    assert probe.spent(4.0) == pytest.approx(2.0 + 2.0)
    probe.end(2.0)
    assert probe.opened == 0.0 and probe.active == 0
    # A loop stage timing one call in many: the sample's mean stands for every call.
    loop_stage = StageProbe("cheap")
    loop_stage.timed_call(0.001, 1)
    loop_stage.batches += 64
    assert loop_stage.spent(0.0) == pytest.approx(0.064)


def test_the_slack_histogram_counts_exactly_at_its_bounds():
    h = LatencyHistogram((0.001, 0.5, 1.0))
    for seconds in (0.0005, 0.001, 0.4929, 0.5, 0.5001, 2.0, math.inf, math.nan):
        h.add(seconds)
    # At most 1 ms: two; at most 0.5 s: two more (0.4929 s is not rounded up to a bucket
    # edge); at most 1 s: one more; the rest only in the total (+Inf).
    assert h.cumulative() == (2, 4, 5) and h.total == 8
    assert LatencyHistogram().cumulative() == ()
