"""The face of asyncnn: build a pipeline, run it with ``async with``, send it work.

``Pipeline`` is a facade: arguments are checked in ``options``, ``from_module`` plans in
``partition``, requests enter through ``entry`` (``send``, ``submit``, ``send_stream``,
``stream``), statistics come from ``stats``, and the running graph is a
:class:`~asyncnn.runtime.Runtime`.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

from .entry import Requests
from .errors import AsyncnnError, first_of
from .events import EventBus, Watchdog
from .graph import Graph, to_dot, to_mermaid
from .lifecycle import Run, uncancel
from .options import check_devices, options
from .partition import layer_stages
from .runtime import Runtime
from .stage import Stage
from .stats import PipelineStats, snapshot
from .tracing import tracing_from

__all__ = ["Pipeline"]

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

_State = Literal["new", "running", "closing", "closed"]


class Pipeline(Requests):
    """A graph of stages run as asyncio tasks joined by bounded queues.

    Args:
        stages: a list of stages (a chain; bare callables are wrapped in ``Stage``) or a ``Graph``.
        queue_size: capacity of every queue between stages (backpressure beyond it), >= 1.
        drain_timeout: the most seconds leaving ``async with`` waits for in-flight requests
            before ending the rest with ``PipelineClosed``; ``None`` waits as long as it takes.
        output_device: where results are returned: ``"cpu"`` (default; a placed CUDA stage
            copies its output back on a copy stream) or ``None`` (left where the stage put it).
        torch_threads: torch intra-op threads for the stage threads. ``"auto"`` (default): the
            CPU compute threads (module, step, ``device="cpu"`` or ``workers="auto"`` stages,
            counting workers) share the intra-op threads of the thread that builds the pipeline,
            ``torch.get_num_threads() // compute threads`` each, so several stages do not
            oversubscribe the cores; a single compute thread gets every usable core but one,
            which is left to the event loop (a call's parallel region waits for its slowest
            thread, and one on the loop's core makes every op wait for the loop). A new thread
            may otherwise start with fewer: torch's setting is process-wide and any library may
            lower it. An int sets it; ``None`` never touches it. torch's setting is restored
            when the pipeline stops.
        microbatch: split each request's rows (dim 0) into pieces of this many rows that flow
            through the stages one after another, so that stages work on different parts of one
            large request at once; the result is concatenated back. Chains only; stages must
            treat rows independently (e.g. modules in eval mode); not with batching stages.
        max_request_rows: refuse requests with more rows (dim 0) than this at admission, with
            a ``ValueError``, before they take any memory in the pipeline.
        stall_timeout: when requests are in flight and no stage makes progress for this many
            seconds, emit a ``stall`` event and log a warning that names the stage holding the
            oldest request (``None``: no watchdog).
        max_in_flight: admission control. At most this many requests in flight; and a request
            with a deadline (``timeout=``) that cannot finish in time behind the work already
            in flight ahead of it, in the calls it would ride in (at a busy batching stage, a
            batch of the size it has been running), is refused at once. Either way
            ``send``/``submit`` raise ``Overloaded`` (a ``PipelineFull`` with ``retry_after``
            seconds) instead of queueing (``None``: no limit, every request is queued).
        aging: seconds a request waits to rise one priority level in a queue, so that a less
            urgent class is delayed, never starved (``send(x, priority=...)``; default 1.0).
        compute_nice: how the threads of CPU compute stages yield the cores to the event
            loop's thread (Linux, where scheduling is per thread; elsewhere nothing changes).
            An int (default 10) is added to their niceness: the loop gets the larger share of
            a contended core, but on Linux 6.6+ (the EEVDF scheduler) a woken loop may still
            wait out a compute thread's time slice (~5 ms stalls measured). ``"idle"``: the
            idle scheduling class (``SCHED_IDLE``): the loop, woken by a timer, a socket or a
            result, preempts them at once, so deadlines and timers keep time; but any busy
            thread or process of ordinary priority takes the cores first (two CPU-bound
            processes beside it cut an MLP pipeline to ~15 requests/s): for a machine or
            container that serves nothing else. Threads that launch accelerator work get
            niceness 10 under ``"idle"``. ``0`` leaves them alone.
        tracing: OpenTelemetry spans (``asyncnn.tracing``): ``True`` for the global tracer
            provider's tracer, or a tracer; a span per request (a child of the caller's current
            span), per stage it passes and per batch (linked to its requests). ``False``
            (default): nothing is built.

    Raises:
        GraphError: the graph is invalid (the message names the stage and the fix).
        TypeError, ValueError: a bad argument.

    Example::

        pipe = Pipeline([Stage(decode), Stage(model, workers=2), Stage(encode)], queue_size=8)
        async with pipe:
            y = await pipe.send(x)
            async for y in pipe.stream(xs):
                ...
    """

    def __init__(
        self,
        stages: Sequence[Stage | Callable[..., Any]] | Graph,
        *,
        queue_size: int = 64,
        drain_timeout: float | None = 30.0,
        output_device: str | None = "cpu",
        torch_threads: int | Literal["auto"] | None = "auto",
        microbatch: int | None = None,
        max_request_rows: int | None = None,
        stall_timeout: float | None = None,
        max_in_flight: int | None = None,
        aging: float = 1.0,
        compute_nice: int | Literal["idle"] = 10,
        tracing: Any = False,
    ) -> None:
        self._plan, opts = options(
            stages,
            queue_size=queue_size,
            drain_timeout=drain_timeout,
            output_device=output_device,
            torch_threads=torch_threads,
            microbatch=microbatch,
            max_request_rows=max_request_rows,
            stall_timeout=stall_timeout,
            max_in_flight=max_in_flight,
            aging=aging,
            compute_nice=compute_nice,
        )
        self._opts = opts
        self._tracing = tracing_from(tracing)  # checked before anything runs
        self.max_in_flight = max_in_flight
        self.aging = aging
        self.queue_size = queue_size
        self.drain_timeout = drain_timeout
        self.microbatch = microbatch
        self.max_request_rows = max_request_rows
        self.torch_threads = opts.torch_threads
        self._check_rows = microbatch is not None or max_request_rows is not None
        self._yields = any(s.yields for s in self._plan.stages)  # requests carry a PartStream
        self._plain = not (self._check_rows or self._yields or self._tracing is not None) and (
            max_in_flight is None
        )
        self._runtime = self._new_runtime()
        self.events = EventBus(self._observe)
        self._run: Run | None = None  # the current (or last) run; None before the first start
        self._runs = 0
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owner: asyncio.Task[Any] | None = None  # the task inside `async with`, if any
        self._owner_cancelled = False

    def _new_runtime(self) -> Runtime:
        o = self._opts
        return Runtime(
            self._plan,
            o.queue_size,
            output_device=o.output_device,
            torch_threads=o.torch_threads,
            microbatch=o.microbatch,
            max_in_flight=o.max_in_flight,
            compute_nice=o.compute_nice,
            tracing=self._tracing,
        )

    def _observe(self, emit: Callable[..., None] | None) -> None:
        # The bus turns the stages' event hooks on while someone listens.
        self._runtime.set_observer(emit)

    @classmethod
    def from_module(
        cls,
        module: Any,
        stages: int | None = None,
        devices: Sequence[str | Any] | None = None,
        *,
        sample: Any = None,
        microbatch: int | None = None,
        **kwargs: Any,
    ) -> Pipeline:
        """A pipeline that runs an ``nn.Sequential`` layer by layer: "each layer is a task".

        Args:
            module: an ``nn.Sequential``; its top-level children run in order.
            stages: group consecutive layers into this many stages (default: one per layer, or
                one per device), balanced by the time each layer takes on ``sample`` when given,
                else by parameter count.
            devices: place the groups on these devices in order (pipeline parallelism); one
                device per stage.
            sample: an input to time the layers on (it is run once per layer, in order).
            microbatch: split each request into pieces of this many rows (see ``Pipeline``).
            **kwargs: passed to ``Pipeline`` (``queue_size``, ``output_device``, ...).

        The output equals ``module(x)`` for modules whose layers treat rows independently when
        ``microbatch`` is set (eval mode).

        Raises:
            TypeError: ``module`` is not an ``nn.Sequential`` (the message says how to wrap it).
            ValueError: ``stages`` or ``devices`` do not fit the number of layers.
        """
        built = layer_stages(module, stages, devices, sample)
        return cls(built, microbatch=microbatch, **kwargs)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages in topological order, with their unique names."""
        return self._plan.stages

    @property
    def state(self) -> _State:
        """``new`` (never started), ``running``, ``closing`` or ``closed`` (may start again)."""
        run = self._run
        if run is None or run.state == "starting":
            return "new" if self._runs <= 1 else "closed"
        return run.state

    def stats(self) -> PipelineStats:
        """Per-stage figures by name, and request outcomes as attributes (see ``PipelineStats``)."""
        return snapshot(self._runtime.view(), run=self._runs)

    def to_mermaid(self) -> str:
        """The graph as Mermaid flowchart text (stages, where they run, batching, queues)."""
        return to_mermaid(self._plan, self.queue_size)

    def to_dot(self) -> str:
        """The graph as Graphviz DOT text."""
        return to_dot(self._plan, self.queue_size)

    def __repr__(self) -> str:
        names = " -> ".join(s.name for s in self.stages)
        return f"<Pipeline {self.state} [{names}] queue_size={self.queue_size}>"

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> Pipeline:
        """Start every stage task and thread; return once the pipeline accepts requests.

        Any task may call it, and another may call ``aclose()`` later: the pipeline's tasks live
        in a task of their own. A closed pipeline starts again as a fresh run (new queues,
        threads and counters; ``stats().run`` counts runs).

        Raises:
            AsyncnnError: the pipeline is already running (or still closing), or a placed
                stage's device is missing.
        """
        run = self._run
        if run is not None and run.state != "closed":
            raise AsyncnnError(
                f"this pipeline is already {'starting' if run.state == 'starting' else run.state}:"
                " call aclose() (or leave `async with`) before starting it again"
            )
        check_devices(self.stages)
        if run is not None:
            self._runtime = self._new_runtime()  # a fresh run: nothing carries over
        self._loop = asyncio.get_running_loop()
        self._observe(self.events.emit if self.events.active else None)
        stall = self._opts.stall_timeout
        self._run = Run(
            self._runtime,
            self.events,
            None if stall is None else Watchdog(stall),
            self._runtime_failed,
        )
        self._runs += 1
        await self._run.start()
        return self

    def _runtime_failed(self) -> None:
        # A runtime task failed: a task inside `async with` is cancelled, as a task group would,
        # and leaving the block raises the failure instead of the cancellation.
        owner = self._owner
        if owner is not None and not owner.done():
            self._owner_cancelled = True
            owner.cancel()

    async def __aenter__(self) -> Pipeline:
        await self.start()
        self._owner = asyncio.current_task()
        self._owner_cancelled = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ours = self._owner_cancelled and isinstance(exc, asyncio.CancelledError)
        self._owner, self._owner_cancelled = None, False
        if ours:
            uncancel()
        # A failed or cancelled body does not wait on a drain: everything ends now.
        await self._stop(self.drain_timeout if exc is None else 0)
        if ours and self._run is not None and self._run.error is not None:
            raise self._run.error  # already raised to another closer: raise it here too

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds (``None``:
        no bound), then end the rest with ``PipelineClosed`` and stop every task and thread.

        Any task may call it, however the pipeline was started; leaving ``async with``
        afterwards only tidies up. Requests still in flight at the deadline end with
        ``PipelineClosed`` at once, even while a stage's thread is still busy with them.

        Raises:
            BaseExceptionGroup: a runtime task failed while the pipeline ran (raised once).
        """
        await self._stop(timeout)

    async def _stop(self, timeout: float | None) -> None:
        if self._run is None:
            return
        try:
            await self._run.stop(timeout)
        except BaseExceptionGroup as group:
            # A stage raised KeyboardInterrupt or SystemExit: hand it on as itself, not inside
            # a group, so that the interpreter stops (or exits) as the user meant.
            urgent = first_of(group, (KeyboardInterrupt, SystemExit))
            if urgent is not None:
                raise urgent from None
            raise
