"""Turns a validated plan into running tasks: channels, stage workers, joins, the sink, shutdown.

Shape of a running pipeline::

    admission ─▶ [stage a] ─▶ ch ─▶ [stage b] ─┬▶ ch ─▶ [stage c] ─┬▶ join ─▶ [stage d] ─▶ sink
                                               └▶ ch ─▶ [stage e] ─┘

Every arrow is a bounded :class:`~asyncnn.channels.Channel`. A stage with ``workers=k`` runs k
worker tasks on its input channel; the last worker to finish closes the stage's outputs, so
closing admission drains the whole graph in order and the sink finishes last.

Exactly-once bookkeeping lives here: a request is in ``inflight`` from admission until it ends,
and whichever place ends it (the sink, a failing stage, a boundary that finds it cancelled, or the
forced shutdown) pops it from there first; only the one that pops it counts it.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import CoroutineType
from typing import Any

import anyio
import torch
from anyio import EndOfStream, WouldBlock

from .batching import (
    Batch,
    Batcher,
    Envelope,
    Item,
    Request,
    RowMismatch,
    collate,
    concat_rows,
    count_rows,
    finish,
    run_batch,
    signature,
    split_rows,
)
from .channels import Channel
from .devices import Completion, Device, make_device
from .errors import PipelineClosed, StageError
from .executors import ThreadWorker, prepare_call
from .graph import Plan
from .stage import Stage

__all__ = ["Counters", "Scheduler", "StageCounters"]

_MISSING = object()


def _returned_coroutine(node: _Node, coro: CoroutineType[Any, Any, Any]) -> TypeError:
    coro.close()  # never awaited on purpose: close it so Python does not warn about it
    return TypeError(
        f"stage {node.stage.name!r} returned a coroutine: its function is sync but calls an "
        "async one; make the stage's function `async def` and await it there"
    )


def _launch_on(
    device: Device, to_host: bool, call: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[Any, Completion]:
    return device.launch(call, args, to_host)


def _open_device(device: Any, fn: Any) -> Device:
    # Runs on the stage's thread: creating streams and moving a module may block for a while.
    impl = make_device(device)
    impl.place(fn)
    return impl


class LatencyHistogram:
    """Seconds per call in log-spaced buckets (8 per doubling, 1 µs to ~18 min): quantiles
    within ~9% from 250 counters, however many calls."""

    __slots__ = ("counts", "total")
    PER_DOUBLING = 8
    BUCKETS = 8 * 30 + 1

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.total = 0

    def add(self, seconds: float) -> None:
        i = 0 if seconds <= 1e-6 else int(math.log2(seconds * 1e6) * self.PER_DOUBLING) + 1
        self.counts[min(i, self.BUCKETS - 1)] += 1
        self.total += 1

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) in seconds: the geometric middle of its bucket; 0 if empty."""
        if not self.total:
            return 0.0
        rank = q * (self.total - 1)
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen > rank:
                if i == 0:
                    return 1e-6
                return 1e-6 * 2 ** ((i - 0.5) / self.PER_DOUBLING)
        return 1e-6 * 2 ** ((self.BUCKETS - 1) / self.PER_DOUBLING)


class StageCounters:
    """Mutable per-stage figures, updated on the hot path (plain int adds).

    Call times are measured on every call of a thread, device or batching stage; for stages on
    the loop, one call in 64 is timed and their mean stands for every call (timing costs more
    than a cheap async call), unless an event subscriber wants every ``batch_done``.
    """

    __slots__ = (
        "active",
        "batches",
        "blocked",
        "busy",
        "failures",
        "items",
        "latency",
        "released",
        "retries",
        "rows",
        "timed",
    )

    def __init__(self) -> None:
        self.items = 0
        self.batches = 0
        self.failures = 0
        self.busy = 0.0  # seconds inside the timed calls of the stage's function
        self.timed = 0  # calls timed (all of them, or a sample for cheap loop stages)
        self.blocked = 0.0  # seconds its workers waited for room downstream (backpressure)
        self.active = 0  # calls running now
        self.latency = LatencyHistogram()
        self.rows = 0  # batching stages: rows in the batches formed (for the mean batch size)
        self.retries = 0  # batched stages: re-runs of part of a failed batch
        self.released = {"full": 0, "delay": 0, "drain": 0}  # why batches were formed


@dataclass
class Counters:
    """Request outcomes: ``admitted == completed + failed + cancelled + in_flight``."""

    admitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


