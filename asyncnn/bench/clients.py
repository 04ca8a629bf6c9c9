"""Many callers awaiting one service: the load that the serving workload and its peers share."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from ._core import Measure

__all__ = ["CLIENTS", "MAX_DELAY", "MAX_SIZE", "drive"]

CLIENTS = 512  # concurrent callers
MAX_SIZE = 256  # the batching policy every system under test gets
MAX_DELAY = 0.002


async def drive(send: Any, rows: list[torch.Tensor], clients: int, total: int) -> Measure:
    """``clients`` callers, each awaiting ``send(row)`` in turn, ``total`` calls in all."""
    per_client = total // clients
    lat: list[float] = []
    now = time.perf_counter

    async def client(c: int) -> None:
        for i in range(per_client):
            x = rows[(c * per_client + i) % len(rows)]
            t0 = now()
            await send(x)
            lat.append(now() - t0)

    t0 = now()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return Measure(per_client * clients, now() - t0, lat)
