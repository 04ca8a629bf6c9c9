"""What stopped the event loop during a timed run, measured without adding work to it.

A request's deadline can only be kept as well as its loop keeps time: the loop ends a request
late when it was stopped, by the garbage collector (a stop-the-world pass over the live young
objects: every request in flight holds a dozen of them), or by the operating system (the loop's
thread waiting for a core held by compute threads). :class:`LoopWatch` records both around a
run, on the thread it was entered on: the collector's passes (``gc.callbacks``, their longest
and their sum), the thread's CPU time, and how often the kernel took the core from it
(involuntary context switches, ``getrusage(RUSAGE_THREAD)``, where the platform has it). It runs
nothing on the loop, so the run it watches is the run it reports.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType
from typing import Any

__all__ = ["LoopWatch"]

try:  # Linux: per-thread counts
    import resource

    _THREAD = getattr(resource, "RUSAGE_THREAD", None)
except ImportError:  # pragma: no cover - not on Linux
    resource = None  # type: ignore[assignment]
    _THREAD = None


def _cpu_ticks() -> tuple[int, int] | None:
    """(ticks stolen by the hypervisor, all ticks) over every CPU since boot, from
    ``/proc/stat`` (Linux); None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def _switches() -> int | None:
    if resource is None or _THREAD is None:
        return None
    return int(resource.getrusage(_THREAD).ru_nivcsw)


class LoopWatch:
    """``with LoopWatch() as w: ...`` on the loop's thread; then ``w.gc_longest`` and
    ``w.gc_total`` (seconds the collector stopped the thread: its longest pass, all of them),
    ``w.gc_passes``, ``w.cpu`` (the thread's CPU seconds), ``w.preempted`` (times the kernel
    took its core while it could run; ``None`` where unknown), ``w.stolen`` (the share of
    the machine's CPU time the hypervisor gave to other guests meanwhile: a virtual machine
    slowed by its neighbours; ``None`` where unknown) and ``w.seconds`` (wall)."""

    __slots__ = (
        "_cpu0",
        "_st0",
        "_started",
        "_sw0",
        "_t0",
        "cpu",
        "gc_longest",
        "gc_passes",
        "gc_total",
        "preempted",
        "seconds",
        "stolen",
    )

    def __init__(self) -> None:
        self.gc_longest = self.gc_total = self.cpu = self.seconds = 0.0
        self.gc_passes = 0
        self.preempted: int | None = None
        self.stolen: float | None = None
        self._st0: tuple[int, int] | None = None
        self._started = 0.0
        self._t0 = self._cpu0 = 0.0
        self._sw0: int | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.gc_passes += 1
        self.gc_total += took
        self.gc_longest = max(self.gc_longest, took)

    def __enter__(self) -> LoopWatch:
        self._t0, self._cpu0, self._sw0 = time.perf_counter(), time.thread_time(), _switches()
        self._st0 = _cpu_ticks()
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gc.callbacks.remove(self._on_gc)
        self.seconds = time.perf_counter() - self._t0
        self.cpu = time.thread_time() - self._cpu0
        after = _switches()
        self.preempted = None if after is None or self._sw0 is None else after - self._sw0
        ticks = _cpu_ticks()
        if ticks is not None and self._st0 is not None and ticks[1] > self._st0[1]:
            self.stolen = (ticks[0] - self._st0[0]) / (ticks[1] - self._st0[1])

    def describe(self) -> str:
        """One line for a report: the loop's CPU share, the kernel's and the collector's stops,
        and the CPU the hypervisor took (where known)."""
        share = self.cpu / self.seconds if self.seconds else 0.0
        kernel = "" if self.preempted is None else f", preempted {self.preempted} times"
        stolen = "" if self.stolen is None else f"; {self.stolen:.0%} of the CPU stolen"
        return (
            f"loop {share:.0%} of a core{kernel}; collector {self.gc_passes} passes, "
            f"longest {self.gc_longest * 1e3:.1f} ms{stolen}"
        )
