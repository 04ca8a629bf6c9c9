"""Snapshots of what a running pipeline has done: ``pipe.stats()``.

``stats()`` returns a :class:`PipelineStats`: a read-only mapping from stage name to
:class:`StageStats`, with the pipeline-wide request outcomes as attributes. Counts add up:
``admitted == completed + failed + cancelled + in_flight``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .scheduler import Scheduler

__all__ = ["PipelineStats", "StageStats", "snapshot"]


@dataclass(frozen=True)
class StageStats:
    """One stage's figures since the pipeline started.

    ``items`` counts requests the stage finished, ``batches`` the calls of its function (for a
    batching stage: the batches it formed and ran; ``retries`` counts apart the re-runs of parts
    of a failed batch), ``failures`` the calls that raised; ``queue_depth``/``peak_queue_depth``
    describe its input. A batching stage also counts ``rows`` and why each batch was released:
    ``released_full`` (max_size reached), ``released_delay`` (max_delay passed),
    ``released_drain`` (the pipeline was closing).
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

    @property
    def mean_batch_size(self) -> float:
        """Mean rows per batch for a batching stage; mean requests per call otherwise."""
        if not self.batches:
            return 0.0
        return (self.rows or self.items) / self.batches


class PipelineStats(Mapping[str, StageStats]):
    """Per-stage snapshots by name, plus ``admitted``, ``completed``, ``failed``, ``cancelled``
    and ``in_flight`` for the whole pipeline."""

    def __init__(
        self,
        stages: dict[str, StageStats],
        *,
        admitted: int,
        completed: int,
        failed: int,
        cancelled: int,
        in_flight: int,
    ) -> None:
        self._stages = stages
        self.admitted = admitted
        self.completed = completed
        self.failed = failed
        self.cancelled = cancelled
        self.in_flight = in_flight

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
            f"stages={list(self._stages)}>"
        )


def snapshot(sched: Scheduler) -> PipelineStats:
    stages: dict[str, StageStats] = {}
    for node in sched.nodes:
        st = node.work.statistics()
        c = node.counters
        stages[node.stage.name] = StageStats(
            name=node.stage.name,
            runs_on=node.runs_on,
            workers=node.stage.workers,
            items=c.items,
            batches=c.batches,
            failures=c.failures,
            queue_depth=st.depth,
            peak_queue_depth=st.peak_depth,
            queue_capacity=st.capacity,
            rows=c.rows,
            retries=c.retries,
            released_full=c.released["full"],
            released_delay=c.released["delay"],
            released_drain=c.released["drain"],
        )
    k = sched.counters
    return PipelineStats(
        stages,
        admitted=k.admitted,
        completed=k.completed,
        failed=k.failed,
        cancelled=k.cancelled,
        in_flight=len(sched.inflight),
    )
