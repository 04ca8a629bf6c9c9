"""Snapshots of what a running pipeline has done: ``pipe.stats()``.

``stats()`` returns a :class:`PipelineStats`: a read-only mapping from stage name to
:class:`StageStats`, with the pipeline-wide request outcomes as attributes. Counts add up:
``admitted == completed + failed + cancelled + in_flight``. Built from the runtime's read-only
:class:`~asyncnn.runtime.RuntimeView`; exporters (``asyncnn.metrics``) take any :class:`HasStats`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .runtime import RuntimeView, StepStats
from .runtime.probe import SLACK_BOUNDS

__all__ = ["HasStats", "PipelineStats", "StageStats", "StepStats", "snapshot"]

_NO_MISSES = {"expired": 0, "hopeless": 0}


@dataclass(frozen=True)
class StageStats:
    """One stage's figures since the pipeline started.

    ``items`` counts requests the stage finished, ``batches`` the calls of its function (for a
    batching stage: the batches it formed and ran; ``retries`` counts apart the re-runs of parts
    of a failed batch), ``failures`` the calls that raised; ``queue_depth``/``peak_queue_depth``
    describe its input. A batching stage also counts ``rows`` and why each batch was released:
    ``released_full`` (max_size reached), ``released_preferred`` (cut to a preferred size),
    ``released_deadline`` (waiting longer would have cost its most urgent request the
    deadline), ``released_idle`` (``max_delay="auto"``: a runner was free and the batch keeps
    up), ``released_delay`` (the timer: max_delay passed, or one full batch's time under
    ``"auto"``), ``released_drain`` (the pipeline was closing).

    Deadlines (``send(x, timeout=...)``): ``deadline_misses`` counts the requests this stage
    ended with ``TimeoutError`` before computing them, by reason (``expired``: the deadline had
    passed; ``hopeless``: less time was left than a call takes); ``slack_p50``/``slack_p99``:
    seconds left to their deadline when a batching stage dispatched them (``slack_buckets``:
    ``(le, count)`` pairs, how many had at most ``le`` seconds left, as a Prometheus histogram's
    buckets, with ``slack_count`` and ``slack_sum``); and
    ``priority_inversions``: requests dispatched ahead of a more urgent waiting one (by aging,
    or a batch that could not hold the urgent request).

    ``busy_fraction``: the share of its workers' time spent inside calls since the pipeline
    started (on a GPU stage, overlapping batches can push it above 1); ``blocked_seconds``: time
    its workers waited for room downstream (backpressure); ``latency_p50/p90/p99``: seconds per
    call, from a compact histogram; ``running``: calls in progress now; ``retries_exhausted``:
    parts of failed batches that failed whole because ``Batching(max_retries=...)`` ran out. A
    padded batching stage also counts ``real_tokens`` (rows x each request's length) and
    ``padded_tokens`` (rows x the padded length of its batch); ``padding_waste`` is the share of
    padding in what it computed. A step stage (``step=``) has ``stepping``: its
    :class:`StepStats` (steps/s, mean active requests and admissions per step, time to first
    output and between outputs).
    """

    name: str
    runs_on: str
    workers: int
    items: int
    batches: int
    failures: int
    queue_depth: int
    peak_queue_depth: int
    queue_capacity: int
    rows: int = 0
    retries: int = 0
    released_full: int = 0
    released_delay: int = 0
    released_drain: int = 0
    released_preferred: int = 0
    released_deadline: int = 0
    released_idle: int = 0
    busy_fraction: float = 0.0
    blocked_seconds: float = 0.0
    latency_p50: float = 0.0
    latency_p90: float = 0.0
    latency_p99: float = 0.0
    running: int = 0
    retries_exhausted: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    stepping: StepStats | None = None
    deadline_misses: dict[str, int] = field(default_factory=lambda: dict(_NO_MISSES))
    slack_p50: float = 0.0
    slack_p99: float = 0.0
    slack_buckets: tuple[tuple[float, int], ...] = ()
    slack_count: int = 0
    slack_sum: float = 0.0
    priority_inversions: int = 0

    @property
    def padding_waste(self) -> float:
        """A padded stage: the share of the tokens it computed that were padding (0: none)."""
        if not self.padded_tokens:
            return 0.0
        return 1.0 - self.real_tokens / self.padded_tokens

    @property
    def mean_batch_size(self) -> float:
        """Mean rows per batch for a batching stage; mean requests per call otherwise."""
        if not self.batches:
            return 0.0
        return (self.rows or self.items) / self.batches


@dataclass(frozen=True, eq=False)
class PipelineStats(Mapping[str, StageStats]):
    """Per-stage snapshots by name, plus ``admitted``, ``completed``, ``failed``, ``cancelled``
    and ``in_flight`` for the whole pipeline, and ``run``: which run of the pipeline they
    describe (1 for the first start, 2 after a restart, ...; 0 before any start).
    ``timed_out``: the cancelled requests that their deadline ended (``TimeoutError``);
    ``overloaded``: requests refused at admission with ``Overloaded`` (never admitted)."""

    _stages: dict[str, StageStats]
    admitted: int
    completed: int
    failed: int
    cancelled: int
    in_flight: int
    run: int = 0
    timed_out: int = 0
    overloaded: int = 0

    def __getitem__(self, name: str) -> StageStats:
        try:
            return self._stages[name]
        except KeyError:
            raise KeyError(f"no stage named {name!r}; stages are {list(self._stages)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)

    def __repr__(self) -> str:
        return (
            f"<PipelineStats admitted={self.admitted} completed={self.completed} "
            f"failed={self.failed} cancelled={self.cancelled} in_flight={self.in_flight} "
            f"run={self.run} stages={list(self._stages)}>"
        )


class HasStats(Protocol):
    """Anything with a ``stats()`` snapshot (a ``Pipeline``): what metrics exporters take."""

    def stats(self) -> PipelineStats: ...


def snapshot(view: RuntimeView, run: int = 0) -> PipelineStats:
    """``stats()`` from the runtime's read-only view of run number ``run``."""
    stages: dict[str, StageStats] = {}
    for s in view.stages:
        busy = s.busy / (view.elapsed * s.workers) if view.elapsed else 0.0
        stages[s.name] = StageStats(
            name=s.name,
            runs_on=s.runs_on,
            workers=s.workers,
            items=s.items,
            batches=s.batches,
            failures=s.failures,
            queue_depth=s.inbox.depth,
            peak_queue_depth=s.inbox.peak_depth,
            queue_capacity=s.inbox.capacity,
            rows=s.rows,
            retries=s.retries,
            released_full=s.released["full"],
            released_delay=s.released["delay"],
            released_drain=s.released["drain"],
            busy_fraction=busy,
            blocked_seconds=s.blocked,
            latency_p50=s.latency[0],
            latency_p90=s.latency[1],
            latency_p99=s.latency[2],
            running=s.running,
            retries_exhausted=s.retries_exhausted,
            real_tokens=s.real_tokens,
            padded_tokens=s.padded_tokens,
            stepping=s.stepping,
            released_preferred=s.released["preferred"],
            released_deadline=s.released["deadline"],
            released_idle=s.released["idle"],
            deadline_misses=dict(s.misses or _NO_MISSES),
            slack_p50=s.slack[0] if s.slack else 0.0,
            slack_p99=s.slack[1] if s.slack else 0.0,
            slack_buckets=tuple(zip(SLACK_BOUNDS, s.slack_buckets, strict=True)),
            slack_count=s.slack_count,
            slack_sum=s.slack_sum,
            priority_inversions=s.inversions,
        )
    return PipelineStats(
        stages,
        view.admitted,
        view.completed,
        view.failed,
        view.cancelled,
        view.in_flight,
        run,
        view.timed_out,
        view.overloaded,
    )
