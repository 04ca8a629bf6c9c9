"""Snapshots of what a running pipeline has done: ``pipe.stats()``.

``stats()`` returns a :class:`PipelineStats`: a read-only mapping from stage name to
:class:`StageStats`, with the pipeline-wide request outcomes as attributes. Counts add up:
``admitted == completed + failed + cancelled + in_flight``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .scheduler import Scheduler

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["PipelineStats", "StageStats", "collector", "serve_prometheus", "snapshot"]


@dataclass(frozen=True)
class StageStats:
    """One stage's figures since the pipeline started.

    ``items`` counts requests the stage finished, ``batches`` the calls of its function (for a
    batching stage: the batches it formed and ran; ``retries`` counts apart the re-runs of parts
    of a failed batch), ``failures`` the calls that raised; ``queue_depth``/``peak_queue_depth``
    describe its input. A batching stage also counts ``rows`` and why each batch was released:
    ``released_full`` (max_size reached), ``released_delay`` (max_delay passed),
    ``released_drain`` (the pipeline was closing).

    ``busy_fraction``: the share of its workers' time spent inside calls since the pipeline
    started (on a GPU stage, overlapping batches can push it above 1); ``blocked_seconds``: time
    its workers waited for room downstream (backpressure); ``latency_p50/p90/p99``: seconds per
    call, from a compact histogram; ``running``: calls in progress now.
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
    busy_fraction: float = 0.0
    blocked_seconds: float = 0.0
    latency_p50: float = 0.0
    latency_p90: float = 0.0
    latency_p99: float = 0.0
    running: int = 0

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


def _busy(timed_seconds: float, timed: int, calls: int) -> float:
    # Loop stages time a sample of their calls: the sample's mean stands for every call.
    return timed_seconds / timed * max(calls, timed) if timed else 0.0


def snapshot(sched: Scheduler) -> PipelineStats:
    stages: dict[str, StageStats] = {}
    elapsed = max(1e-9, time.perf_counter() - sched.started_at) if sched.started_at else 0.0
    for node in sched.nodes:
        st = node.work.statistics()
        c = node.counters
        stages[node.stage.name] = StageStats(
            name=node.stage.name,
            runs_on=node.runs_on,
            workers=node.stage.replicas if node.runs_on == "ray" else node.stage.workers,
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
            busy_fraction=_busy(c.busy, c.timed, c.batches + c.failures + c.retries)
            / (elapsed * (node.stage.replicas if node.runs_on == "ray" else node.stage.workers))
            if elapsed
            else 0.0,
            blocked_seconds=c.blocked,
            latency_p50=c.latency.quantile(0.50),
            latency_p90=c.latency.quantile(0.90),
            latency_p99=c.latency.quantile(0.99),
            running=c.active,
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


# -- Prometheus ------------------------------------------------------------------------------------


def collector(pipe: Pipeline) -> Any:
    """A ``prometheus_client`` collector for ``pipe``: register it on any registry.

    Metrics (one sample per stage where labelled ``stage``): ``asyncnn_stage_items_total``,
    ``asyncnn_stage_batches_total``, ``asyncnn_stage_failures_total``,
    ``asyncnn_stage_rows_total``, ``asyncnn_stage_busy_ratio``,
    ``asyncnn_stage_backpressure_seconds_total``, ``asyncnn_stage_queue_depth``,
    ``asyncnn_stage_queue_peak_depth``, ``asyncnn_stage_latency_seconds`` (a summary with
    quantiles 0.5/0.9/0.99), ``asyncnn_requests_total{outcome=...}`` and
    ``asyncnn_requests_in_flight``.

    Raises:
        ImportError: prometheus-client is missing (``pip install "asyncnn[prometheus]"``).

    Example::

        from prometheus_client import REGISTRY
        REGISTRY.register(asyncnn.metrics.collector(pipe))
    """
    try:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )
    except ImportError as exc:
        raise ImportError(
            'asyncnn.metrics needs prometheus-client: pip install "asyncnn[prometheus]"'
        ) from exc

    class _Collector:
        def describe(self) -> list[Any]:
            return []  # metrics are only known at collect time; no duplicate check on register

        def collect(self) -> Iterator[Any]:
            st = pipe.stats()
            counters = {
                "items": ("asyncnn_stage_items", "Requests a stage finished"),
                "batches": ("asyncnn_stage_batches", "Calls of a stage's function (batches)"),
                "failures": ("asyncnn_stage_failures", "Calls of a stage that raised"),
                "rows": ("asyncnn_stage_rows", "Rows in the batches a batching stage formed"),
                "blocked_seconds": (
                    "asyncnn_stage_backpressure_seconds",
                    "Seconds a stage waited for room downstream",
                ),
            }
            for attr, (name, doc) in counters.items():
                fam = CounterMetricFamily(name, doc, labels=["stage"])
                for s in st.values():
                    fam.add_metric([s.name], float(getattr(s, attr)))
                yield fam
            gauges = {
                "busy_fraction": ("asyncnn_stage_busy_ratio", "Share of worker time in calls"),
                "queue_depth": ("asyncnn_stage_queue_depth", "Items waiting at a stage now"),
                "peak_queue_depth": (
                    "asyncnn_stage_queue_peak_depth",
                    "Most items ever waiting at a stage",
                ),
            }
            for attr, (name, doc) in gauges.items():
                g = GaugeMetricFamily(name, doc, labels=["stage"])
                for s in st.values():
                    g.add_metric([s.name], float(getattr(s, attr)))
                yield g
            lat = SummaryMetricFamily(
                "asyncnn_stage_latency_seconds", "Seconds per call of a stage", labels=["stage"]
            )
            for s in st.values():
                lat.add_sample(
                    "asyncnn_stage_latency_seconds_count", {"stage": s.name}, float(s.batches)
                )
                for q, v in ((0.5, s.latency_p50), (0.9, s.latency_p90), (0.99, s.latency_p99)):
                    lat.add_sample(
                        "asyncnn_stage_latency_seconds", {"stage": s.name, "quantile": str(q)}, v
                    )
            yield lat
            req = CounterMetricFamily("asyncnn_requests", "Requests by outcome", labels=["outcome"])
            for outcome in ("admitted", "completed", "failed", "cancelled"):
                req.add_metric([outcome], float(getattr(st, outcome)))
            yield req
            yield GaugeMetricFamily(
                "asyncnn_requests_in_flight", "Requests admitted and not ended", value=st.in_flight
            )

    return _Collector()


class PrometheusServer:
    """A running metrics endpoint; ``close()`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self.url = url

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_prometheus(pipe: Pipeline, port: int = 9464, addr: str = "127.0.0.1") -> PrometheusServer:
    """Serve ``pipe``'s metrics at ``http://addr:port/metrics`` from a background thread (its own
    registry, so nothing else leaks in). Binds loopback by default; ``port=0`` picks a free one."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise ImportError(
            'asyncnn.metrics needs prometheus-client: pip install "asyncnn[prometheus]"'
        ) from exc
    registry = CollectorRegistry()
    registry.register(collector(pipe))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    host, real_port = server.server_address[:2]
    if isinstance(host, bytes):
        host = host.decode()
    return PrometheusServer(server, thread, f"http://{host}:{real_port}/metrics")
