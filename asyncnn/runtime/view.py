"""A read-only picture of a running pipeline, for ``stats()`` and the stall watchdog."""

from __future__ import annotations

from dataclasses import dataclass

from ..channels import ChannelStatistics

__all__ = ["RuntimeView", "StageView"]


@dataclass(frozen=True)
class StageView:
    name: str
    kind: str  # plain, placed or batched
    runs_on: str
    workers: int  # worker tasks, or replicas for a Ray stage
    inbox: ChannelStatistics
    items: int
    batches: int
    failures: int
    rows: int
    retries: int
    released: dict[str, int]
    busy: float  # seconds inside the timed calls
    timed: int  # calls timed
    blocked: float
    running: int
    latency: tuple[float, float, float]  # p50, p90, p99 seconds
    retries_exhausted: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0


@dataclass(frozen=True)
class RuntimeView:
    stages: tuple[StageView, ...]
    admitted: int
    completed: int
    failed: int
    cancelled: int
    in_flight: int
    elapsed: float  # seconds since the run started; 0 before it
