"""Soak: 1,000,000 requests from 1,024 concurrent clients through a 4-stage pipeline with
batching, reporting RSS, live tasks and threads at intervals, and the final counters.

Run: python benchmarks/soak.py [--requests 1000000] [--clients 1024]   (make soak)

Pass: RSS flat within +-5% after warm-up (the first 10% of requests), no growth in tasks or
threads, and every request accounted for (admitted == completed + failed + cancelled).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time

import torch
import uvloop

from asyncnn import Batching, Pipeline, Stage
from asyncnn.bench.workloads_memory import rss_bytes


async def decode(x: torch.Tensor) -> torch.Tensor:
    return x


def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


def shift(x: torch.Tensor) -> torch.Tensor:
    return x + 1.0


async def encode(x: torch.Tensor) -> float:
    return float(x[0, 0])


async def soak(requests: int, clients: int) -> int:
    spec = Batching(max_size=128, max_delay=0.002)
    pipe = Pipeline(
        [
            Stage(decode),
            Stage(scale, batch=spec),
            Stage(shift, batch=spec),
            Stage(encode),
        ],
        queue_size=1024,
    )
    per_client = -(-requests // clients)  # at least `requests` in all
    done = 0
    wrong = 0
    samples: list[tuple[int, float, int, int]] = []
    warm = requests // 10
    next_report = warm

    async def client(c: int) -> None:
        nonlocal done, wrong, next_report
        x = torch.full((1, 4), float(c))
        for _ in range(per_client):
            y = await pipe.send(x)
            if y != c * 2.0 + 1.0:
                wrong += 1
            done += 1
            if done >= next_report:
                next_report += requests // 10
                samples.append(
                    (done, rss_bytes() / 2**20, len(asyncio.all_tasks()), threading.active_count())
                )
                print(
                    f"{done:>9,} requests  RSS {samples[-1][1]:7.1f} MB  tasks {samples[-1][2]:5}"
                    f"  threads {samples[-1][3]:3}",
                    flush=True,
                )

    t0 = time.perf_counter()
    async with pipe:
        await asyncio.gather(*(client(c) for c in range(clients)))
        st = pipe.stats()
    elapsed = time.perf_counter() - t0
    base = samples[0]
    rss = [s[1] for s in samples]
    drift = (max(rss) - min(rss)) / base[1]
    task_growth = max(s[2] for s in samples) - base[2]
    thread_growth = max(s[3] for s in samples) - base[3]
    accounted = st.admitted == st.completed + st.failed + st.cancelled and st.in_flight == 0
    ok = drift <= 0.05 and task_growth <= 0 and thread_growth <= 0 and accounted and not wrong
    print(
        f"\nsoak: {st.admitted:,} requests from {clients} clients in {elapsed:.0f} s "
        f"({st.admitted / elapsed:,.0f} req/s); completed {st.completed:,}, failed {st.failed}, "
        f"cancelled {st.cancelled}, in flight {st.in_flight}, wrong answers {wrong}\n"
        f"RSS after warm-up {base[1]:.1f} MB -> end {rss[-1]:.1f} MB (spread {drift:.1%}); "
        f"tasks {base[2]} -> {samples[-1][2]}; threads {base[3]} -> {samples[-1][3]}; "
        f"mean batch {st['scale'].mean_batch_size:.0f}\n{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=1024)
    args = ap.parse_args()
    return uvloop.run(soak(args.requests, args.clients))


if __name__ == "__main__":
    sys.exit(main())
