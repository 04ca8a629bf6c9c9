"""Sweep Batching(max_size, max_delay) on the serving workload: throughput and latency per cell.

Run: python benchmarks/sweep_batching.py [--clients 512] [--requests 20480]
Bounded: 9 cells x ~1-3 s each on the 2-core VM. Prints one table; every cell is measured in the
same process, one after another, after a warm-up (compare cells, not machines).
"""

from __future__ import annotations

import argparse
import time

import torch
import uvloop

from asyncnn import Batching, Pipeline, Stage
from asyncnn.bench._core import percentile
from asyncnn.bench.models import bench_mlp
from asyncnn.bench.workloads_serving import _drive


async def cell(model, rows, clients, total, max_size, max_delay):
    pipe = Pipeline(
        [Stage(model, name="model", batch=Batching(max_size=max_size, max_delay=max_delay))],
        queue_size=clients,
    )
    async with pipe:
        m = await _drive(pipe.send, rows, clients, total)
        mean = pipe.stats()["model"].mean_batch_size
    return m, mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=512)
    ap.add_argument("--requests", type=int, default=20_480)
    args = ap.parse_args()
    model = bench_mlp()
    rows = [torch.randn(1, 512) for _ in range(64)]
    uvloop.run(cell(model, rows, args.clients, args.clients * 4, 64, 0.002))  # warm-up
    print(f"serving sweep: {args.clients} clients x 1 row, {args.requests} requests per cell")
    print("| max_size | max_delay ms | req/s | mean batch | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for max_size in (16, 64, 256):
        for max_delay in (0.0005, 0.002, 0.005):
            m, mean = uvloop.run(
                cell(model, rows, args.clients, args.requests, max_size, max_delay)
            )
            lat = m.latencies or [0.0]
            print(
                f"| {max_size} | {max_delay * 1e3:.1f} | {m.rate:,.0f} | {mean:.0f} | "
                f"{percentile(lat, 50) * 1e3:.1f} | {percentile(lat, 99) * 1e3:.1f} |",
                flush=True,
            )
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
