"""The running side of a pipeline: a sync core (ledger, wiring, joins, probes), one worker
module per stage kind, a supervisor for tasks and threads, and the :class:`Runtime` that wires
them. See ARCHITECTURE.md for the layers and one request's path."""

from .runtime import Runtime
from .view import RuntimeView, StageView, StepStats

__all__ = ["Runtime", "RuntimeView", "StageView", "StepStats"]
