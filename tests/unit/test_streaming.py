"""The stream windows with a fake submit: futures resolved by the test, in any order."""

import asyncio

import pytest

from asyncnn.channels import END
from asyncnn.streaming import OrderedWindow, UnorderedWindow, stream


class FakeService:
    """submit(x) returns a future the test resolves; counts what is outstanding."""

    def __init__(self) -> None:
        self.futures: dict[object, asyncio.Future] = {}
        self.peak = 0

    async def submit(self, x):
        fut = asyncio.get_running_loop().create_future()
        self.futures[x] = fut
        self.peak = max(self.peak, sum(not f.done() for f in self.futures.values()))
        return fut


async def test_ordered_window_returns_futures_in_submission_order():
    svc = FakeService()
    w = OrderedWindow(3)
    for x in "abc":
        await w.admit(svc.submit, x)
    w.feeding_done()
    svc.futures["c"].set_result("C")
    svc.futures["a"].set_result("A")
    got = []
    while (fut := await w.next()) is not END:
        got.append(fut)
    assert got == [svc.futures[x] for x in "abc"]


async def test_unordered_window_returns_futures_as_they_complete_and_ends_after_the_last():
    svc = FakeService()
    w = UnorderedWindow(3)
    for x in "abc":
        await w.admit(svc.submit, x)
    w.feeding_done()
    for x in "cab":
        svc.futures[x].set_result(x.upper())
    await asyncio.sleep(0)  # done callbacks run on the loop
    got = []
    while (fut := await w.next()) is not END:
        got.append(fut.result())
    assert got == ["C", "A", "B"]


async def test_unordered_window_bounds_what_is_outstanding():
    svc = FakeService()
    w = UnorderedWindow(2)
    await w.admit(svc.submit, 1)
    await w.admit(svc.submit, 2)
    third = asyncio.ensure_future(w.admit(svc.submit, 3))
    await asyncio.sleep(0)
    assert not third.done()  # two outstanding: the third waits for a slot
    svc.futures[1].set_result(1)
    await asyncio.sleep(0)
    assert await w.next() is svc.futures[1]  # taking a result frees its slot
    await third
    assert svc.peak == 2
    assert set(w.abandon()) == {svc.futures[2], svc.futures[3]}


async def _run_stream(inputs, window, svc, bulk=None, stop_after=None):
    """Iterate ``stream`` over ``inputs`` while a resolver answers every submitted ``x`` with
    ``x * 10``; leave after ``stop_after`` results (then the stream is closed)."""
    tasks = []

    def start_feeder(feed, scope):
        tasks.append(asyncio.ensure_future(feed()))

    async def resolver():
        while True:
            for x, f in list(svc.futures.items()):
                if not f.done():
                    f.set_result(x * 10)
            await asyncio.sleep(0)

    res = asyncio.ensure_future(resolver())
    got = []
    gen = stream(inputs, svc.submit, lambda: window, start_feeder, False, None, bulk)
    try:
        async for y in gen:
            got.append(y)
            if len(got) == stop_after:
                break
    finally:
        await gen.aclose()
        res.cancel()
        await asyncio.gather(*tasks, res, return_exceptions=True)
    return got


@pytest.mark.parametrize("ordered", [True, False])
async def test_stream_yields_every_result_and_cancels_what_is_left_when_left_early(ordered):
    svc = FakeService()
    window = OrderedWindow(4) if ordered else UnorderedWindow(4)
    got = await _run_stream(range(100), window, svc, stop_after=10)
    assert len(got) == 10 and (not ordered or got == [x * 10 for x in range(10)])
    assert svc.peak <= 4
    assert all(f.done() for f in svc.futures.values())  # results or cancelled, none pending


class FakeBulk:
    """``stream``'s burst path: ``room`` items fit now; each burst is recorded."""

    def __init__(self, svc: FakeService, room: int) -> None:
        self.svc, self.room, self.bursts = svc, room, []

    def room_now(self) -> int:
        return self.room

    def submit_many(self, xs):
        self.bursts.append(list(xs))
        loop = asyncio.get_running_loop()
        futs = []
        for x in xs:
            fut = self.svc.futures[x] = loop.create_future()
            fut.set_result(x * 10)
            futs.append(fut)
        return futs


async def test_a_sync_iterable_is_admitted_in_bursts_bounded_by_window_and_pipeline():
    svc = FakeService()
    bulk = FakeBulk(svc, room=3)  # the pipeline has room for 3 at a time
    got = await _run_stream(range(10), OrderedWindow(5), svc, (bulk.room_now, bulk.submit_many))
    assert got == [x * 10 for x in range(10)]
    assert all(2 <= len(b) <= 3 for b in bulk.bursts)  # never past the room, never one alone
    burst = [x for b in bulk.bursts for x in b]
    assert burst == sorted(burst) and len(burst) > 3  # in order, and more than one burst
    bulk.room = 1  # room for one: no burst, one at a time through submit
    bulk.bursts.clear()
    got = await _run_stream(range(5), OrderedWindow(5), svc, (bulk.room_now, bulk.submit_many))
    assert got == [x * 10 for x in range(5)] and bulk.bursts == []


async def test_items_taken_before_the_iterator_raises_are_admitted_then_the_error_raised():
    def source():
        yield from range(4)
        raise KeyError("source broke")

    svc = FakeService()
    bulk = FakeBulk(svc, room=8)
    with pytest.raises(KeyError, match="source broke"):
        await _run_stream(source(), OrderedWindow(8), svc, (bulk.room_now, bulk.submit_many))
    assert bulk.bursts == [[0, 1, 2, 3]]


async def test_an_unordered_window_takes_no_bursts():
    svc = FakeService()
    bulk = FakeBulk(svc, room=8)
    got = await _run_stream(range(6), UnorderedWindow(4), svc, (bulk.room_now, bulk.submit_many))
    assert sorted(got) == [x * 10 for x in range(6)] and bulk.bursts == []
