"""The ``remote`` workload: the ``files`` samples behind a local HTTP server (its own process)
that answers each read after 20 ms, as object storage would; batched by 64, without and with
the MLP. AsyncLoader fetching with aiohttp on the loop (the README's remote setting:
``fetch=``, ``concurrency=64``), and with its defaults on the same sync dataset that DataLoader
gets (one ``httpx.Client`` per process), against DataLoader with num_workers 0, 1, 2 and 4 (the
best one is the baseline; it can only hide latency with processes) and torchdata.nodes as its
docs advise for I/O (a thread ParallelMapper, 64 threads: as many reads in flight as ours).

aiohttp, not httpx, on the async side: ``httpx.AsyncClient`` spent 7 ms of CPU per request
with 64 requests in flight on the 2-core VM (136 requests/s against this server; aiohttp:
0.3 ms, 1,511 requests/s), a known limit of its connection pool (encode/httpx#3215)."""

from __future__ import annotations

import functools
import gc
import io
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..loader import AsyncLoader
from ._core import Context, Row
from .loaders_compare import BATCH, compare, consume, dataloaders, ours
from .models import bench_mlp
from .sample_server import sample_server
from .workloads_files import WIDTH, write_samples

__all__ = ["remote"]

LATENCY_S = 0.020
CONCURRENCY = 64
ONE_AT_A_TIME = ("DataLoader(num_workers=0)", "DataLoader(num_workers=1)")  # timed once: ~11 s
TORCHDATA_THREADS = CONCURRENCY  # the same reads in flight as ours
ASYNC = f"asyncnn AsyncLoader(fetch=aiohttp, concurrency={CONCURRENCY})"
DEFAULTS = "asyncnn AsyncLoader (defaults, sync dataset)"
TORCHDATA = f"torchdata.nodes ParallelMapper(thread, {TORCHDATA_THREADS} workers)"


def _decode(content: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(content)))


class HttpSamples(torch.utils.data.Dataset[torch.Tensor]):
    """A sync ``__getitem__`` reading sample ``i`` over HTTP, with one keep-alive client per
    process (a client must not cross a fork)."""

    def __init__(self, base: str, n: int) -> None:
        self.base, self.n = base, n
        self._clients: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "n": self.n, "_clients": {}}

    def close(self) -> None:
        """Close this process's client (worker processes' end with them)."""
        client = self._clients.pop(os.getpid(), None)
        if client is not None:
            client.close()

    def __getitem__(self, i: int) -> torch.Tensor:
        import httpx

        client = self._clients.get(os.getpid())
        if client is None:
            client = self._clients[os.getpid()] = httpx.Client(base_url=self.base, timeout=30)
        try:
            r = client.get(f"/{i}")
        except httpx.TransportError:
            # A kept-alive connection the server dropped between two reads (seen on a busy
            # machine): one retry on a fresh connection, as urllib3 does for a GET.
            r = client.get(f"/{i}")
        r.raise_for_status()
        return _decode(r.content)


async def _async_batches(base: str, n: int) -> AsyncIterator[torch.Tensor]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def fetch(i: int) -> torch.Tensor:
            async with session.get(f"/{i}") as r:
                r.raise_for_status()
                return _decode(await r.read())

        loader = AsyncLoader(range(n), batch_size=BATCH, concurrency=CONCURRENCY, fetch=fetch)
        async for batch in loader:
            yield batch


def _torchdata(ds: Any, model: Any, sink: Any = None) -> int:
    import torchdata.nodes as tn

    node: Any = tn.SamplerWrapper(torch.utils.data.SequentialSampler(range(len(ds))))
    node = tn.ParallelMapper(node, ds.__getitem__, num_workers=TORCHDATA_THREADS, method="thread")
    node = tn.Batcher(node, batch_size=BATCH, drop_last=False)
    node = tn.Mapper(node, torch.stack)
    node = tn.Prefetcher(node, prefetch_factor=2)
    rows = consume(tn.Loader(node), model, sink)
    # Its iterators end in reference cycles: collect them here, or the next forked worker (any
    # system's) would find them, and their finalizers complain there.
    gc.collect()
    return rows


def _systems(ctx: Context, ds: HttpSamples, model: Any) -> dict[str, Any]:
    base, n = ds.base, ds.n
    systems: dict[str, Any] = dataloaders(ds, model)
    try:
        import torchdata.nodes  # noqa: F401

        systems[TORCHDATA] = functools.partial(_torchdata, ds, model)
    except ImportError:
        pass
    systems[ASYNC] = ours(ctx, lambda: _async_batches(base, n), model)
    systems[DEFAULTS] = ours(ctx, lambda: AsyncLoader(ds, batch_size=BATCH), model)
    return systems


def _reference(folder: Path, model: Any, k: int) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.load(folder / f"{i}.npy")) for i in range(k)])
    with torch.inference_mode():
        return model(x) if model is not None else x


def _build(
    ctx: Context, base: str, model: Any, opened: list[HttpSamples], k: int
) -> dict[str, Any]:
    opened.append(HttpSamples(base, k))
    return _systems(ctx, opened[-1], model)


def remote(ctx: Context) -> list[Row]:
    n = 128 if ctx.quick else 512
    model = bench_mlp()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="asyncnn-remote-") as tmp:
        folder = Path(tmp)
        write_samples(folder, n, "npy")
        note = (
            f"{n:,} .npy samples of {WIDTH} float32 over HTTP, "
            f"{LATENCY_S * 1e3:.0f} ms a read, batch {BATCH}"
        )
        with sample_server(folder, LATENCY_S) as base:
            for label, m in (("", None), ("+MLP", model)):
                opened: list[HttpSamples] = []
                try:
                    rows += compare(
                        ctx,
                        f"remote{label}",
                        functools.partial(_build, ctx, base, m, opened),
                        functools.partial(_reference, folder, m),
                        n,
                        [ASYNC, DEFAULTS],
                        3.0,
                        note,
                        checked=128,
                        once=ONE_AT_A_TIME,
                    )
                finally:
                    for ds in opened:
                        ds.close()
    return rows
