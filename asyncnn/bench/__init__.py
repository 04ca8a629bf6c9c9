"""``python -m asyncnn.bench``: asyncnn against plain baselines, side by side, in one run.

See ``python -m asyncnn.bench --help`` and BENCHMARKS.md for the protocol and the figures.
"""

from __future__ import annotations

from ._core import Context, Row, Workload
from .cli import WORKLOADS, main

__all__ = ["WORKLOADS", "Context", "Row", "Workload", "main"]