class _JoinState:
    """Parks the parts of each request until one has arrived on every port."""

    __slots__ = ("parts", "ports")

    def __init__(self, ports: int) -> None:
        self.ports = ports
        self.parts: dict[int, list[Any]] = {}

    def offer(
        self, port: int, req: Request, payload: Any, ports: int | None = None
    ) -> tuple[Any, ...] | None:
        """Park ``payload`` as part ``port`` of ``req``; all parts once the last one arrives.
        ``ports`` overrides the count for this request (micro-batch chunks vary per request)."""
        slot = self.parts.get(req.id)
        if slot is None:
            slot = [_MISSING] * (ports or self.ports)
            self.parts[req.id] = slot
            if req.parked is None:
                req.parked = []
            req.parked.append(self.parts)
        slot[port] = payload
        if any(p is _MISSING for p in slot):
            return None
        del self.parts[req.id]
        assert req.parked is not None
        req.parked.remove(self.parts)
        return tuple(slot)


class _Node:
    """Run-time state of one stage."""

    def __init__(self, stage: Stage, index: int, inputs: tuple[int, ...], queue_size: int):
        self.stage = stage
        self.index = index
        self.inputs = inputs
        self.call = prepare_call(stage.fn, stage.runs_on)
        if stage.batch is not None and len(inputs) > 1:
            # A batching join gets its merged parts as one tuple: call it with them spread out,
            # as an unbatched join is called.
            joined = self.call
            self.call = lambda parts: joined(*parts)
        self.runs_on = stage.runs_on
        self.is_join = len(inputs) > 1
        # One channel per input port; a join also gets a merged work channel fed by collectors.
        self.ports = [
            Channel[Envelope](queue_size, f"{stage.name}[{p}]") for p in range(len(inputs))
        ]
        self.work = (
            Channel[Envelope](queue_size, f"{stage.name}.joined") if self.is_join else self.ports[0]
        )
        self.outs: list[Channel[Envelope]] = []
        # Per output: does its consumer take a merged batch as it is (a batching stage, the
        # sink), or one envelope per request?
        self.out_merged: list[bool] = []
        self.batch = stage.batch
        # Formed batches wait here for a free runner; one slot keeps batches forming late
        # (and large) while every runner is busy.
        self.batches = Channel[Batch](1, f"{stage.name}.batches")
        self.live_workers = stage.workers
        self.live_collectors = len(inputs)
        self.join = _JoinState(len(inputs)) if self.is_join else None
        self.counters = StageCounters()
        self.threads: list[ThreadWorker] = []
        # A torch.device, or None: inputs are used wherever they are.
        self.device = None if stage.device is None else torch.device(stage.device)
        self.pool: Any = None  # a RayPool for executor="ray" stages, made by prepare()
        self.to_host = False  # set by the scheduler: a consumer needs the output on the host

    def worker_exited(self) -> None:
        """The last worker to leave closes the stage's outputs (the end of its stream)."""
        self.live_workers -= 1
        if self.live_workers == 0:
            for ch in self.outs:
                ch.close()


