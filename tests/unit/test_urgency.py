"""The queue discipline, sync with a manual clock: priority, then deadline, then arrival;
aging lifts a waiting class; a channel switches to it in place."""

import math

import pytest
from anyio import WouldBlock

from asyncnn.channels import Channel
from asyncnn.urgency import RankedBuffer


def key(item):
    return item  # items are (priority, deadline, since) themselves


def buffer(now, aging=1.0):
    return RankedBuffer(key, aging, lambda: now[0])


def test_strict_priority_then_earliest_deadline_then_arrival():
    now = [0.0]
    b = buffer(now)
    items = [(1, 0.1, 0.0), (0, math.inf, 0.0), (0, 0.5, 0.0), (0, 0.2, 0.0), (-1, 9.0, 0.0)]
    for it in items:
        b.append(it)
    assert len(b) == 5
    got = [b.popleft() for _ in range(5)]
    assert got == [(-1, 9.0, 0.0), (0, 0.2, 0.0), (0, 0.5, 0.0), (0, math.inf, 0.0), (1, 0.1, 0.0)]
    assert b.inversions == 0 and not b
    with pytest.raises(IndexError):
        b.popleft()


def test_no_deadline_keeps_arrival_order_within_a_class():
    b = buffer([0.0])
    for i in range(5):
        b.append((0, math.inf, float(i)))
    assert [b.popleft()[2] for _ in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_aging_lifts_a_waiting_class_one_level_per_aging_seconds():
    now = [0.0]
    b = buffer(now, aging=1.0)
    low = (2, math.inf, 0.0)  # two levels below the urgent class
    b.append(low)
    now[0] = 1.5
    b.append((0, math.inf, 1.5))
    assert b.popleft() == (0, math.inf, 1.5)  # waited 1.5 s < 2 levels x 1 s: not yet
    b.append((0, math.inf, 1.6))
    now[0] = 2.01
    assert b.popleft() == low  # waited 2.01 s: its turn comes ahead of the urgent one
    assert b.inversions == 1
    assert b.popleft() == (0, math.inf, 1.6)


def test_a_class_is_never_starved_under_a_stream_of_urgent_work():
    now = [0.0]
    b = buffer(now, aging=0.5)
    b.append((1, math.inf, 0.0))
    served_low_at = None
    for step in range(100):
        now[0] = step * 0.01
        b.append((0, math.inf, now[0]))
        if b.popleft()[0] == 1:
            served_low_at = now[0]
            break
    assert served_low_at is not None and 0.5 <= served_low_at <= 0.52


def test_a_channel_ranks_in_place_buffer_and_overflow_alike():
    now = [0.0]
    ch = Channel(2, "c")
    ch.send_nowait((0, math.inf, 0.0))
    ch.send_nowait((0, 5.0, 0.0))
    ch.send_over((0, 1.0, 0.0))  # past capacity: the overflow
    ch.send_over((0, 9.0, 0.0))
    ch.rank(key, 1.0, lambda: now[0])
    assert len(ch) == 4 and not ch.has_room()
    assert ch.poll() == (0, 1.0, 0.0)  # the most urgent of all, overflow or not
    ch.send_over((0, 0.5, 0.0))  # still past the bound: ranked with the rest
    assert ch.poll() == (0, 0.5, 0.0)
    assert ch.poll() == (0, 5.0, 0.0)
    assert ch.poll() == (0, 9.0, 0.0)  # no deadline comes last
    assert ch.poll() == (0, math.inf, 0.0)
    ch.close()
    assert repr(ch.poll()) == "END"
    assert ch.inversions == 0


def test_a_full_ranked_channel_takes_a_more_urgent_class_past_its_bound_and_no_other():
    now = [0.0]
    ch = Channel(2, "c")
    ch.rank(key, 1.0, lambda: now[0])
    assert ch.takes((5, 1.0, 0.0))  # room: anything
    ch.send_nowait((1, 1.0, 0.0))
    ch.send_nowait((0, 2.0, 0.0))
    assert not ch.has_room()
    assert not ch.takes((1, 0.1, 0.0))  # its own class, however near its deadline: the bound
    assert not ch.takes((2, 0.1, 0.0))
    with pytest.raises(WouldBlock):
        ch.send_nowait((1, 0.1, 0.0))
    assert ch.takes((0, 9.0, 0.0)) and ch.takes((-3, 9.0, 0.0))  # outranks class 1 waiting
    ch.send_nowait((0, 9.0, 0.0))
    assert len(ch) == 3
    # The peak stays at the bound: the plain worker's inlined send reads "below the peak" as
    # room, and must not append an ordinary item past the bound after an urgent one passed it.
    assert ch.statistics().peak_depth == 2
    assert ch.poll() == (0, 2.0, 0.0) and ch.poll() == (0, 9.0, 0.0)
    assert ch.takes((5, 1.0, 0.0))  # 1 of 2: room again for any class
    ch.close()
    assert not ch.takes((-9, 0.0, 0.0))  # closed: nothing


def test_a_fifo_channel_never_takes_past_its_bound():
    ch = Channel(1, "fifo")
    ch.send_nowait((1, 1.0, 0.0))
    assert not ch.takes((-5, 0.0, 0.0))
    with pytest.raises(WouldBlock):
        ch.send_nowait((-5, 0.0, 0.0))


def test_outranks_compares_with_the_least_urgent_class_that_waits():
    now = [0.0]
    b = buffer(now)
    assert not b.outranks((0, 1.0, 0.0))  # nothing waits
    b.append((0, 1.0, 0.0))
    b.append((2, 1.0, 0.0))
    assert b.outranks((1, 9.0, 0.0)) and not b.outranks((2, 0.0, 0.0))
    b.popleft()
    b.popleft()  # class 2 left: its heap is empty, class 0 is not there either
    b.append((1, 1.0, 0.0))
    assert b.outranks((0, 9.0, 0.0)) and not b.outranks((1, 0.0, 0.0))


async def test_a_watcher_wakes_only_for_an_item_of_a_more_urgent_class():
    import asyncio

    ch = Channel(1, "c")
    ch.rank(key, 1.0, lambda: 0.0)
    fut = asyncio.get_running_loop().create_future()
    ch.watch(fut, 1)
    ch.send_nowait((1, 0.1, 0.0))  # its own class, however near its deadline
    ch.send_over((2, 0.0, 0.0))
    assert not fut.done() and not ch.holds_above(1)
    ch.send_over((0, 9.0, 0.0))  # past the bound, and more urgent: woken
    assert fut.done() and ch.holds_above(1) and not ch.holds_above(0)
    ch.unwatch(fut)
    assert not ch._watchers
    fifo = Channel(1, "fifo")
    assert not fifo.ranked and not fifo.holds_above(5)
