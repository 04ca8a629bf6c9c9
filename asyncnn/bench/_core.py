"""The bench's machinery: results, repeats, environment, verdicts, the report.

Every figure is a median of repeats, measured side by side with its baseline in the same run
(interleaved, after a warm-up), because these machines are shared and noisy: a ratio is what we
claim, never a bare absolute number.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .verdicts import Judgement, judge, paired_ratios

__all__ = [
    "Context",
    "Measure",
    "Row",
    "Workload",
    "against",
    "bounded",
    "environment",
    "percentile",
    "run_on_loop",
]


@dataclass
class Context:
    """What a workload needs to know about this run."""

    quick: bool
    repeats: int
    loop: str  # "asyncio" | "uvloop"
    device: str
    progress: Callable[..., None]  # progress(step, fraction=None)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measure:
    """One timed run of one system: ``items`` done in ``seconds``, optional latencies."""

    items: int
    seconds: float
    latencies: list[float] | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Row:
    """One line of the summary table."""

    workload: str
    system: str
    loop: str
    rate: float  # items or requests per second (median of repeats)
    rate_min: float
    rate_max: float
    unit: str = "items/s"
    p50_ms: float | None = None
    p99_ms: float | None = None
    ratio: float | None = None  # against the workload's baseline (higher is better)
    ratio_label: str = ""
    bound: float | None = None  # fraction of the ideal bound
    target: str = ""
    verdict: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """A named benchmark: ``run(ctx)`` returns its rows (baselines first)."""

    name: str
    summary: str
    run: Callable[[Context], list[Row]]
    needs_cuda: bool = False
    default: bool = True  # run without --workload


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summarize(
    workload: str,
    system: str,
    loop: str,
    runs: list[Measure],
    *,
    unit: str = "items/s",
    note: str = "",
) -> Row:
    """Median rate and spread over repeats; latencies pooled from the median run."""
    rates = [m.rate for m in runs]
    med = statistics.median(rates)
    row = Row(workload, system, loop, med, min(rates), max(rates), unit=unit, note=note)
    mid = sorted(runs, key=lambda m: m.rate)[len(runs) // 2]
    if mid.latencies:
        row.p50_ms = percentile(mid.latencies, 50) * 1e3
        row.p99_ms = percentile(mid.latencies, 99) * 1e3
    return row


def run_on_loop(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main()`` on a fresh event loop of the given kind."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def interleave(
    repeats: int,
    systems: dict[str, Callable[[], Measure]],
    progress: Callable[..., None],
    *,
    warm_up: bool = True,
    decided: Callable[[dict[str, list[Measure]]], bool] | None = None,
    most: int = 0,
    once: Sequence[str] = (),
) -> dict[str, list[Measure]]:
    """Warm every system up once (unless the caller did), then run them in turn ``repeats``
    times; while ``decided(runs)`` says the verdict is still within noise, add rounds, up to
    ``most`` in all. Systems named in ``once`` (slow references outside the verdict) are timed
    in the first round only, without a warm-up."""
    out: dict[str, list[Measure]] = {name: [] for name in systems}
    steps = len(systems) * (max(repeats, most) + int(warm_up))
    done = 0
    for name, fn in systems.items():
        if not warm_up:
            break
        if name not in once:
            progress(f"warm-up {name}", done / steps)
            fn()
        done += 1
    r = 0
    while r < repeats or (decided is not None and r < most and not decided(out)):
        for name, fn in systems.items():
            if r == 0 or name not in once:
                progress(f"{name} {r + 1}/{max(repeats, r + 1)}", done / steps)
                out[name].append(fn())
            done += 1
        r += 1
    progress("done", 1.0)
    return out


def record_stages(ctx: Context, workload: str, stats: Any) -> None:
    """Keep a run's per-stage figures (the last run wins) for the utilisation table and JSON."""
    key = f"{workload} ({ctx.loop})"
    ctx.options.setdefault("stage_stats", {})[key] = {
        name: asdict(s) | {"mean_batch_size": s.mean_batch_size} for name, s in stats.items()
    }


def format_stages(stage_stats: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per-stage utilisation: which stage is the bottleneck (the busiest)."""
    lines = [
        "| run | stage | runs on | items | batches | mean batch | busy | blocked s | "
        "p50 ms | p99 ms | peak queue |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, stages in stage_stats.items():
        busiest = max(stages.values(), key=lambda s: s["busy_fraction"])["name"] if stages else ""
        for name, s in stages.items():
            mark = " (bottleneck)" if name == busiest else ""
            lines.append(
                f"| {run} | {name}{mark} | {s['runs_on']} | {s['items']:,} | {s['batches']:,} | "
                f"{s['mean_batch_size']:.1f} | {s['busy_fraction']:.0%} | "
                f"{s['blocked_seconds']:.2f} | {s['latency_p50'] * 1e3:.2f} | "
                f"{s['latency_p99'] * 1e3:.2f} | {s['peak_queue_depth']}/{s['queue_capacity']} |"
            )
    return "\n".join(lines)


def bounded(rows: Sequence[Row], bound: float, note: str) -> None:
    """Each row's throughput as a fraction of ``bound`` (a rate), with the same note."""
    for row in rows:
        row.bound = row.rate / bound
        row.note = note


def against(row: Row, base: Row, label: str) -> float:
    """``row``'s throughput over ``base``'s, recorded on ``row``; returns the ratio."""
    row.ratio = row.rate / base.rate
    row.ratio_label = label
    return row.ratio


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


MOST_REPEATS = 5  # rounds a workload may add while its verdict is within noise


def ratios_of(runs: dict[str, list[Measure]], ours: str, base: str, cost: bool) -> list[float]:
    """Repeat by repeat, ours over the baseline: a rate ratio, or a cost ratio (``cost``). A
    baseline timed fewer times than ours (once: it is slow by design) counts as its median."""
    mine, theirs = [m.rate for m in runs[ours]], [m.rate for m in runs[base]]
    if len(theirs) != len(mine):
        theirs = [statistics.median(theirs)] * len(mine)
    return paired_ratios(theirs, mine) if cost else paired_ratios(mine, theirs)


def until_decided(
    ours: str, base: str, target: float, *, cost: bool = False
) -> Callable[[dict[str, list[Measure]]], bool]:
    """For ``interleave``: has the paired verdict of ``ours`` against ``base`` left the noise?"""

    def decided(runs: dict[str, list[Measure]]) -> bool:
        if not runs[ours]:
            return False
        return judge(ratios_of(runs, ours, base, cost), target, lower_is_better=cost).decided

    return decided


def paired_verdict(
    row: Row,
    runs: dict[str, list[Measure]],
    ours: str,
    base: str,
    target: float,
    *,
    cost: bool = False,
    label: str,
    goal: str,
) -> Judgement:
    """Judge ``ours`` against ``base`` repeat by repeat and write the verdict on ``row``."""
    j = judge(ratios_of(runs, ours, base, cost), target, lower_is_better=cost)
    row.ratio = j.ratio
    row.ratio_label = f"{label} (paired {j.low:.2f}–{j.high:.2f})"
    row.target = goal
    row.verdict = j.verdict
    return j


def timed(fn: Callable[[], Awaitable[int]]) -> Callable[[], Coroutine[Any, Any, Measure]]:
    async def run() -> Measure:
        t0 = time.perf_counter()
        n = await fn()
        return Measure(n, time.perf_counter() - t0)

    return run


def environment(loop: str, device: str) -> dict[str, Any]:
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loop": loop,
        "uvloop": uv,
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "device": device,
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
