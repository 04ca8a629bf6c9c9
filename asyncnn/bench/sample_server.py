"""A local file server standing for object storage: ``GET /<i>`` answers the bytes of
``<folder>/<i>.npy`` after ``latency_ms``, as a remote read would. ``sample_server()`` runs it
in its own process (so that it does not share the measured loaders' interpreter); it prints its
port on the first line of stdout and stops when its stdin closes (when the bench that started
it ends, however it ends). Standard library only; loopback only.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["sample_server", "serve"]


def serve(folder: str, latency_ms: str) -> None:
    """The server's process: serve until stdin closes."""
    _serve(Path(folder), float(latency_ms) / 1e3)


def _serve(folder: Path, latency_s: float) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
        # Headers and body are two writes: without this, Nagle's algorithm holds the body
        # until the client's delayed ACK (40 ms) on a kept-alive connection.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            time.sleep(latency_s)
            name = self.path.strip("/")
            path = folder / f"{name}.npy"
            if not name.isdigit() or not path.is_file():
                self.send_error(404, f"no sample {name}")
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512  # the default (5) would refuse most of 64 reads at once

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.shutdown()
    server.server_close()


@contextmanager
def sample_server(folder: Path, latency_s: float) -> Iterator[str]:
    """Start the server in a child process; yields its base URL; stops it on exit."""
    code = "import sys; from asyncnn.bench.sample_server import serve; serve(*sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder), str(latency_s * 1e3)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the sample server did not start (it printed {port!r})")
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
