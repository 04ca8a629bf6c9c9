"""Samples behind a network: an async HTTP fetch per sample, many in flight, batched in order.

Run: python examples/remote_loader.py [N_SAMPLES] [LATENCY_MS]
     (needs httpx: from a checkout, pip install -e ".[examples]")

- A small HTTP file server (standard library, on 127.0.0.1, a free port) stands for object
  storage: every response is delayed by LATENCY_MS, as a remote read would be.
- The loader fetches with ``httpx.AsyncClient`` on the event loop: up to ``concurrency`` reads
  wait at once, so the latency is paid in parallel instead of once per sample.
- A failing read (here: a missing sample) names its index; ``on_error="skip"`` leaves it out.
- The server runs in this process and shares its interpreter (and GIL) with the loader, so the
  rate printed is lower than against a store on another machine; it still beats one read at a
  time by the concurrency the latency allows.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import torch

import asyncnn

FEATURES = 16


def sample(i: int) -> torch.Tensor:
    return torch.full((FEATURES,), float(i))


@contextmanager
def sample_server(n: int, latency_s: float) -> Iterator[str]:
    """Serve samples 0..n-1 at ``/<i>`` (raw float32 bytes), each after ``latency_s``; yields
    the base URL. Index n and above answer 404."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections
        # Headers and body are two writes: without this, Nagle's algorithm holds the body
        # until the client's delayed ACK (40 ms) on a kept-alive connection.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            time.sleep(latency_s)
            i = int(self.path.strip("/"))
            if not 0 <= i < n:
                self.send_error(404, f"no sample {i}")
                return
            body = sample(i).numpy().tobytes()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # the default (5) would refuse most of 64 reads at once

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="sample-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def load(base: str, n: int, **loader_options: object) -> list[torch.Tensor]:
    """Every sample 0..n-1, fetched over HTTP, in batches of 32 in index order."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:

        async def fetch(i: int) -> torch.Tensor:
            r = await client.get(f"/{i}")
            r.raise_for_status()
            return torch.frombuffer(bytearray(r.content), dtype=torch.float32)

        loader = asyncnn.AsyncLoader(
            range(n), batch_size=32, concurrency=64, fetch=fetch, **loader_options
        )
        return [batch async for batch in loader]


async def main(n: int = 512, latency_ms: float = 20.0) -> list[torch.Tensor]:
    with sample_server(n, latency_ms / 1000) as base:
        t0 = time.perf_counter()
        batches = await load(base, n)
        took = time.perf_counter() - t0
    print(
        f"{n} samples, {latency_ms:.0f} ms each, in {took:.2f} s: {n / took:,.0f} samples/s "
        f"(one at a time: {1000 / latency_ms:,.0f} samples/s)"
    )
    return batches


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:3]]
    asyncio.run(main(int(args[0]) if args else 512, args[1] if len(args) > 1 else 20.0))
