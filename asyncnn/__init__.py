"""asyncnn: run PyTorch models and tensor pipelines as asyncio tasks joined by bounded queues.

Example::

    import asyncnn

    pipe = asyncnn.Pipeline([asyncnn.Stage(decode), asyncnn.Stage(model), asyncnn.Stage(encode)])
    async with pipe:
        y = await pipe.send(x)
"""

from __future__ import annotations

from . import metrics  # noqa: F401  (asyncnn.metrics.serve_prometheus, as documented)
from .batching import Batching
from .collector import latency_gc
from .errors import (
    AsyncnnError,
    GraphError,
    LoaderError,
    Overloaded,
    PipelineClosed,
    PipelineFull,
    StageError,
    WorkerLost,
)
from .graph import Graph, Node
from .loader import AsyncLoader, LoaderStats
from .pipeline import Pipeline
from .stage import Stage
from .stats import PipelineStats, StageStats, StepStats
from .stepping import StepModel, Stepping

__version__ = "0.1.0"

__all__ = [
    "AsyncLoader",
    "AsyncnnError",
    "Batching",
    "Graph",
    "GraphError",
    "LoaderError",
    "LoaderStats",
    "Node",
    "Overloaded",
    "Pipeline",
    "PipelineClosed",
    "PipelineFull",
    "PipelineStats",
    "Stage",
    "StageError",
    "StageStats",
    "StepModel",
    "StepStats",
    "Stepping",
    "WorkerLost",
    "__version__",
    "latency_gc",
]
