import asyncio

import anyio
import pytest
from anyio import ClosedResourceError, EndOfStream, WouldBlock, wait_all_tasks_blocked

from asyncnn.channels import EMPTY, END, Channel


async def test_fifo_and_bound():
    ch = Channel[int](2, "c")
    ch.send_nowait(1)
    ch.send_nowait(2)
    with pytest.raises(WouldBlock):
        ch.send_nowait(3)
    assert ch.receive_nowait() == 1
    assert await ch.receive() == 2
    with pytest.raises(WouldBlock):
        ch.receive_nowait()
    st = ch.statistics()
    assert (st.depth, st.peak_depth, st.capacity) == (0, 2, 2)


async def test_close_drains_then_ends_and_senders_fail():
    ch = Channel[int](4)
    ch.send_nowait(1)
    ch.close()
    with pytest.raises(ClosedResourceError):
        ch.send_nowait(2)
    assert await ch.receive() == 1
    with pytest.raises(EndOfStream):
        await ch.receive()


async def test_backpressure_blocks_sender_until_room():
    ch = Channel[int](1)
    ch.send_nowait(0)
    sent = asyncio.Event()

    async def producer():
        await ch.send(1)
        sent.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await wait_all_tasks_blocked()
        assert not sent.is_set()
        assert ch.statistics().waiting_senders == 1
        assert ch.receive_nowait() == 0
        await sent.wait()
    assert ch.receive_nowait() == 1


async def test_close_wakes_blocked_receiver_and_sender():
    ch = Channel[int](1)
    ch.send_nowait(0)
    full = Channel[int](1)
    results = []

    async def sender():
        try:
            await ch.send(1)
        except ClosedResourceError:
            results.append("sender closed")

    async def receiver():
        try:
            await full.receive()
        except EndOfStream:
            results.append("receiver ended")

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        tg.start_soon(receiver)
        await wait_all_tasks_blocked()
        ch.close()
        full.close()
    assert sorted(results) == ["receiver ended", "sender closed"]


async def test_cancelled_waiter_passes_its_wakeup_on():
    ch = Channel[int](1)
    first = asyncio.create_task(ch.receive())
    second = asyncio.create_task(ch.receive())
    await wait_all_tasks_blocked()
    ch.send_nowait(7)  # wakes the first waiter ...
    first.cancel()  # ... which is cancelled before it runs: the item must reach the second
    assert await second == 7
    with pytest.raises(asyncio.CancelledError):
        await first


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        Channel(0)


# -- counted senders and the poll/next pair -------------------------------------------------


async def test_the_last_sender_closes_the_channel():
    ch = Channel[int](4, "counted")
    ch.add_senders(2)
    ch.send_nowait(1)
    ch.sender_done()
    assert not ch.closed
    ch.send_nowait(2)
    ch.sender_done()
    assert ch.closed
    assert [ch.poll(), await ch.next(), ch.poll(), await ch.next()] == [1, 2, END, END]


async def test_poll_says_empty_and_next_waits_for_an_item():
    ch = Channel[int](1)
    assert ch.poll() is EMPTY
    got = []

    async def take():
        got.append(await ch.next())

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await wait_all_tasks_blocked()
        assert got == []
        ch.send_nowait(5)
    assert got == [5]


def test_holds_finds_a_buffered_item():
    ch = Channel[int](3)
    ch.send_nowait(1)
    ch.send_nowait(2)
    assert ch.holds(lambda x: x == 2) and not ch.holds(lambda x: x == 3)


# -- send_over: past capacity, into an ordered overflow ---------------------------------------


async def test_send_over_keeps_order_past_capacity_and_goes_before_waiting_senders():
    ch = Channel[int](2, "over")
    for i in range(5):
        ch.send_over(i)
    assert len(ch) == 5 and not ch.has_room()
    waiting = asyncio.ensure_future(ch.send(99))  # a sender that waits for room
    await asyncio.sleep(0)
    got = [await ch.receive() for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]  # the overflow first, in order
    await waiting
    assert await ch.receive() == 99


async def test_a_ranked_channel_serves_past_the_bound_most_urgent_first_then_lets_senders_in():
    # Ranked, the buffer and the overflow are one heap: the most urgent item of all goes
    # first, and a sender waiting for room is let in only once the heap is under the bound.
    ch = Channel[tuple[int, float, float]](2, "ranked")
    ch.rank(lambda item: item, 1.0, lambda: 0.0)
    for deadline in (5.0, 4.0, 3.0, 2.0):
        ch.send_over((0, deadline, 0.0))
    with pytest.raises(WouldBlock):
        ch.send_nowait((0, 0.1, 0.0))  # the bound holds for ordinary senders
    waiting = asyncio.ensure_future(ch.send((0, 1.0, 0.0)))
    await asyncio.sleep(0)
    assert ch.poll() == (0, 2.0, 0.0) and ch.poll() == (0, 3.0, 0.0)
    await asyncio.sleep(0)
    assert not waiting.done()  # two still wait: the heap is at the bound
    assert ch.poll() == (0, 4.0, 0.0)
    await waiting  # under the bound: let in, and ranked with the rest
    assert [ch.poll(), ch.poll()] == [(0, 1.0, 0.0), (0, 5.0, 0.0)]
    assert ch.poll() is EMPTY


async def test_closing_drains_the_overflow_before_the_end():
    ch = Channel[int](1)
    ch.send_over(1)
    ch.send_over(2)
    ch.close()
    with pytest.raises(anyio.ClosedResourceError):
        ch.send_over(3)
    assert [ch.poll(), ch.poll(), ch.poll()] == [1, 2, END]


def test_drain_and_holds_see_the_overflow():
    ch = Channel[str](1)
    for s in "abc":
        ch.send_over(s)
    assert ch.holds(lambda s: s == "c")
    assert ch.statistics().depth == 3
    assert ch.drain_nowait() == ["a", "b", "c"] and len(ch) == 0


async def test_extend_nowait_appends_a_burst_in_order_and_wakes_a_receiver_per_item():
    ch = Channel[int](4, "c")
    got: list[int] = []

    async def receiver() -> None:
        got.append(await ch.receive())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(receiver)
        await wait_all_tasks_blocked()
        assert ch.room() == 4
        ch.extend_nowait([1, 2])  # two receivers woken, the third still waits
        await wait_all_tasks_blocked()
        assert sorted(got) == [1, 2] and ch.statistics().waiting_receivers == 1
        ch.send_nowait(3)
    assert sorted(got) == [1, 2, 3]
    ch.extend_nowait([4, 5, 6])
    assert ch.room() == 1 and ch.statistics().peak_depth == 3
    with pytest.raises(WouldBlock):
        ch.extend_nowait([7, 8])  # does not fit: nothing appended
    assert [ch.receive_nowait() for _ in range(3)] == [4, 5, 6]
    ch.close()
    assert ch.room() == 0
    with pytest.raises(ClosedResourceError):
        ch.extend_nowait([9])


def test_room_is_zero_while_an_overflow_waits():
    ch = Channel[int](1)
    ch.send_over(1)
    assert ch.room() == 0
    ch.send_over(2)  # past capacity: in the overflow
    assert ch.room() == 0
    assert ch.poll() == 1  # the overflow takes the room
    assert ch.room() == 0
    assert ch.poll() == 2
    assert ch.room() == 1
