"""Device placement behind one seam: where a stage's tensors live and how its work completes.

A stage with ``device=`` gets one :class:`Device` per worker. ``launch(call, payload)`` runs on
the stage's own thread: it moves the inputs to the device, runs the call, and (when the result must
leave the device) starts the copy back to pinned host memory; it returns the output and a
:class:`Completion`. The loop awaits the completion through a waiter thread, never by
synchronising on its own thread.

- :class:`CpuDevice`: everything is done when ``launch`` returns.
- :class:`CudaDevice`: three streams per worker. Host-to-device copies run on a copy stream from
  pinned memory (``non_blocking=True``), kernels on a compute stream, device-to-host copies on a
  third; the streams are ordered by CUDA events (``wait_event``), not by host syncs. While one batch
  computes, the next one's upload and the previous one's download proceed.

Tensor lifetime: the caching allocator may hand a block back out as soon as its Python tensor
dies, even while another stream still reads it. We keep every tensor a batch touched (pinned
input, device input, device output, pinned output) referenced by its ``Completion`` until the last
event of that batch has completed, rather than calling ``record_stream``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import torch

__all__ = [
    "Completion",
    "CpuDevice",
    "CudaDevice",
    "Device",
    "make_device",
    "map_tensors",
    "open_device",
    "parse_device",
    "usable_cores",
]


def parse_device(device: str | torch.device, where: str) -> torch.device:
    """``torch.device(device)`` with an error that names the stage and the accepted forms."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{where}: device={device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or a "
            "torch.device"
        ) from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device={device!r}: only cpu and cuda devices are supported")
    return dev


def map_tensors(payload: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a tensor, tuple, list or dict (nested); other values stay."""
    if isinstance(payload, torch.Tensor):
        return fn(payload)
    if isinstance(payload, tuple):
        items = (map_tensors(p, fn) for p in payload)
        return type(payload)(*items) if hasattr(payload, "_fields") else tuple(items)
    if isinstance(payload, list):
        return [map_tensors(p, fn) for p in payload]
    if isinstance(payload, dict):
        return {k: map_tensors(v, fn) for k, v in payload.items()}
    return payload


class Completion:
    """The end of one launched batch: ``event`` (None when already done) and what it keeps alive."""

    __slots__ = ("event", "keep")

    def __init__(self, event: Any | None, keep: tuple[Any, ...] = ()) -> None:
        self.event = event
        self.keep = keep

    @property
    def done(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        """Block until done. Call it on a waiter thread, never on the event loop's thread."""
        if self.event is not None:
            self.event.synchronize()
        self.keep = ()

    def release(self) -> None:
        """The batch is done: let go of the tensors kept alive for its streams."""
        self.keep = ()


class Device(Protocol):
    """What a placed stage needs from its hardware."""

    device: torch.device

    def place(self, fn: Any) -> Any:
        """Move a module (or leave a function) onto the device; runs on the stage's thread."""
        ...

    def launch(
        self, call: Callable[..., Any], args: tuple[Any, ...], to_host: bool
    ) -> tuple[Any, Completion]:
        """Run ``call(*args)`` with inputs on the device; return (output, completion)."""
        ...


class _Placed:
    """Shared by the devices: a module moves onto the device, a function stays as it is."""

    device: torch.device

    def place(self, fn: Any) -> Any:
        return fn.to(self.device) if isinstance(fn, torch.nn.Module) else fn


class CpuDevice(_Placed):
    """The host: moves inputs to the CPU if they are elsewhere; work is done on return."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def launch(
        self, call: Callable[..., Any], args: tuple[Any, ...], to_host: bool
    ) -> tuple[Any, Completion]:
        dev = self.device
        args = map_tensors(args, lambda t: t if t.device == dev else t.to(dev))
        return call(*args), Completion(None)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_pinned() else t.pin_memory()


class CudaDevice(_Placed):
    """One worker's CUDA streams: upload, compute, download, ordered by events.

    Set the class attribute ``record_timeline = True`` (tests, profiling) to keep, per batch, timing
    events around each phase in ``timeline``: ``(phase, start_event, end_event)``.
    """

    record_timeline = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.h2d = torch.cuda.Stream(device)
        self.compute = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self.timeline: list[tuple[str, Any, Any]] = []

    def _mark(self, stream: Any) -> Any:
        if not self.record_timeline:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _span(self, phase: str, start: Any, stream: Any) -> None:
        if start is not None:
            self.timeline.append((phase, start, self._mark(stream)))

    def launch(
        self, call: Callable[..., Any], args: tuple[Any, ...], to_host: bool
    ) -> tuple[Any, Completion]:
        dev = self.device
        with torch.cuda.device(dev):
            host = map_tensors(args, lambda t: _pinned(t) if t.device.type == "cpu" else t)
            with torch.cuda.stream(self.h2d):
                # Inputs from another device (a previous stage on another GPU) were completed
                # before they reached us, so a plain non-blocking copy is ordered correctly.
                t0 = self._mark(self.h2d)
                x = map_tensors(host, lambda t: t.to(dev, non_blocking=True))
                self._span("h2d", t0, self.h2d)
                uploaded = torch.cuda.Event()
                uploaded.record(self.h2d)
            self.compute.wait_event(uploaded)
            with torch.cuda.stream(self.compute):
                t0 = self._mark(self.compute)
                y = call(*x)
                self._span("compute", t0, self.compute)
                computed = torch.cuda.Event()
                computed.record(self.compute)
            if not to_host:
                return y, Completion(computed, (host, x, y))
            self.d2h.wait_event(computed)
            with torch.cuda.stream(self.d2h):
                t0 = self._mark(self.d2h)
                out = map_tensors(y, _download)
                self._span("d2h", t0, self.d2h)
                downloaded = torch.cuda.Event()
                downloaded.record(self.d2h)
            return out, Completion(downloaded, (host, x, y, out))


def _download(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    buf.copy_(t, non_blocking=True)
    return buf


def make_device(device: torch.device) -> Device:
    """The implementation for ``device``: the one place that branches on the device type."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {str(device)!r} was asked for but CUDA is not available here; "
                "use device='cpu' or run on a machine with a GPU"
            )
        return CudaDevice(device)
    return CpuDevice(device)


def open_device(device: torch.device, fn: Any) -> Device:
    """The device for a placed stage, with ``fn`` moved onto it. Call it on the stage's thread:
    creating streams and moving a module may block for a while."""
    impl = make_device(device)
    impl.place(fn)
    return impl


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says; else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
