"""What tracing costs per request: a 4-stage chain streamed with tracing off and on (the SDK's
in-memory exporter), interleaved, repeated; prints µs per request and the difference.

    python benchmarks/tracing_cost.py [--items 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asyncnn import Pipeline, Stage


def ident(x: int) -> int:
    return x


async def run(items: int, tracer: object) -> float:
    stages = [Stage(ident, name=f"s{i}", executor="inline") for i in range(4)]
    async with Pipeline(stages, tracing=tracer or False) as pipe:
        t0 = time.perf_counter()
        n = 0
        async for _ in pipe.stream(range(items)):
            n += 1
        assert n == items
        return (time.perf_counter() - t0) / items


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("cost")
    off, on = [], []
    for _ in range(args.repeats):
        off.append(asyncio.run(run(args.items, None)))
        on.append(asyncio.run(run(args.items, tracer)))
        exporter.clear()
    f_off, f_on = statistics.median(off) * 1e6, statistics.median(on) * 1e6
    print(
        f"4 stages, {args.items} requests, {args.repeats} interleaved repeats: tracing off "
        f"{f_off:.1f} µs/request ({min(off) * 1e6:.1f}–{max(off) * 1e6:.1f}), on "
        f"{f_on:.1f} µs/request ({min(on) * 1e6:.1f}–{max(on) * 1e6:.1f}): +{f_on - f_off:.1f} "
        "µs per request (5 spans: the request and 4 stages)"
    )


if __name__ == "__main__":
    main()
