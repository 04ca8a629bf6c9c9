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


@pytest.mark.parametrize("ordered", [True, False])
async def test_stream_yields_every_result_and_cancels_what_is_left_when_left_early(ordered):
    svc = FakeService()
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
    window = OrderedWindow(4) if ordered else UnorderedWindow(4)
    got = []
    gen = stream(range(100), svc.submit, lambda: window, start_feeder, False)
    async for y in gen:
        got.append(y)
        if len(got) == 10:
            break
    await gen.aclose()
    res.cancel()
    await asyncio.gather(*tasks, res, return_exceptions=True)
    assert len(got) == 10 and (not ordered or got == [x * 10 for x in range(10)])
    assert svc.peak <= 4
    assert all(f.done() for f in svc.futures.values())  # results or cancelled, none pending
