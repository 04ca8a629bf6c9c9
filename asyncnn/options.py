"""``Pipeline(...)``'s arguments, checked: one pure function per rule, messages that prescribe."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from .devices import usable_cores
from .errors import AsyncnnError, GraphError, check_whole
from .graph import Graph, Plan, PlanNode
from .payload import PayloadTooDeep, count_rows
from .stage import Stage, is_module

__all__ = [
    "PipelineOptions",
    "as_plan",
    "check_devices",
    "check_request_rows",
    "options",
    "resolve_workers",
    "split_cores",
]


@dataclass(frozen=True)
class PipelineOptions:
    queue_size: int
    drain_timeout: float | None
    output_device: str | None
    torch_threads: int | None  # resolved: None leaves torch alone
    microbatch: int | None
    max_request_rows: int | None
    stall_timeout: float | None
    max_in_flight: int | None = None
    aging: float = 1.0
    compute_nice: int | str = 0


def as_plan(stages: Sequence[Stage | Callable[..., Any]] | Graph) -> Plan:
    """The validated plan of a list of stages (a chain) or a ``Graph``."""
    if isinstance(stages, Graph):
        return stages.validate()
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
        raise TypeError(
            f"Pipeline: expected a list of stages or a Graph, got {type(stages).__name__}"
        )
    return Graph.chain([_as_stage(s) for s in stages]).validate()


def _as_stage(item: Any) -> Stage:
    if isinstance(item, Stage):
        return item
    if callable(item):
        return Stage(item)
    raise TypeError(f"Pipeline: expected Stage objects or callables, got {type(item).__name__}")


def options(
    stages: Sequence[Stage | Callable[..., Any]] | Graph,
    *,
    queue_size: int,
    drain_timeout: float | None,
    output_device: str | None,
    torch_threads: int | Literal["auto"] | None,
    microbatch: int | None,
    max_request_rows: int | None,
    stall_timeout: float | None,
    max_in_flight: int | None = None,
    aging: float = 1.0,
    compute_nice: int | str = 0,
) -> tuple[Plan, PipelineOptions]:
    """Check every argument of ``Pipeline``; raise on the first bad one. Returns the plan."""
    check_whole(queue_size, "Pipeline: queue_size")
    if max_in_flight is not None:
        check_whole(max_in_flight, "Pipeline: max_in_flight")
    if compute_nice != "idle" and (
        isinstance(compute_nice, bool) or not isinstance(compute_nice, int) or compute_nice < 0
    ):
        raise ValueError(
            f"Pipeline: compute_nice={compute_nice!r} must be 'idle' (the idle scheduling "
            "class) or a whole number >= 0 added to the compute threads' niceness (0: leave "
            "their priority alone)"
        )
    if isinstance(aging, bool) or not isinstance(aging, (int, float)) or not aging > 0:
        raise ValueError(
            f"Pipeline: aging={aging!r} must be seconds > 0 (how long a request waits to rise "
            "one priority level)"
        )
    if drain_timeout is not None and not drain_timeout >= 0:
        raise ValueError(f"Pipeline: drain_timeout={drain_timeout!r} must be >= 0 or None")
    given = as_plan(stages)
    cores = usable_cores()
    plan = resolve_workers(given, cores)
    if output_device is not None and str(output_device) != "cpu":
        raise ValueError(
            f"Pipeline: output_device={output_device!r}: use 'cpu' (results on the host) "
            "or None (results stay where the last stage put them)"
        )
    if microbatch is not None:
        check_microbatch(plan, microbatch)
    if max_request_rows is not None:
        check_whole(max_request_rows, "Pipeline: max_request_rows")
    return plan, PipelineOptions(
        queue_size=queue_size,
        drain_timeout=drain_timeout,
        output_device=output_device,
        torch_threads=resolve_threads(given, torch_threads, plan, cores),
        microbatch=microbatch,
        max_request_rows=max_request_rows,
        stall_timeout=stall_timeout,
        max_in_flight=max_in_flight,
        aging=aging,
        compute_nice=compute_nice,
    )


def check_microbatch(plan: Plan, microbatch: int) -> None:
    """Micro-batching needs a chain (no fan-in, one output) without batching stages."""
    check_whole(microbatch, "Pipeline: microbatch")
    if any(len(n.inputs) != 1 for n in plan.nodes) or len(plan.outputs) != 1:
        raise GraphError(
            "microbatch needs a chain of stages (no fan-in, one output): "
            "split the request before the graph instead"
        )
    yielding = [s.name for s in plan.stages if s.yields]
    if yielding:
        raise GraphError(
            f"microbatch does not mix with generator stages ({', '.join(yielding)}): the "
            "chunks of one request would each yield a stream; use one or the other"
        )
    batched = [s.name for s in plan.stages if s.batch is not None]
    if batched:
        raise GraphError(
            f"microbatch does not mix with batching stages ({', '.join(batched)}): "
            "use one or the other"
        )


MOST_AUTO_WORKERS = 4  # beyond this, more torch threads per worker rather than more workers


def split_cores(cores: int, auto_stages: int, fixed_threads: int) -> int:
    """Workers for each of ``auto_stages`` compute stages with ``workers="auto"``, when other
    compute stages already run ``fixed_threads`` threads: the cores left, shared between the
    auto stages, as single-threaded workers up to ``MOST_AUTO_WORKERS`` each (the torch threads
    are then shared out by ``torch_threads="auto"``). At least one worker each."""
    if auto_stages < 1:
        raise ValueError("split_cores: no stage to split the cores between")
    share = max(1, (cores - fixed_threads) // auto_stages)
    return min(share, MOST_AUTO_WORKERS)


def _compute(stage: Stage) -> bool:
    """Does ``stage`` run torch compute on threads (a module, a step model, or a stage placed
    on the CPU)?"""
    return stage.runs_on == "thread" and (
        is_module(stage.fn)
        or stage.step is not None
        or (stage.device is not None and str(stage.device) == "cpu")
        or stage.workers == "auto"
    )


def resolve_workers(plan: Plan, cores: int) -> Plan:
    """``plan`` with every ``workers="auto"`` replaced by a count: ``split_cores`` for compute
    stages on threads, 1 elsewhere (a coroutine, an inline call, a Ray stage: ``replicas``
    sets those). An explicit count is never changed."""
    auto = [s for s in plan.stages if s.workers == "auto" and _compute(s) and s.step is None]
    if not any(s.workers == "auto" for s in plan.stages):
        return plan
    fixed = sum(int(s.workers) for s in plan.stages if s.workers != "auto" and _compute(s))
    each = split_cores(cores, len(auto), fixed) if auto else 1
    nodes = tuple(
        PlanNode(
            replace(n.stage, workers=each if _compute(n.stage) and n.stage.step is None else 1)
            if n.stage.workers == "auto"
            else n.stage,
            n.inputs,
        )
        for n in plan.nodes
    )
    return Plan(nodes, plan.outputs)


def resolve_threads(
    plan: Plan,
    threads: int | Literal["auto"] | None,
    resolved: Plan | None = None,
    cores: int | None = None,
) -> int | None:
    """torch intra-op threads per compute thread: ``"auto"`` shares the caller's count between
    the CPU compute threads (module, step, ``device="cpu"`` or ``workers="auto"`` stages, counting
    workers), except that one compute thread never gets every core (``cores``: the usable
    ones): one is left to the event loop. ``plan`` is the plan as given (a ``workers="auto"``
    stage counts as compute); ``resolved``, the same plan after ``resolve_workers``, says how
    many workers each has."""
    if threads is None:
        return None
    if threads == "auto":
        counts = (resolved or plan).stages
        compute = sum(
            int(r.workers) for s, r in zip(plan.stages, counts, strict=True) if _compute(s)
        )
        if compute == 0:
            return None
        # torch's count in this (the caller's) thread: new threads may start from another
        # value, since torch.set_num_threads in any thread changes the default for new ones.
        import torch

        budget = torch.get_num_threads()
        if compute == 1:
            # A call's parallel region waits for its slowest thread; spread over every core,
            # one of its threads shares a core with the loop, which a service keeps busy, and
            # each op waits for it: a small model's calls behind FastAPI took 17 ms instead of
            # 0.5 on 2 cores (2 threads against 1). Several workers keep the plain split: each
            # of them runs its own call (workers="auto" is the setting for serving).
            budget = min(budget, max(1, (cores or usable_cores()) - 1))
        return max(1, budget // compute)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"Pipeline: torch_threads={threads!r} must be 'auto', None or a whole number >= 1"
        )
    return threads


def check_devices(stages: Iterable[Stage]) -> None:
    """Every placed stage's device exists here (checked when a run starts)."""
    for stage in stages:
        dev = stage.device
        if dev is None or str(dev) == "cpu":
            continue
        import torch

        if not torch.cuda.is_available():
            raise AsyncnnError(
                f"stage {stage.name!r} is placed on {str(dev)!r} but CUDA is not available "
                "here: place it on 'cpu' or run on a machine with a GPU"
            )
        index = torch.device(dev).index or 0
        if index >= torch.cuda.device_count():
            raise AsyncnnError(
                f"stage {stage.name!r} is placed on {str(dev)!r} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )


def check_request_rows(x: Any, limit: int | None, microbatch: int | None) -> None:
    """A request's rows against ``max_request_rows``; micro-batched requests must have rows."""
    try:
        rows = count_rows(x)
    except PayloadTooDeep:
        raise
    except (TypeError, ValueError) as exc:
        if microbatch is not None:
            raise type(exc)(f"microbatch={microbatch}: {exc}") from None
        return  # non-tensor payloads have no rows to cap
    if limit is not None and rows > limit:
        raise ValueError(
            f"request of {rows} rows refused: max_request_rows={limit}; split it into "
            f"requests of at most {limit} rows, or raise max_request_rows"
        )
