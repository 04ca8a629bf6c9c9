"""Workloads for the core runtime: ``overhead`` (per-hop cost) and ``reqresp`` (many callers)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..pipeline import Pipeline
from ..stage import Stage
from ._core import (
    MOST_REPEATS,
    Context,
    Measure,
    Row,
    interleave,
    paired_verdict,
    run_on_loop,
    summarize,
    until_decided,
)

__all__ = ["overhead", "reqresp"]

HOPS = 8
REQRESP_STAGES = 4
CLIENTS = 1024
OVERHEAD_TARGET = 0.75  # per-hop cost against the hand-written chain's (issue 17)
REQRESP_TARGET = 1.2  # throughput against hand-written queues + futures (issue 17)


async def _ident(x: Any) -> Any:
    return x


# -- overhead ------------------------------------------------------------------------------------


async def _hand_chain(n: int, check: bool = False) -> int:
    """What a user would write: asyncio.Queue between tasks, a sentinel to end."""
    stop = object()
    qs: list[asyncio.Queue[Any]] = [asyncio.Queue(64) for _ in range(HOPS + 1)]

    async def stage(i: int) -> None:
        qin, qout = qs[i], qs[i + 1]
        while True:
            x = await qin.get()
            if x is stop:
                await qout.put(stop)
                return
            await qout.put(await _ident(x))

    async def produce() -> None:
        for i in range(n):
            await qs[0].put(i)
        await qs[0].put(stop)

    tasks = [asyncio.ensure_future(stage(i)) for i in range(HOPS)]
    tasks.append(asyncio.ensure_future(produce()))
    count, last = 0, qs[HOPS]
    while True:
        x = await last.get()
        if x is stop:
            break
        if check and x != count:
            raise AssertionError(f"hand-written chain: item {count} came out as {x}")
        count += 1
    await asyncio.gather(*tasks)
    return count


async def _asyncnn_chain(n: int, check: bool = False) -> int:
    pipe = Pipeline([Stage(_ident, name=f"hop{i}") for i in range(HOPS)], queue_size=64)
    count = 0
    async with pipe:
        async for y in pipe.stream(range(n)):
            if check and y != count:
                raise AssertionError(f"asyncnn: item {count} came out as {y}")
            count += 1
    return count


def overhead(ctx: Context) -> list[Row]:
    n = 30_000 if ctx.quick else 100_000
    for fn in (_hand_chain, _asyncnn_chain):  # correctness before timing
        assert run_on_loop(ctx.loop, lambda fn=fn: fn(2_000, True)) == 2_000  # type: ignore[misc]

    def system(fn: Any) -> Measure:
        async def main() -> Measure:
            t0 = time.perf_counter()
            k = await fn(n)
            return Measure(k, time.perf_counter() - t0)

        return run_on_loop(ctx.loop, main)

    hand, ours_name = "hand-written asyncio.Queue chain", "asyncnn Pipeline.stream"
    runs = interleave(
        ctx.repeats,
        {hand: lambda: system(_hand_chain), ours_name: lambda: system(_asyncnn_chain)},
        ctx.progress,
        decided=until_decided(ours_name, hand, OVERHEAD_TARGET, cost=True),
        most=MOST_REPEATS,
    )
    base = summarize("overhead", hand, ctx.loop, runs[hand])
    ours = summarize("overhead", ours_name, ctx.loop, runs[ours_name])
    for row in (base, ours):
        row.note = f"{1e6 / row.rate / HOPS:.2f} µs/hop"
    paired_verdict(
        ours,
        runs,
        ours_name,
        hand,
        OVERHEAD_TARGET,
        cost=True,
        label="per-hop cost vs hand-written",
        goal=f"cost <= {OVERHEAD_TARGET}x hand-written",
    )
    return [base, ours]


# -- reqresp -------------------------------------------------------------------------------------


async def _hand_reqresp(total: int, clients: int, check: bool = False) -> Measure:
    """Hand-written request/response: queues of (x, future), a final task resolves futures."""
    loop = asyncio.get_running_loop()
    qs: list[asyncio.Queue[Any]] = [asyncio.Queue(64) for _ in range(REQRESP_STAGES + 1)]

    async def stage(i: int) -> None:
        qin, qout = qs[i], qs[i + 1]
        while True:
            x, fut = await qin.get()
            await qout.put((await _ident(x), fut))

    async def resolve() -> None:
        q = qs[REQRESP_STAGES]
        while True:
            y, fut = await q.get()
            if not fut.done():
                fut.set_result(y)

    async def send(x: Any) -> Any:
        fut = loop.create_future()
        await qs[0].put((x, fut))
        return await fut

    workers = [asyncio.ensure_future(stage(i)) for i in range(REQRESP_STAGES)]
    workers.append(asyncio.ensure_future(resolve()))
    try:
        return await _drive(send, total, clients, check)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _asyncnn_reqresp(total: int, clients: int, check: bool = False) -> Measure:
    pipe = Pipeline([Stage(_ident, name=f"s{i}") for i in range(REQRESP_STAGES)], queue_size=64)
    async with pipe:
        return await _drive(pipe.send, total, clients, check)


async def _drive(send: Any, total: int, clients: int, check: bool) -> Measure:
    per_client = total // clients
    lat: list[float] = []
    now = time.perf_counter

    async def client(c: int) -> None:
        for i in range(per_client):
            x = c * per_client + i
            t0 = now()
            y = await send(x)
            lat.append(now() - t0)
            if check and y != x:
                raise AssertionError(f"request {x} answered {y}")

    t0 = now()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return Measure(per_client * clients, now() - t0, lat)


def reqresp(ctx: Context) -> list[Row]:
    total = 25_600 if ctx.quick else 102_400
    clients = CLIENTS
    for fn in (_hand_reqresp, _asyncnn_reqresp):
        run_on_loop(ctx.loop, lambda fn=fn: fn(4 * clients, clients, True))  # type: ignore[misc]

    hand = "hand-written queues + futures"
    ours_name = "asyncnn await pipe.send()"
    runs = interleave(
        ctx.repeats,
        {
            hand: lambda: run_on_loop(ctx.loop, lambda: _hand_reqresp(total, clients)),
            ours_name: lambda: run_on_loop(ctx.loop, lambda: _asyncnn_reqresp(total, clients)),
        },
        ctx.progress,
        decided=until_decided(ours_name, hand, REQRESP_TARGET),
        most=MOST_REPEATS,
    )
    base = summarize("reqresp", hand, ctx.loop, runs[hand], unit="req/s")
    ours = summarize("reqresp", ours_name, ctx.loop, runs[ours_name], unit="req/s")
    paired_verdict(
        ours,
        runs,
        ours_name,
        hand,
        REQRESP_TARGET,
        label="throughput vs hand-written",
        goal=f">= {REQRESP_TARGET}x hand-written",
    )
    for row in (base, ours):
        row.note = f"{clients} clients, {REQRESP_STAGES} stages"
    return [base, ours]
