"""The ``memory`` workload: a long stream keeps memory flat (bounded queues, no leaks)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ..pipeline import Pipeline
from ..stage import Stage
from ._core import Context, Measure, Row, run_on_loop, summarize, verdict

__all__ = ["memory", "rss_bytes"]

LIMIT_MB = 50.0


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def _inc(x: Any) -> Any:
    return x + 1


def memory(ctx: Context) -> list[Row]:
    n = 200_000 if ctx.quick else 400_000

    async def run() -> Measure:
        pipe = Pipeline([Stage(_inc, name=f"s{i}") for i in range(4)], queue_size=64)
        peak = base = rss_bytes()
        count = 0
        t0 = time.perf_counter()
        async with pipe:
            async for y in pipe.stream(range(n)):
                if y != count + 4:
                    raise AssertionError(f"memory: item {count} came out as {y}")
                count += 1
                if count % 10_000 == 0:
                    peak = max(peak, rss_bytes())
                    ctx.progress(f"{count:,}/{n:,} items, RSS +{(peak - base) / 2**20:.1f} MB")
                    await asyncio.sleep(0)
        m = Measure(count, time.perf_counter() - t0)
        m.extra["growth_mb"] = (peak - base) / 2**20
        return m

    run_on_loop(ctx.loop, run)  # warm-up: first-touch allocations do not count as growth
    m = run_on_loop(ctx.loop, run)
    row = summarize("memory", "asyncnn Pipeline.stream, 4 stages", ctx.loop, [m])
    growth = m.extra["growth_mb"]
    row.target = f"peak RSS growth <= {LIMIT_MB:.0f} MB"
    row.verdict = verdict(growth <= LIMIT_MB)
    row.note = f"{n:,} items; peak RSS growth {growth:.1f} MB"
    ctx.options.setdefault("figures", {})["memory_growth_mb"] = growth
    return [row]