class Scheduler:
    """Owns the channels and tasks of one running pipeline.

    ``start(tg)`` launches every task in the caller's task group; ``admission`` is where requests
    enter; ``finished`` is set once the sink has seen the end of the stream (a full drain).
    """

    def __init__(
        self,
        plan: Plan,
        queue_size: int,
        *,
        output_device: Any = "cpu",
        torch_threads: int | None = None,
        microbatch: int | None = None,
    ) -> None:
        self.plan = plan
        self.queue_size = queue_size
        self.torch_threads = torch_threads
        self.microbatch = microbatch
        self._saved_threads: int | None = None
        self.inflight: dict[int, Request] = {}
        self.counters = Counters()
        self.nodes = [_Node(n.stage, i, n.inputs, queue_size) for i, n in enumerate(plan.nodes)]
        self.sink_ports = [Channel[Envelope](queue_size, f"output[{p}]") for p in plan.outputs]
        self.sink_join = _JoinState(len(plan.outputs)) if len(plan.outputs) > 1 else None
        self.live_sinks = len(self.sink_ports)
        self.finished: asyncio.Event | None = None
        self.crash: BaseException | None = None
        self._scopes: list[anyio.CancelScope] = []
        # Set by the pipeline while someone listens to events: observe(kind, stage, **fields).
        self.observe: Callable[..., None] | None = None
        self.started_at = 0.0
        # Wire every producer to the port channels of its consumers.
        input_outs: list[Channel[Envelope]] = []

        def wire(src: int, ch: Channel[Envelope], merged_ok: bool) -> None:
            if src == -1:
                input_outs.append(ch)
            else:
                producer = self.nodes[src]
                producer.outs.append(ch)
                padded = producer.batch is not None and producer.batch.pad is not None
                producer.out_merged.append(merged_ok and not padded)

        for node in self.nodes:
            for port, src in enumerate(node.inputs):
                wire(src, node.ports[port], node.batch is not None and not node.is_join)
        for port, src in enumerate(plan.outputs):
            wire(src, self.sink_ports[port], True)
        self.input_outs = input_outs
        self.admission = (
            input_outs[0]
            if len(input_outs) == 1 and microbatch is None
            else Channel[Envelope](queue_size, "input")
        )
        self.chunks = _JoinState(1) if microbatch is not None else None
        # A placed stage copies its output to the host when a consumer lives elsewhere.
        for node in self.nodes:
            if node.device is not None and node.device.type != "cpu":
                here = node.device
                users = [self.nodes[j].device for j, _ in plan.consumers(node.index)]
                if node.index in plan.outputs and output_device is not None:
                    users.append(output_device)
                node.to_host = any(u is None or str(u) != str(here) for u in users)

    @property
    def capacity(self) -> int:
        """How many requests the graph can hold at once (all buffers plus running calls)."""
        chans = 1 + len(self.sink_ports) + sum(len(n.ports) + n.is_join for n in self.nodes)
        return chans * self.queue_size + sum(n.stage.workers for n in self.nodes)

    # -- lifecycle -------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Start what must exist before the tasks: the Ray replicas of remote stages."""
        remote = [n for n in self.nodes if n.runs_on == "ray"]
        if not remote:
            return
        from .executors_ray import RayPool, ensure_ray

        await anyio.to_thread.run_sync(ensure_ray)
        for node in remote:
            st = node.stage
            node.pool = RayPool(st.name, st.fn, st.replicas, st.resources, st.max_inflight)
            # One worker task per call a replica may hold: least-loaded dispatch picks the replica.
            node.live_workers = node.pool.capacity
        await asyncio.gather(*(n.pool.ready() for n in remote))

    def release_remote(self) -> None:
        for node in self.nodes:
            if node.pool is not None:
                node.pool.release()

    def start(self, tg: anyio.abc.TaskGroup, loop: asyncio.AbstractEventLoop) -> None:
        self.finished = asyncio.Event()
        self.started_at = time.perf_counter()
        if self.admission is not self.input_outs[0] or self.microbatch is not None:
            self._spawn(tg, "input", self._input)
        if self.torch_threads is not None:
            import torch

            self._saved_threads = torch.get_num_threads()
        for node in self.nodes:
            name = node.stage.name
            if node.is_join:
                for port, ch in enumerate(node.ports):
                    self._spawn(tg, f"{name}:join{port}", self._collect, node, port, ch)
            if node.batch is not None:
                self._start_batched(tg, loop, node)
                continue
            for w in range(node.live_workers):
                worker, waiter = self._threads_for(node, w, loop)
                if node.device is None:
                    self._spawn(tg, f"{name}:{w}", self._work, node, worker)
                    continue
                launched = self._launched(node, w)
                self._spawn(tg, f"{name}:{w}:launch", self._launch, node, worker, launched)
                self._spawn(tg, f"{name}:{w}:complete", self._complete, node, waiter, launched)
        for port, ch in enumerate(self.sink_ports):
            self._spawn(tg, f"output{port}", self._sink, port, ch)

    def _start_batched(
        self, tg: anyio.abc.TaskGroup, loop: asyncio.AbstractEventLoop, node: _Node
    ) -> None:
        """A batching stage: one former, and per worker a runner and a completer."""
        name = node.stage.name
        self._spawn(tg, f"{name}:form", self._form, node)
        for w in range(node.live_workers):
            worker, waiter = self._threads_for(node, w, loop)
            launched = self._launched(node, w)
            self._spawn(tg, f"{name}:{w}:run", self._run_batches, node, worker, launched)
            self._spawn(tg, f"{name}:{w}:complete", self._complete, node, waiter, launched)

    def _threads_for(
        self, node: _Node, w: int, loop: asyncio.AbstractEventLoop
    ) -> tuple[ThreadWorker | None, ThreadWorker | None]:
        """Worker ``w``'s own thread (sync stages) and its device waiter thread (placed ones)."""
        worker = waiter = None
        name = node.stage.name
        if node.runs_on == "thread":
            worker = ThreadWorker(f"{name}:{w}", loop)
            node.threads.append(worker)
            if self.torch_threads is not None:
                worker.run(torch.set_num_threads, (self.torch_threads,))
        if node.device is not None:
            waiter = ThreadWorker(f"{name}:{w}:wait", loop)
            node.threads.append(waiter)
        return worker, waiter

    @staticmethod
    def _launched(node: _Node, w: int) -> Channel[tuple[Envelope, Any, Completion, float]]:
        """Calls handed to the device (or a remote replica) and not yet completed, in order."""
        return Channel(node.stage.max_inflight, f"{node.stage.name}:{w}:inflight")

    def _spawn(
        self, tg: anyio.abc.TaskGroup, name: str, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        # Each runtime task gets its own cancel scope so that a forced stop cancels the runtime
        # without cancelling the task that owns the pipeline (whose body runs in tg's scope).
        scope = anyio.CancelScope()
        self._scopes.append(scope)

        async def run() -> None:
            with scope:
                try:
                    await fn(*args)
                except BaseException as exc:
                    if not isinstance(exc, asyncio.CancelledError) and self.crash is None:
                        self.crash = exc  # the cause that every failed request will chain
                    raise

        tg.start_soon(run, name=f"asyncnn:{name}")

    def cancel_tasks(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    def close_admission(self) -> None:
        self.admission.close()

    async def stop_threads(self, timeout: float | None) -> None:  # noqa: ASYNC109
        workers = [w for n in self.nodes for w in n.threads]
        for w in workers:
            w.stop()
        for w in workers:
            await w.wait_stopped(timeout)
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)  # torch's setting is process-wide

    def fail_all(self, reason: BaseException | None) -> None:
        """End every request still in flight with ``PipelineClosed`` (forced shutdown)."""
        for req in list(self.inflight.values()):
            exc = PipelineClosed(
                "pipeline closed before this request finished "
                "(aclose timeout, cancellation, or a runtime failure)"
            )
            if reason is not None:
                exc.__cause__ = reason
            self._end_failed(req, exc)
        for node in self.nodes:
            for ch in (*node.ports, node.work):
                ch.drain_nowait()

    # -- stalls ----------------------------------------------------------------------------------

    def progress(self) -> int:
        """A number that grows whenever any stage finishes a call or any request ends."""
        k = self.counters
        return (
            sum(n.counters.batches + n.counters.failures + n.counters.retries for n in self.nodes)
            + k.completed
            + k.failed
            + k.cancelled
        )

    def locate_oldest(self) -> dict[str, Any] | None:
        """Where the oldest request in flight is held: the stage, and whether that stage's input
        is empty and its output full. Scans the queues: for stall reports, not the hot path."""
        if not self.inflight:
            return None
        oldest = next(iter(self.inflight.values()))
        holder: _Node | None = None
        where = "running in the stage"
        for node in self.nodes:
            for ch in (*node.ports, node.work):
                if any(oldest in e.requests for e in ch._buf):
                    holder, where = node, "waiting in the stage's input queue"
                    break
            if holder is not None:
                break
        if holder is None:
            busy = [n for n in self.nodes if self._running_calls(n) > 0]
            holder = busy[0] if busy else None
        if holder is None:
            return {"stage": None, "request": oldest.id, "where": "between stages"}
        return {
            "stage": holder.stage.name,
            "request": oldest.id,
            "where": where,
            "input_empty": len(holder.work) == 0,
            "output_full": any(not ch.has_room() for ch in holder.outs),
            "calls_running": self._running_calls(holder),
        }

    def _running_calls(self, node: _Node) -> int:
        """Calls of ``node`` in progress. Loop stages do not count their calls on the hot path:
        a worker neither waiting for input nor for room downstream is inside a call."""
        if node.runs_on in ("thread", "ray") or node.batch is not None or node.device is not None:
            return node.counters.active
        st = node.work.statistics()
        blocked_out = sum(ch.statistics().waiting_senders for ch in node.outs)
        return max(0, node.live_workers - st.waiting_receivers - blocked_out)

    # -- request outcomes ------------------------------------------------------------------------

    def admit(self, req: Request) -> None:
        self.inflight[req.id] = req
        self.counters.admitted += 1

    def _release(self, req: Request) -> bool:
        """Take ``req`` out of flight; True for the one caller that gets to count its outcome."""
        if self.inflight.pop(req.id, None) is None:
            return False
        if req.parked:
            for parts in req.parked:
                parts.pop(req.id, None)
            req.parked = None
        return True

    def _drop(self, req: Request) -> None:
        """A boundary found ``req`` already ended (cancelled by its caller, or failed elsewhere)."""
        if self._release(req) and req.future.cancelled():
            self.counters.cancelled += 1

    def _end_failed(self, req: Request, exc: BaseException) -> None:
        if self._release(req):
            if req.future.cancelled():
                self.counters.cancelled += 1
                return
            self.counters.failed += 1
            if not req.future.done():
                req.future.set_exception(exc)

    def _fail(
        self, node: _Node, env: Envelope, cause: Exception, message: str | None = None
    ) -> None:
        node.counters.failures += 1
        name = node.stage.name
        obs = self.observe
        if obs is not None:
            obs("request_failed", name, error=type(cause).__name__, requests=len(env.requests))
        text = message or f"raised {type(cause).__name__}: {cause}"
        for req in env.requests:
            err = StageError(name, f"stage {name!r} {text}")
            err.__cause__ = cause
            self._end_failed(req, err)

    # -- tasks -----------------------------------------------------------------------------------

    async def _work(self, node: _Node, worker: ThreadWorker | None) -> None:
        inq = node.work
        recv_nowait, recv = inq.receive_nowait, inq.receive
        call, runs_on, is_join = node.call, node.runs_on, node.is_join
        counters = node.counters
        outs = node.outs
        single_out = outs[0] if len(outs) == 1 else None
        run: Callable[[Callable[..., Any], tuple[Any, ...]], Awaitable[Any]] | None = (
            worker.run if worker is not None else None
        )
        on_loop = runs_on == "loop"
        skip = 0 if runs_on in ("thread", "ray") else 63
        pool = node.pool
        now = time.perf_counter
        tick = 0
        try:
            while True:
                try:
                    env = recv_nowait()
                except WouldBlock:
                    try:
                        env = await recv()
                    except EndOfStream:
                        return
                except EndOfStream:
                    return
                reqs = env.requests
                if len(reqs) == 1:
                    if reqs[0].future.done():
                        self._drop(reqs[0])
                        continue
                else:
                    live = [r for r in reqs if not r.future.done()]
                    if len(live) != len(reqs):
                        for r in reqs:
                            if r.future.done():
                                self._drop(r)
                        if not live:
                            continue
                        # Producers split merged batches for unbatched stages, so this only
                        # happens to requests that share one payload (fan-out copies).
                        env.requests = reqs = live
                # One call in 64 of a cheap loop stage is timed (timing costs more than such a
                # call); every call of a thread stage, and every call while events are heard.
                tick -= 1
                if tick >= 0 and self.observe is None:
                    try:
                        if on_loop:
                            out = await (call(*env.payload) if is_join else call(env.payload))
                        else:
                            out = call(*env.payload) if is_join else call(env.payload)
                            if type(out) is CoroutineType:
                                raise _returned_coroutine(node, out)
                    except Exception as exc:
                        self._fail(node, env, exc)
                        continue
                else:
                    tick = skip
                    t0 = now()
                    counters.active += 1
                    try:
                        if runs_on == "loop":
                            out = await (call(*env.payload) if is_join else call(env.payload))
                        elif runs_on == "inline":
                            out = call(*env.payload) if is_join else call(env.payload)
                        elif pool is not None:
                            args = env.payload if is_join else (env.payload,)
                            out = await pool.call("run", args)
                        else:
                            assert run is not None
                            out = await run(call, env.payload if is_join else (env.payload,))
                        if runs_on != "loop" and type(out) is CoroutineType:
                            raise _returned_coroutine(node, out)
                    except Exception as exc:
                        counters.active -= 1
                        self._fail(node, env, exc)
                        continue
                    counters.active -= 1
                    self._timed(node, now() - t0, len(reqs))
                counters.items += len(reqs)
                counters.batches += 1
                env.payload = out
                if single_out is not None:
                    try:
                        single_out.send_nowait(env)
                    except WouldBlock:
                        t0 = now()
                        await single_out.send(env)
                        waited = now() - t0
                        counters.blocked += waited
                        if self.observe is not None:
                            self.observe("backpressure", node.stage.name, seconds=waited)
                else:
                    await self._emit(node, env)
        finally:
            node.worker_exited()

    def _timed(self, node: _Node, seconds: float, size: int) -> None:
        c = node.counters
        obs = self.observe
        c.busy += seconds
        c.timed += 1
        c.latency.add(seconds)
        if obs is not None:
            obs("batch_done", node.stage.name, size=size, seconds=seconds)

    def _blocked(self, node: _Node, seconds: float) -> None:
        """Count ``seconds`` of waiting for room downstream; tell listeners of the wait."""
        node.counters.blocked += seconds
        obs = self.observe
        if obs is not None:
            obs("backpressure", node.stage.name, seconds=seconds)

    async def _emit(self, node: _Node, env: Envelope) -> None:
        """Send a stage's output on: a merged batch stays merged for consumers that take it and
        is split into one envelope per request for the others."""
        t0 = time.perf_counter()
        waited = False
        single = len(node.outs) == 1
        for ch, merged in zip(node.outs, node.out_merged, strict=True):
            if env.parts is None or merged:
                envs = [
                    env
                    if single
                    else Envelope(env.payload, env.requests, env.chunk, env.rows, env.parts)
                ]
            else:
                envs = env.split()
            for e in envs:
                try:
                    ch.send_nowait(e)
                except WouldBlock:
                    waited = True
                    await ch.send(e)
        if waited:
            self._blocked(node, time.perf_counter() - t0)

    @staticmethod
    async def _send_all(outs: list[Channel[Envelope]], env: Envelope) -> None:
        # Fan-out from the input: every consumer gets its own envelope around the same payload.
        # Read the fields first: once a consumer holds `env` it may replace its payload.
        payload, requests, chunk = env.payload, env.requests, env.chunk
        for i, ch in enumerate(outs):
            e = env if i == 0 else Envelope(payload, requests, chunk)
            try:
                ch.send_nowait(e)
            except WouldBlock:
                await ch.send(e)

    async def _input(self) -> None:
        """Between admission and the first stages: micro-batch splitting and input fan-out."""
        size = self.microbatch
        outs = self.input_outs
        try:
            while True:
                try:
                    env = await self.admission.receive()
                except EndOfStream:
                    return
                if size is None:
                    await self._send_all(outs, env)
                    continue
                try:
                    parts = split_rows(env.payload, size)
                except Exception as exc:
                    for req in env.requests:
                        self._end_failed(req, exc)
                    continue
                for i, part in enumerate(parts):
                    await self._send_all(outs, Envelope(part, env.requests, (i, len(parts))))
        finally:
            for ch in outs:
                ch.close()

    async def _take(self, inq: Channel[Envelope]) -> Envelope | None:
        """The next envelope with live requests, or None at the end of the stream."""
        while True:
            try:
                env = inq.receive_nowait()
            except WouldBlock:
                try:
                    env = await inq.receive()
                except EndOfStream:
                    return None
            except EndOfStream:
                return None
            live = [r for r in env.requests if not r.future.done()]
            if len(live) != len(env.requests):
                for r in env.requests:
                    if r.future.done():
                        self._drop(r)
                if not live:
                    continue
                env.requests = live
            return env

    async def _launch(
        self,
        node: _Node,
        worker: ThreadWorker,
        launched: Channel[tuple[Envelope, Any, Completion, float]],
    ) -> None:
        """A placed stage, part one: hand batches to the device without waiting for them."""
        assert node.device is not None
        try:
            device: Device = await worker.run(_open_device, (node.device, node.stage.fn))
            call, is_join, to_host = node.call, node.is_join, node.to_host
            while (env := await self._take(node.work)) is not None:
                args = env.payload if is_join else (env.payload,)
                t0 = time.perf_counter()
                node.counters.active += 1
                try:
                    out, done = await worker.run(device.launch, (call, args, to_host))
                except Exception as exc:
                    node.counters.active -= 1
                    self._fail(node, env, exc)
                    continue
                await launched.send((env, out, done, t0))  # at most max_inflight on the streams
        finally:
            launched.close()

    async def _complete(
        self,
        node: _Node,
        waiter: ThreadWorker | None,
        launched: Channel[tuple[Envelope, Any, Completion, float]],
    ) -> None:
        """Part two of a placed or batching stage: await each batch's completion in launch
        order (a device's event, on a waiter thread), then pass it on."""
        counters = node.counters
        batched = node.batch is not None
        try:
            while True:
                try:
                    env, out, done, t0 = await launched.receive()
                except EndOfStream:
                    return
                if not done.done:  # a non-blocking query; the blocking wait is the waiter's
                    assert waiter is not None
                    try:
                        await waiter.run(done.wait, ())
                    except Exception as exc:  # an asynchronous CUDA error surfaces here
                        counters.active -= 1
                        self._fail(node, env, exc)
                        continue
                done.keep = ()
                counters.active -= 1
                # From launch to completion: on a device, batches in flight overlap, so busy
                # time can exceed wall time per worker (a busy fraction above 1 means overlap).
                dt = time.perf_counter() - t0
                counters.busy += dt
                counters.timed += 1
                counters.latency.add(dt)
                obs = self.observe
                if obs is not None:
                    obs("batch_done", node.stage.name, size=len(env.requests), seconds=dt)
                if not batched:  # a batching stage counts when it runs (retries apart)
                    counters.items += len(env.requests)
                    counters.batches += 1
                env.payload = out
                await self._emit(node, env)
        finally:
            node.worker_exited()

    # -- batching stages -------------------------------------------------------------------------

    def _file(self, node: _Node, batcher: Batcher, env: Envelope, now: float) -> None:
        """Put an arriving envelope's requests into the batcher (or fail the unbatchable)."""
        spec = node.batch
        assert spec is not None
        pad = spec.pad is not None
        reqs = env.requests
        try:
            key = signature(env.payload, pad)
            total = count_rows(env.payload)
        except (TypeError, ValueError) as exc:
            self._fail(node, env, exc, f"cannot batch this request: {exc}")
            return
        if total == 0:
            self._fail(node, env, ValueError("0 rows"), "got a request with 0 rows (dim 0 is 0)")
            return
        if env.rows is None:
            if reqs[0].future.done():
                self._drop(reqs[0])
            else:
                batcher.add(Item(reqs[0], env.payload, 0, total, now), key)
            return
        start = 0
        for req, n in zip(reqs, env.rows, strict=True):
            if req.future.done():
                self._drop(req)
            else:
                batcher.add(Item(req, env.payload, start, start + n, now), key)
            start += n

    async def _form(self, node: _Node) -> None:
        """Form batches: pull arrivals, release on size, delay or drain, when a runner is free."""
        spec = node.batch
        assert spec is not None
        batcher = Batcher(spec)
        inq, out = node.work, node.batches
        clock = asyncio.get_running_loop().time
        released = node.counters.released
        closed = False
        try:
            while True:
                while not closed and batcher.pending_rows < spec.max_size:
                    try:
                        env = inq.receive_nowait()
                    except WouldBlock:
                        break
                    except EndOfStream:
                        closed = True
                        break
                    self._file(node, batcher, env, clock())
                if not out.has_room():
                    await out.wait_room()  # every runner is busy: arrivals wait in the queue
                    continue
                batch = batcher.pop(clock(), draining=closed)
                if batch is not None:
                    released[batch.reason] += 1
                    obs = self.observe
                    if obs is not None:
                        obs("batch_formed", node.stage.name, size=batch.rows, reason=batch.reason)
                    out.send_nowait(batch)
                    continue
                if closed:
                    return  # drained: pop(draining=True) left nothing behind
                deadline = batcher.next_deadline()
                wait = math.inf if deadline is None else max(0.0, deadline - clock())
                with anyio.move_on_after(wait):
                    try:
                        env = await inq.receive()
                    except EndOfStream:
                        closed = True
                    else:
                        self._file(node, batcher, env, clock())
        finally:
            out.close()

    async def _run_batches(
        self,
        node: _Node,
        worker: ThreadWorker | None,
        launched: Channel[tuple[Envelope, Any, Completion, float]],
    ) -> None:
        """Run formed batches: collate, call, check rows and split, on the stage's thread."""
        device: Device | None = None
        try:
            if node.device is not None:
                assert worker is not None
                device = await worker.run(_open_device, (node.device, node.stage.fn))
            while True:
                try:
                    batch = await node.batches.receive()
                except EndOfStream:
                    return
                items = []
                for item in batch.items:  # cancelled or timed out while waiting: not computed
                    if item.request.future.done():
                        self._drop(item.request)
                    else:
                        items.append(item)
                if items:
                    node.counters.batches += 1
                    node.counters.rows += sum(i.rows for i in items)
                    await self._run_items(node, worker, device, items, launched)
        finally:
            launched.close()

    async def _run_items(
        self,
        node: _Node,
        worker: ThreadWorker | None,
        device: Device | None,
        items: list[Item],
        launched: Channel[tuple[Envelope, Any, Completion, float]],
    ) -> None:
        spec = node.batch
        assert spec is not None
        name, call = node.stage.name, node.call
        ranges = [(i.source, i.start, i.stop) for i in items]
        pad = None if spec.pad is None else float(spec.pad)
        launch = None if device is None else functools.partial(_launch_on, device, node.to_host)
        counters = node.counters
        t0 = time.perf_counter()
        counters.active += 1
        try:
            if worker is not None:
                args = (name, call, ranges, spec.max_size, pad, launch)
                out, rows, parts, done = await worker.run(run_batch, args)
            elif node.pool is not None:  # one remote call per batch; collated on the replica
                result = await node.pool.call("run_batch", ranges, spec.max_size, pad)
                rows = [i.rows for i in items]
                lengths = [i.source.shape[1] for i in items] if pad is not None else None
                out, rows, parts = finish(name, result, rows, lengths)
                done = None
            elif node.runs_on == "loop":
                payload, rows, lengths = collate(ranges, pad)
                if sum(rows) <= spec.max_size:
                    result = await call(payload)
                else:
                    result = concat_rows(
                        [await call(p) for p in split_rows(payload, spec.max_size)]
                    )
                out, rows, parts = finish(name, result, rows, lengths)
                done = None
            else:
                out, rows, parts, done = run_batch(name, call, ranges, spec.max_size, pad)
        except RowMismatch as exc:
            counters.active -= 1
            self._fail_items(node, items, exc)  # the stage itself is wrong: no retry helps
            return
        except Exception as exc:
            counters.active -= 1
            if len(items) > 1 and spec.isolate_failures:
                # Bisect: rerun each half until the failing request is alone.
                mid = len(items) // 2
                for half in (items[:mid], items[mid:]):
                    live = [i for i in half if not i.request.future.done()]
                    if live:
                        counters.retries += 1
                        await self._run_items(node, worker, device, live, launched)
                return
            self._fail_items(node, items, exc)
            return
        counters.items += len(items)
        env = Envelope(out, [i.request for i in items], None, rows, parts)
        await launched.send((env, out, Completion(None) if done is None else done, t0))

    def _fail_items(self, node: _Node, items: list[Item], exc: Exception) -> None:
        self._fail(node, Envelope(None, [i.request for i in items]), exc)

    async def _collect(self, node: _Node, port: int, ch: Channel[Envelope]) -> None:
        join = node.join
        assert join is not None
        try:
            while True:
                try:
                    env = await ch.receive()
                except EndOfStream:
                    return
                for req in env.requests:
                    if req.future.done():
                        self._drop(req)
                        continue
                    parts = join.offer(port, req, env.payload)
                    if parts is not None:
                        await node.work.send(Envelope(parts, [req], env.chunk))
        finally:
            node.live_collectors -= 1
            if node.live_collectors == 0:
                node.work.close()

    async def _sink(self, port: int, ch: Channel[Envelope]) -> None:
        recv_nowait, recv = ch.receive_nowait, ch.receive
        inflight = self.inflight
        counters = self.counters
        join = self.sink_join
        chunks = self.chunks
        try:
            while True:
                try:
                    env = recv_nowait()
                except WouldBlock:
                    try:
                        env = await recv()
                    except EndOfStream:
                        return
                except EndOfStream:
                    return
                payload = env.payload
                parts = env.parts
                for k, req in enumerate(env.requests):
                    if parts is not None:
                        payload = parts[k]
                    fut = req.future
                    if fut.done():
                        self._drop(req)
                        continue
                    if join is not None:
                        joined = join.offer(port, req, payload)
                        if joined is None:
                            continue
                        result: Any = joined
                    else:
                        result = payload
                    if chunks is not None and env.chunk is not None:
                        index, total = env.chunk
                        pieces = chunks.offer(index, req, result, total)
                        if pieces is None:
                            continue
                        try:
                            result = concat_rows(list(pieces))
                        except Exception as exc:
                            self._end_failed(req, exc)
                            continue
                    if inflight.pop(req.id, None) is not None:
                        counters.completed += 1
                        fut.set_result(result)
        finally:
            self.live_sinks -= 1
            if self.live_sinks == 0 and self.finished is not None:
                self.finished.set()
