"""A read-only picture of a running pipeline, for ``stats()`` and the stall watchdog."""

from __future__ import annotations

from dataclasses import dataclass

from ..channels import ChannelStatistics

__all__ = ["RuntimeView", "StageView", "StepStats"]


@dataclass(frozen=True)
class StepStats:
    """A step stage's figures: steps run and per second, mean requests per step, mean
    admissions per step, and seconds from a request's arrival at the stage to its first output
    and between its outputs (p50/p99, over every request)."""

    steps: int
    steps_per_second: float
    mean_active: float
    admissions_per_step: float
    first_output_p50: float
    first_output_p99: float
    output_gap_p50: float
    output_gap_p99: float


@dataclass(frozen=True)
class StageView:
    name: str
    kind: str  # plain, placed, batched, yielding or stepped
    runs_on: str
    workers: int  # worker tasks, or replicas for a Ray stage
    inbox: ChannelStatistics
    items: int
    batches: int
    failures: int
    rows: int
    retries: int
    released: dict[str, int]
    busy: float  # seconds inside calls (a stage timing a sample of its calls: estimated)
    timed: int  # calls timed
    blocked: float
    running: int
    latency: tuple[float, float, float]  # p50, p90, p99 seconds
    retries_exhausted: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    stepping: StepStats | None = None
    misses: dict[str, int] | None = None  # deadline misses before compute, by reason
    slack: tuple[float, float] | None = None  # p50, p99 seconds to the deadline at dispatch
    # Requests dispatched with a deadline: how many had at most each of probe.SLACK_BOUNDS
    # seconds left, all of them, and the sum of their seconds left.
    slack_buckets: tuple[int, ...] = ()
    slack_count: int = 0
    slack_sum: float = 0.0
    inversions: int = 0


@dataclass(frozen=True)
class RuntimeView:
    stages: tuple[StageView, ...]
    admitted: int
    completed: int
    failed: int
    cancelled: int
    in_flight: int
    elapsed: float  # seconds since the run started; 0 before it
    timed_out: int = 0  # of the cancelled: ended by their deadline
    overloaded: int = 0  # refused at admission with Overloaded
