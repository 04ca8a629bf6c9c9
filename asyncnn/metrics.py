"""Prometheus export of ``pipe.stats()``: a collector, and a server on loopback.

Takes anything with ``stats()`` (:class:`~asyncnn.stats.HasStats`), so it sits above the
runtime and below nothing: ``Pipeline`` does not import it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from .stats import HasStats, PipelineStats, StageStats

__all__ = ["PipelineStats", "PrometheusServer", "StageStats", "collector", "serve_prometheus"]


# -- Prometheus ------------------------------------------------------------------------------------


def collector(pipe: HasStats) -> Any:
    """A ``prometheus_client`` collector for ``pipe``: register it on any registry.

    Metrics (one sample per stage where labelled ``stage``): ``asyncnn_stage_items_total``,
    ``asyncnn_stage_batches_total``, ``asyncnn_stage_failures_total``,
    ``asyncnn_stage_rows_total``, ``asyncnn_stage_busy_ratio``,
    ``asyncnn_stage_backpressure_seconds_total``, ``asyncnn_stage_queue_depth``,
    ``asyncnn_stage_queue_peak_depth``, ``asyncnn_stage_latency_seconds`` (a summary with
    quantiles 0.5/0.9/0.99), ``asyncnn_stage_released_batches_total{reason=...}``,
    ``asyncnn_stage_deadline_misses_total{reason=...}``, ``asyncnn_stage_slack_seconds`` (a
    histogram: seconds left to the deadline when a batching stage dispatched a request),
    ``asyncnn_requests_total{outcome=...}``, ``asyncnn_requests_timed_out_total``,
    ``asyncnn_requests_overloaded_total`` and ``asyncnn_requests_in_flight``.

    Raises:
        ImportError: prometheus-client is missing (``pip install prometheus-client``).

    Example::

        from prometheus_client import REGISTRY
        REGISTRY.register(asyncnn.metrics.collector(pipe))
    """
    _prometheus()  # fail now, not at the first scrape
    return _Collector(pipe)


def _prometheus() -> Any:
    try:
        from prometheus_client import core
    except ImportError as exc:
        raise ImportError(
            "asyncnn.metrics needs prometheus-client: pip install prometheus-client"
        ) from exc
    return core


# Per-stage metrics: StageStats attribute -> (family, name after "asyncnn_stage_", help text).
_STAGE_METRICS = {
    "items": ("counter", "items", "Requests a stage finished"),
    "batches": ("counter", "batches", "Calls of a stage's function (batches)"),
    "failures": ("counter", "failures", "Calls of a stage that raised"),
    "rows": ("counter", "rows", "Rows in the batches a batching stage formed"),
    "blocked_seconds": ("counter", "backpressure_seconds", "Seconds waiting for room downstream"),
    "busy_fraction": ("gauge", "busy_ratio", "Share of worker time in calls"),
    "queue_depth": ("gauge", "queue_depth", "Items waiting at a stage now"),
    "peak_queue_depth": ("gauge", "queue_peak_depth", "Most items ever waiting at a stage"),
    "priority_inversions": (
        "counter",
        "priority_inversions",
        "Requests dispatched ahead of a more urgent waiting one",
    ),
}


class _Collector:
    """Reads ``pipe.stats()`` at every scrape, on the pipeline's event loop: the exporter's
    HTTP thread never reads state that the loop is changing."""

    def __init__(self, pipe: HasStats) -> None:
        self._pipe = pipe
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # made outside a loop: read directly

    def _stats(self) -> PipelineStats:
        loop = self._loop
        if loop is None or not loop.is_running() or _on_loop(loop):
            return self._pipe.stats()

        async def snapshot() -> PipelineStats:
            return self._pipe.stats()

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout=5)

    def describe(self) -> list[Any]:
        return []  # metrics are only known at collect time; no duplicate check on register

    def collect(self) -> Iterator[Any]:
        core = _prometheus()
        st = self._stats()
        kinds = {"counter": core.CounterMetricFamily, "gauge": core.GaugeMetricFamily}
        for attr, (kind, name, doc) in _STAGE_METRICS.items():
            fam = kinds[kind](f"asyncnn_stage_{name}", doc, labels=["stage"])
            for s in st.values():
                fam.add_metric([s.name], float(getattr(s, attr)))
            yield fam
        yield _latency(core, st)
        yield from _deadlines(core, st)
        req = core.CounterMetricFamily(
            "asyncnn_requests", "Requests by outcome", labels=["outcome"]
        )
        for outcome in ("admitted", "completed", "failed", "cancelled"):
            req.add_metric([outcome], float(getattr(st, outcome)))
        yield req
        yield core.CounterMetricFamily(
            "asyncnn_requests_timed_out",
            "Requests their deadline ended (counted among the cancelled)",
            value=st.timed_out,
        )
        yield core.CounterMetricFamily(
            "asyncnn_requests_overloaded",
            "Requests refused at admission with Overloaded (never admitted)",
            value=st.overloaded,
        )
        yield core.GaugeMetricFamily(
            "asyncnn_requests_in_flight", "Requests admitted and not ended", value=st.in_flight
        )


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _latency(core: Any, st: PipelineStats) -> Any:
    lat = core.SummaryMetricFamily(
        "asyncnn_stage_latency_seconds", "Seconds per call of a stage", labels=["stage"]
    )
    for s in st.values():
        lat.add_sample("asyncnn_stage_latency_seconds_count", {"stage": s.name}, float(s.batches))
        for q, v in ((0.5, s.latency_p50), (0.9, s.latency_p90), (0.99, s.latency_p99)):
            lat.add_sample(
                "asyncnn_stage_latency_seconds", {"stage": s.name, "quantile": str(q)}, v
            )
    return lat


def _deadlines(core: Any, st: PipelineStats) -> Iterator[Any]:
    """Why batches were released, deadline misses by reason, slack at dispatch."""
    released = core.CounterMetricFamily(
        "asyncnn_stage_released_batches",
        "Batches a batching stage released, by reason",
        labels=["stage", "reason"],
    )
    misses = core.CounterMetricFamily(
        "asyncnn_stage_deadline_misses",
        "Requests a stage ended by their deadline before computing them, by reason",
        labels=["stage", "reason"],
    )
    slack = core.HistogramMetricFamily(
        "asyncnn_stage_slack_seconds",
        "Seconds left to the deadline when a batching stage dispatched a request",
        labels=["stage"],
    )
    for s in st.values():
        for reason in ("full", "preferred", "deadline", "idle", "delay", "drain"):
            released.add_metric([s.name, reason], float(getattr(s, f"released_{reason}")))
        for reason, n in s.deadline_misses.items():
            misses.add_metric([s.name, reason], float(n))
        buckets = [(_le(le), float(n)) for le, n in s.slack_buckets]
        slack.add_metric([s.name], [*buckets, ("+Inf", float(s.slack_count))], s.slack_sum)
    yield from (released, misses, slack)


def _le(bound: float) -> str:
    return f"{bound:g}"  # 0.001, 0.0025, 1, 10: as Prometheus clients write their bounds


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


def serve_prometheus(pipe: HasStats, port: int = 9464, addr: str = "127.0.0.1") -> PrometheusServer:
    """Serve ``pipe``'s metrics at ``http://addr:port/metrics`` from a background thread (its own
    registry, so nothing else leaks in). Binds loopback by default; ``port=0`` picks a free one."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as exc:
        raise ImportError(
            "asyncnn.metrics needs prometheus-client: pip install prometheus-client"
        ) from exc
    registry = CollectorRegistry()
    registry.register(collector(pipe))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    host, real_port = server.server_address[:2]
    if isinstance(host, bytes):
        host = host.decode()
    return PrometheusServer(server, thread, f"http://{host}:{real_port}/metrics")
