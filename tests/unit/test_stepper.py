"""The step stage's decisions, without a loop: joins, budget, keys, readiness, figures."""

import asyncio
import math

import pytest

from asyncnn import Stepping
from asyncnn.batching import Request
from asyncnn.runtime.stepper import Stepper


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def req(i, loop):
    return Request(i, loop.create_future())


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_requests_join_in_arrival_order_up_to_max_active(loop):
    st = Stepper(Stepping(max_active=2), Clock())
    for i in range(3):
        st.offer(req(i, loop), i)
    assert [s.req.id for s in st.join()] == [0, 1]
    assert [s.req.id for s in st.waiting] == [2]
    finished = st.stepped(st.group(), [True, False])  # request 0 is done: it leaves
    assert [s.req.id for s in finished] == [0]
    assert [s.req.id for s in st.join()] == [2]  # joins between steps
    assert sorted(s.req.id for s in st.active) == [1, 2]


def test_the_budget_stops_at_the_first_that_does_not_fit_and_a_heavy_one_runs_alone(loop):
    st = Stepper(Stepping(max_active=8, cost=lambda x: x, budget=10), Clock())
    for i, cost in enumerate([4, 5, 3, 1]):
        st.offer(req(i, loop), cost)
    assert [s.payload for s in st.join()] == [4, 5]  # 3 would exceed 10; 1 may not overtake it
    st.stepped(st.group(), [True, True])
    assert [s.payload for s in st.join()] == [3, 1]
    st.stepped(st.group(), [True, True])
    st.offer(req(9, loop), 25)  # heavier than the whole budget: alone, once the set is empty
    assert [s.payload for s in st.join()] == [25]


def test_different_keys_never_share_a_step_and_take_turns(loop):
    st = Stepper(Stepping(key=lambda x: x[0]), Clock())
    for i, x in enumerate(["a1", "b1", "a2", "b2"]):
        st.offer(req(i, loop), x)
    st.join()
    first, second, third = st.group(), st.group(), st.group()
    assert {s.payload[0] for s in first} == {"a"} and len(first) == 2
    assert {s.payload[0] for s in second} == {"b"} and len(second) == 2
    assert {s.payload[0] for s in third} == {"a"}


def test_a_request_whose_reader_has_no_room_skips_the_step(loop):
    st = Stepper(Stepping(), Clock())
    for i in range(3):
        st.offer(req(i, loop), i)
    st.join()
    group = st.group(ready=lambda s: s.req.id != 1)
    assert [s.req.id for s in group] == [0, 2]
    assert st.group(ready=lambda s: False) == []


def test_ended_requests_leave_from_the_line_and_from_the_active_set(loop):
    st = Stepper(Stepping(max_active=1), Clock())
    a, b, c = (req(i, loop) for i in range(3))
    for r in (a, b, c):
        st.offer(r, None)
    st.join()
    a.future.cancel()
    b.future.cancel()
    waiting, active = st.leave_ended()
    assert [s.req for s in waiting] == [b] and [s.req for s in active] == [a]
    assert [s.req for s in st.join()] == [c]


def test_step_figures_time_to_first_output_and_gaps_with_an_injected_clock(loop):
    clock = Clock()
    st = Stepper(Stepping(), clock)
    st.offer(req(0, loop), None)
    clock.t = 0.5
    st.join()
    clock.t = 1.0
    st.stepped(st.group(), [False])  # first output 1.0 s after arrival
    clock.t = 1.25
    st.stepped(st.group(), [True])  # a gap of 0.25 s
    c = st.counters
    assert c.steps == 2 and c.active == 2 and c.admitted == 1
    assert c.first_output.quantile(0.5) == pytest.approx(1.0, rel=0.1)
    assert c.gaps.quantile(0.5) == pytest.approx(0.25, rel=0.1)
    assert st.idle


def test_a_key_or_cost_the_stepper_cannot_use_is_refused_for_that_request(loop):
    st = Stepper(Stepping(key=lambda x: x, cost=lambda x: 1.0, budget=4), Clock())
    with pytest.raises(TypeError, match="key= returned a list, which is not hashable"):
        st.offer(req(0, loop), [1, 2])  # grouping by it would fail for every request
    bad_cost = Stepper(Stepping(cost=lambda x: x, budget=4), Clock())
    for cost in (math.nan, -1.0):  # NaN: every budget comparison false, the budget ignored
        with pytest.raises(ValueError, match="cost= returned"):
            bad_cost.offer(req(1, loop), cost)
    assert not st.waiting and not bad_cost.waiting
    heavy = bad_cost.offer(req(2, loop), math.inf)  # heavier than any budget: steps alone
    bad_cost.offer(req(3, loop), 1.0)
    assert bad_cost.join() == [heavy]


def test_a_key_not_equal_to_itself_still_steps(loop):
    st = Stepper(Stepping(key=lambda x: x), Clock())
    nan = math.nan
    st.offer(req(0, loop), nan)
    st.offer(req(1, loop), nan)
    st.join()
    assert [s.req.id for s in st.group()] == [0, 1]  # grouped as `in` finds them, not left


def test_stepping_options_are_checked():
    with pytest.raises(ValueError, match="max_active=0"):
        Stepping(max_active=0)
    with pytest.raises(ValueError, match="budget=-1"):
        Stepping(budget=-1)
    with pytest.raises(TypeError, match="key=3"):
        Stepping(key=3)
