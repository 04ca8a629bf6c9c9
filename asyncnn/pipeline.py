"""The face of asyncnn: build a pipeline, run it with ``async with``, send it work."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio import EndOfStream, WouldBlock

from .batching import Envelope, PayloadTooDeep, Request, count_rows
from .channels import Channel
from .errors import AsyncnnError, GraphError, PipelineClosed, PipelineFull
from .events import EventBus, Watchdog
from .graph import Graph, Plan, balance, to_dot, to_mermaid
from .metrics import PipelineStats, snapshot
from .scheduler import Scheduler
from .stage import Stage, is_module

__all__ = ["Pipeline"]

log = logging.getLogger("asyncnn")

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

_State = Literal["new", "running", "closing", "closed"]
_THREAD_JOIN_TIMEOUT = 5.0


def _as_stage(item: Any) -> Stage:
    if isinstance(item, Stage):
        return item
    if callable(item):
        return Stage(item)
    raise TypeError(f"Pipeline: expected Stage objects or callables, got {type(item).__name__}")


class Pipeline:
    """A graph of stages run as asyncio tasks joined by bounded queues.

    Args:
        stages: a list of stages (a chain; bare callables are wrapped in ``Stage``) or a ``Graph``.
        queue_size: capacity of every queue between stages (backpressure beyond it), >= 1.
        drain_timeout: the most seconds leaving ``async with`` waits for in-flight requests
            before ending the rest with ``PipelineClosed``; ``None`` waits as long as it takes.
        output_device: where results are returned: ``"cpu"`` (default; a placed CUDA stage
            copies its output back on a copy stream) or ``None`` (left where the stage put it).
        torch_threads: torch intra-op threads for the stage threads. ``"auto"`` (default): the
            CPU compute threads (module or ``device="cpu"`` stages, counting workers) share the
            intra-op threads of the thread that builds the pipeline, ``torch.get_num_threads()
            // compute threads`` each, so several stages do not oversubscribe the cores and one
            stage gets all of them (a new thread may otherwise start with fewer: torch's setting
            is process-wide and any library may lower it). An int sets it; ``None`` never touches
            it. torch's setting is restored when the pipeline stops.
        microbatch: split each request's rows (dim 0) into pieces of this many rows that flow
            through the stages one after another, so that stages work on different parts of one
            large request at once; the result is concatenated back. Chains only; stages must
            treat rows independently (e.g. modules in eval mode); not with batching stages.
        max_request_rows: refuse requests with more rows (dim 0) than this at admission, with
            a ``ValueError``, before they take any memory in the pipeline.
        stall_timeout: when requests are in flight and no stage makes progress for this many
            seconds, emit a ``stall`` event and log a warning that names the stage holding the
            oldest request (``None``: no watchdog).

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
    ) -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"Pipeline: queue_size={queue_size!r} must be a whole number >= 1")
        if drain_timeout is not None and not drain_timeout >= 0:
            raise ValueError(f"Pipeline: drain_timeout={drain_timeout!r} must be >= 0 or None")
        if isinstance(stages, Graph):
            graph = stages
        elif isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
            raise TypeError(
                f"Pipeline: expected a list of stages or a Graph, got {type(stages).__name__}"
            )
        else:
            graph = Graph.chain([_as_stage(s) for s in stages])
        self._plan: Plan = graph.validate()
        if output_device is not None and str(output_device) != "cpu":
            raise ValueError(
                f"Pipeline: output_device={output_device!r}: use 'cpu' (results on the host) "
                "or None (results stay where the last stage put them)"
            )
        if microbatch is not None:
            if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1:
                raise ValueError(f"Pipeline: microbatch={microbatch!r} must be a whole number >= 1")
            if any(len(n.inputs) != 1 for n in self._plan.nodes) or len(self._plan.outputs) != 1:
                raise GraphError(
                    "microbatch needs a chain of stages (no fan-in, one output): "
                    "split the request before the graph instead"
                )
            batched = [s.name for s in self._plan.stages if s.batch is not None]
            if batched:
                raise GraphError(
                    f"microbatch does not mix with batching stages ({', '.join(batched)}): "
                    "use one or the other"
                )
        if max_request_rows is not None and (
            isinstance(max_request_rows, bool)
            or not isinstance(max_request_rows, int)
            or max_request_rows < 1
        ):
            raise ValueError(
                f"Pipeline: max_request_rows={max_request_rows!r} must be a whole number >= 1"
            )
        self.queue_size = queue_size
        self.drain_timeout = drain_timeout
        self.microbatch = microbatch
        self.max_request_rows = max_request_rows
        self._check_rows = microbatch is not None or max_request_rows is not None
        self.torch_threads = self._resolve_threads(torch_threads)
        self._sched = Scheduler(
            self._plan,
            queue_size,
            output_device=output_device,
            torch_threads=self.torch_threads,
            microbatch=microbatch,
        )
        self._watchdog = None if stall_timeout is None else Watchdog(stall_timeout)
        self.events = EventBus(self._observe)
        self._state: _State = "new"
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopped: asyncio.Event | None = None
        self._feeders: set[anyio.CancelScope] = set()

    def _observe(self, emit: Callable[..., None] | None) -> None:
        # The bus turns the scheduler's event hooks on while someone listens.
        self._sched.observe = emit

    async def _watch(self) -> None:
        """The stall watchdog: looks every quarter timeout; reports each stall once."""
        wd = self._watchdog
        assert wd is not None
        sched = self._sched
        while True:
            await anyio.sleep(wd.timeout / 4)
            if wd.check(time.monotonic(), sched.progress(), len(sched.inflight)):
                self._report_stall(wd.timeout)

    def _report_stall(self, timeout: float) -> None:
        where = self._sched.locate_oldest() or {}
        stage = where.get("stage")
        detail = (
            f"stage {stage!r} holds the oldest request ({where.get('where')}; input "
            f"{'empty' if where.get('input_empty') else 'not empty'}, output "
            f"{'full' if where.get('output_full') else 'not full'})"
            if stage
            else "the oldest request is between stages"
        )
        log.warning(
            "asyncnn: pipeline stalled: %d request(s) in flight and no progress for %.1fs; %s",
            len(self._sched.inflight),
            timeout,
            detail,
        )
        if self.events.active:
            fields = {k: v for k, v in where.items() if k != "stage"}
            self.events.emit(
                "stall", stage, seconds=timeout, in_flight=len(self._sched.inflight), **fields
            )

    def _resolve_threads(self, threads: int | Literal["auto"] | None) -> int | None:
        if threads is None:
            return None
        if threads == "auto":
            compute = sum(
                s.workers
                for s in self._plan.stages
                if s.runs_on == "thread"
                and (is_module(s.fn) or (s.device is not None and str(s.device) == "cpu"))
            )
            if compute == 0:
                return None
            # torch's count in this (the caller's) thread: new threads may start from another
            # value, since torch.set_num_threads in any thread changes the default for new ones.
            import torch

            return max(1, torch.get_num_threads() // compute)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(
                f"Pipeline: torch_threads={threads!r} must be 'auto', None or a whole number >= 1"
            )
        return threads

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
        import torch

        if not isinstance(module, torch.nn.Sequential):
            kind = type(module).__name__
            raise TypeError(
                f"Pipeline.from_module: {kind} is not an nn.Sequential, so its forward() cannot "
                "be split safely. Wrap the parts that run in order: "
                "nn.Sequential(model.backbone, model.head), or pass your own split: "
                "Pipeline([Stage(part1), Stage(part2)])"
            )
        named = list(module.named_children())
        if not named:
            raise ValueError("Pipeline.from_module: the nn.Sequential has no layers")
        if devices is not None:
            devices = list(devices)
            if stages is None:
                stages = len(devices)
            if len(devices) != stages:
                raise ValueError(
                    f"Pipeline.from_module: {len(devices)} device(s) for {stages} stage(s): "
                    "give one device per stage"
                )
        if stages is None:
            sizes = [1] * len(named)
        else:
            if isinstance(stages, bool) or not isinstance(stages, int):
                raise TypeError(f"Pipeline.from_module: stages={stages!r} must be an int")
            costs = (
                _layer_times([m for _, m in named], sample)
                if sample is not None
                else [1.0 + sum(p.numel() for p in m.parameters()) for _, m in named]
            )
            sizes = balance(costs, stages)
        built: list[Stage] = []
        i = 0
        for g, size in enumerate(sizes):
            group = named[i : i + size]
            i += size
            fn = group[0][1] if size == 1 else torch.nn.Sequential(*(m for _, m in group))
            label = group[0][0] if size == 1 else f"{group[0][0]}-{group[-1][0]}"
            name = f"{label}:{type(group[0][1]).__name__}" if size == 1 else f"layers{label}"
            device = devices[g] if devices is not None else None
            built.append(Stage(fn, name=name, executor="thread", device=device))
        return cls(built, microbatch=microbatch, **kwargs)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages in topological order, with their unique names."""
        return self._plan.stages

    @property
    def state(self) -> _State:
        return self._state

    def stats(self) -> PipelineStats:
        """Per-stage figures by name, and request outcomes as attributes (see ``PipelineStats``)."""
        return snapshot(self._sched)

    def to_mermaid(self) -> str:
        """The graph as Mermaid flowchart text (stages, where they run, batching, queues)."""
        return to_mermaid(self._plan, self.queue_size)

    def to_dot(self) -> str:
        """The graph as Graphviz DOT text."""
        return to_dot(self._plan, self.queue_size)

    def __repr__(self) -> str:
        names = " -> ".join(s.name for s in self.stages)
        return f"<Pipeline {self._state} [{names}] queue_size={self.queue_size}>"

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Pipeline:
        if self._state != "new":
            raise AsyncnnError(
                f"this pipeline is {self._state}: a Pipeline runs once; build a new one to rerun"
            )
        self._check_devices()
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            await self._sched.prepare()
        except BaseException:
            self._sched.release_remote()
            raise
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            self._sched.start(tg, self._loop)
        except BaseException as exc:
            tg.cancel_scope.cancel()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._tg = tg
        self._state = "running"
        if self._watchdog is not None:
            self._sched._spawn(tg, "watchdog", self._watch)
        if self.events.active:
            for stage in self.stages:
                self.events.emit("stage_started", stage.name)
        return self

    def _check_devices(self) -> None:
        for stage in self.stages:
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._tg is None:
            return None
        own: BaseException | None = None
        try:
            # A failed or cancelled body does not wait on a drain: everything ends now.
            await self._stop(self.drain_timeout if exc is None else 0)
        except BaseException as err:  # the drain was cancelled: a runtime task crashed, or
            own = err  # our caller gave up; either way the task group decides below
        pending = exc if exc is not None else own
        # The caller's own exception propagates as it is, not wrapped in an ExceptionGroup;
        # cancellations go to the task group, which does the cancel-scope bookkeeping.
        forward = pending if isinstance(pending, asyncio.CancelledError) else None
        tg, self._tg = self._tg, None
        try:
            suppress = await tg.__aexit__(
                type(forward) if forward else None,
                forward,
                forward.__traceback__ if forward else None,
            )
        except BaseExceptionGroup as group:
            # A stage raised KeyboardInterrupt or SystemExit: hand it on as itself, not inside
            # a group, so that the interpreter stops (or exits) as the user meant.
            urgent = _first_of(group, (KeyboardInterrupt, SystemExit))
            if urgent is not None:
                raise urgent from None
            raise
        if own is not None and not suppress:
            raise own
        return bool(suppress) and forward is not None and forward is exc

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds (``None``:
        no bound), then end the rest with ``PipelineClosed`` and stop every task and thread.

        Any task may call it; leaving ``async with`` afterwards only tidies up. Requests still
        in flight at the deadline end with ``PipelineClosed`` at once, even while a stage's
        thread is still busy with them.
        """
        await self._stop(timeout)

    async def _stop(self, timeout: float | None) -> None:  # noqa: ASYNC109
        if self._state == "new":
            self._state = "closed"
            return
        assert self._stopped is not None
        if self._state != "running":
            await self._stopped.wait()
            return
        self._state = "closing"
        sched = self._sched
        sched.close_admission()
        try:
            finished = sched.finished
            assert finished is not None
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await finished.wait()
        finally:
            sched.cancel_tasks()
            for scope in self._feeders:
                scope.cancel()
            sched.fail_all(sched.crash)
            with anyio.CancelScope(shield=True):
                await sched.stop_threads(_THREAD_JOIN_TIMEOUT)
                sched.release_remote()
                self._state = "closed"
                if self.events.active:
                    k = sched.counters
                    self.events.emit(
                        "pipeline_closed",
                        None,
                        admitted=k.admitted,
                        completed=k.completed,
                        failed=k.failed,
                        cancelled=k.cancelled,
                    )
                await self.events.drain()
            self._stopped.set()

    # -- requests --------------------------------------------------------------------------------

    def _closed_error(self) -> PipelineClosed:
        if self._state == "new":
            return PipelineClosed("pipeline is not running: enter it first with `async with pipe:`")
        return PipelineClosed(f"pipeline is {self._state}: it accepts no new requests")

    def submit_nowait(self, x: Any) -> asyncio.Future[Any]:
        """Admit ``x`` now and return a future of its result.

        Raises:
            PipelineFull: the admission queue is full (shed the load, or use ``submit``).
            PipelineClosed: the pipeline is not running.
        """
        if self._state != "running":
            raise self._closed_error()
        if not self._sched.admission.has_room():
            raise PipelineFull(
                f"pipeline is full ({self.queue_size} requests waiting for the first stage): "
                "retry later, use `await pipe.submit(x)` to wait, or raise queue_size"
            )
        return self._admit(x)

    def _admit(self, x: Any) -> asyncio.Future[Any]:
        # Callers checked that the pipeline runs and admission has room.
        if self._check_rows:
            self._check_request(x)
        req = Request(next(self._ids), self._loop.create_future())  # type: ignore[union-attr]
        self._sched.admit(req)
        self._sched.admission.send_nowait(Envelope(x, [req]))
        return req.future

    def _check_request(self, x: Any) -> None:
        limit = self.max_request_rows
        try:
            rows = count_rows(x)
        except PayloadTooDeep:
            raise
        except (TypeError, ValueError) as exc:
            if self.microbatch is not None:
                raise type(exc)(f"microbatch={self.microbatch}: {exc}") from None
            return  # non-tensor payloads have no rows to cap
        if limit is not None and rows > limit:
            raise ValueError(
                f"request of {rows} rows refused: max_request_rows={limit}; split it into "
                f"requests of at most {limit} rows, or raise max_request_rows"
            )

    async def submit(self, x: Any) -> asyncio.Future[Any]:
        """Admit ``x``, waiting while the pipeline is full, and return a future of its result.

        Raises:
            PipelineClosed: the pipeline is not running, or closed while we waited.
        """
        admission = self._sched.admission
        while self._state == "running" and not admission.has_room():
            await admission.wait_room()
        if self._state != "running":
            raise self._closed_error()
        return self._admit(x)

    async def send(self, x: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Run one request through the pipeline and return its result.

        Args:
            x: the request's payload.
            timeout: seconds to wait for admission and the result together; at the deadline
                the request is dropped (before compute if it has not started) and the built-in
                ``TimeoutError`` is raised.

        Raises:
            StageError: a stage raised on this request (``.stage`` names it, the cause is chained).
            PipelineClosed: the pipeline is not running, or closed before the request finished.
            TimeoutError: ``timeout`` passed.

        Cancelling the caller drops the request at the next stage boundary.
        """
        if timeout is not None:
            with anyio.fail_after(timeout):
                return await (await self.submit(x))
        if self._state == "running" and self._sched.admission.has_room():
            fut = self._admit(x)  # the fast path: no suspension before the result
        else:
            fut = await self.submit(x)
        return await fut

    async def stream(
        self,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        """Run every item of ``inputs`` (a sync or async iterable) and yield the results.

        Results come in input order, or in completion order with ``ordered=False``. A failed item
        raises its ``StageError`` from the iteration (ending it) unless ``return_exceptions=True``,
        which yields the exception in its place. At most about the pipeline's capacity of items
        are in flight, so memory stays flat however long ``inputs`` is. Leaving the loop early
        cancels the items still in flight (use ``contextlib.aclosing`` to leave promptly).
        """
        if self._state != "running":
            raise self._closed_error()
        assert self._tg is not None
        window = self._sched.capacity
        pending: Channel[asyncio.Future[Any]] = Channel(window, "stream")
        slots = asyncio.Semaphore(window)
        feed_error: list[BaseException] = []
        scope = anyio.CancelScope()
        outstanding: set[asyncio.Future[Any]] = set()  # unordered: admitted, not yet done
        feeding = True

        def on_done(fut: asyncio.Future[Any]) -> None:
            outstanding.discard(fut)
            if not pending.closed:
                pending.send_nowait(fut)  # never full: at most `window` are outstanding
                if not feeding and not outstanding:
                    pending.close()

        async def feed() -> None:
            nonlocal feeding
            with scope:
                try:
                    if isinstance(inputs, AsyncIterable):
                        async for x in inputs:
                            await self._feed_one(x, ordered, pending, slots, outstanding, on_done)
                    else:
                        for x in inputs:
                            await self._feed_one(x, ordered, pending, slots, outstanding, on_done)
                except Exception as exc:
                    feed_error.append(exc)
                finally:
                    feeding = False
                    self._feeders.discard(scope)
                    if ordered or not outstanding:
                        pending.close()  # unordered: else the last on_done closes it

        self._feeders.add(scope)
        self._tg.start_soon(feed, name="asyncnn:stream-feed")
        try:
            while True:
                try:
                    fut = pending.receive_nowait()
                except WouldBlock:
                    try:
                        fut = await pending.receive()
                    except EndOfStream:
                        break
                except EndOfStream:
                    break
                if not ordered:
                    slots.release()
                if return_exceptions:
                    try:
                        yield await fut
                    except Exception as exc:
                        yield exc
                else:
                    yield await fut
            if feed_error:
                raise feed_error[0]
        finally:
            scope.cancel()
            for fut in [*pending.drain_nowait(), *outstanding]:
                fut.cancel()

    async def _feed_one(
        self,
        x: Any,
        ordered: bool,
        pending: Channel[asyncio.Future[Any]],
        slots: asyncio.Semaphore,
        outstanding: set[asyncio.Future[Any]],
        on_done: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        if ordered:
            await pending.wait_room()
            fut = await self.submit(x)
            pending.send_nowait(fut)
        else:
            await slots.acquire()
            fut = await self.submit(x)
            outstanding.add(fut)
            fut.add_done_callback(on_done)


def _first_of(
    group: BaseExceptionGroup[BaseException], kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, kinds):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_of(exc, kinds)
            if found is not None:
                return found
    return None


def _layer_times(layers: list[Any], sample: Any, repeats: int = 3) -> list[float]:
    """Seconds each layer takes on the activations that reach it (median of ``repeats``)."""
    import torch

    times: list[float] = []
    x = sample
    with torch.inference_mode():
        for layer in layers:
            runs = []
            y = layer(x)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                y = layer(x)
                runs.append(time.perf_counter() - t0)
            times.append(sorted(runs)[len(runs) // 2] + 1e-9)
            x = y
    return times
