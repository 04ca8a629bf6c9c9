"""One running graph: builds channels and stage contexts from the wiring, starts the kinds.

Shape of a running pipeline::

    admission ─▶ [stage a] ─▶ ch ─▶ [stage b] ─┬▶ ch ─▶ [stage c] ─┬▶ join ─▶ [stage d] ─▶ sink
                                               └▶ ch ─▶ [stage e] ─┘

Every arrow is a bounded :class:`~asyncnn.channels.Channel` that ends itself when its last sender
is done, so closing admission drains the whole graph in order. A sink is no queue: what the last
stages send to it ends its requests in their own task (``workers.edges.Sink``); the graph has
drained when the senders of every sink are done.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import anyio.abc

from ..batching import Envelope, Request
from ..channels import Channel
from ..executors import prepare_call
from ..graph import Plan, PlanNode
from .admission import Admission
from .context import Outbox, Outlet, StageContext
from .deadlines import Deadlines
from .joins import PartTable
from .kinds import calls_ahead, kind_of, start_stage
from .ledger import Ledger
from .probe import StageProbe
from .supervisor import Supervisor
from .view import RuntimeView, StageView, StepStats
from .wiring import SINK, NodeWiring, Target, wire
from .workers.edges import Router, Sink, run_input

__all__ = ["Runtime"]


def _urgency(env: Envelope) -> tuple[int, float, float]:
    """An envelope's place in a ranked queue: its first request's (a merged batch's requests
    were taken most urgent first)."""
    req = env.requests[0]
    d = req.deadline
    return req.priority, math.inf if d is None else d, req.since


class Runtime:
    """The channels, stage contexts and tasks of one pipeline.

    ``start(tg)`` launches every task in the caller's task group; ``admission`` is where
    requests enter; ``drained()`` returns once every sink has seen the end of the stream.
    """

    def __init__(
        self,
        plan: Plan,
        queue_size: int,
        *,
        output_device: Any = "cpu",
        torch_threads: int | None = None,
        microbatch: int | None = None,
        max_in_flight: int | None = None,
        compute_nice: int | str = 0,
        tracing: Any = None,
    ) -> None:
        self.plan = plan
        self.compute_nice = compute_nice
        self.torch_threads = torch_threads
        self.microbatch = microbatch
        self.ledger = Ledger()
        w = self.wiring = wire(plan, queue_size, output_device, microbatch)
        # Every buffer and running call, and the calls queued on thread stages' threads.
        self.capacity = w.capacity + sum(calls_ahead(n.stage) for n in plan.nodes)
        self._ports = [
            [Channel[Envelope](queue_size, f"{n.stage.name}[{p}]") for p in range(nw.ports)]
            for n, nw in zip(plan.nodes, w.nodes, strict=True)
        ]
        self.outputs = PartTable(self.ledger) if w.outputs > 1 else None
        self.chunks = PartTable(self.ledger) if microbatch is not None else None
        self._done = Channel[None](1, "sinks")  # closes when the last sink's senders are done
        self._done.add_senders(w.outputs)
        self.sinks = [
            Sink(self.ledger, p, self.outputs, w.outputs, self.chunks, self._done)
            for p in range(w.outputs)
        ]
        self.stages = [
            self._context(i, node, nw, queue_size, tracing)
            for i, (node, nw) in enumerate(zip(plan.nodes, w.nodes, strict=True))
        ]
        self._input_outbox = self._outbox(w.input_outs, StageProbe("input"))
        # The input task's state: admission routes an urgent request past what it holds.
        self.router = Router(self._input_outbox) if w.input_task else None
        first = self._input_outbox.channels[0]
        # Without an input task the first stage's port is admission (wire() ensures a channel).
        assert w.input_task or isinstance(first, Channel)
        self.admission: Channel[Envelope] = (
            Channel(queue_size, "input") if w.input_task else first  # type: ignore[assignment]
        )
        self._sup: Supervisor | None = None
        self.started_at = 0.0
        self.ranked = False  # queues hand out the most urgent request first (``rank``)
        self.deadlines: Deadlines | None = None  # requests' deadlines (made by the first one)
        self.control = (  # predictive admission: None without max_in_flight
            None
            if max_in_flight is None
            else Admission(max_in_flight, self.ledger, self.need, self.worker_busy)
        )

    def _outbox(self, targets: tuple[Target, ...], probe: StageProbe) -> Outbox:
        """Where a stage (or the input) sends: stage ports and sinks, by the wiring's targets."""
        ports = self._ports
        outlets: list[Outlet] = [
            self.sinks[t.port] if t.node == SINK else ports[t.node][t.port] for t in targets
        ]
        return Outbox(outlets, [t.merged for t in targets], probe)

    def _context(
        self, i: int, node: PlanNode, nw: NodeWiring, queue_size: int, tracing: Any
    ) -> StageContext:
        """Stage ``i`` at run time: its queues, outbox, probe and prepared call."""
        st = node.stage
        probe = StageProbe(st.name)
        ports = self._ports[i]
        return StageContext(
            stage=st,
            index=i,
            inbox=Channel(queue_size, f"{st.name}.joined") if nw.join else ports[0],
            ports=ports,
            outbox=self._outbox(nw.outs, probe),
            ledger=self.ledger,
            probe=probe,
            call=prepare_call(st.fn, st.runs_on, st.inference_mode),
            to_host=nw.to_host,
            device=st.device,  # type: ignore[arg-type]  # a torch.device once validated
            workers=int(st.workers),  # resolved by options.resolve_workers
            join=PartTable(self.ledger) if nw.join else None,
            tracing=tracing,
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Start what must exist before the tasks: the Ray replicas of remote stages."""
        remote = [c for c in self.stages if c.stage.runs_on == "ray"]
        if not remote:
            return
        from ..executors_ray import RayPool, ensure_ray

        await anyio.to_thread.run_sync(ensure_ray)
        for ctx in remote:
            st = ctx.stage
            ctx.pool = RayPool(
                st.name, st.fn, st.replicas, st.resources, st.max_inflight, st.inference_mode
            )
            # One worker task per call a replica may hold: least-loaded dispatch picks the replica.
            ctx.workers = ctx.pool.capacity
        await asyncio.gather(*(c.pool.ready() for c in remote))

    def release_remote(self) -> None:
        for ctx in self.stages:
            if ctx.pool is not None:
                ctx.pool.release()

    def start(self, tg: anyio.abc.TaskGroup) -> Supervisor:
        sup = self._sup = Supervisor(tg, self.torch_threads, self.compute_nice)
        self.started_at = time.perf_counter()
        self.ledger.clock = asyncio.get_running_loop().time  # deadlines are on the loop's clock
        if self.wiring.input_task:
            self._input_outbox.open(1)
            sup.spawn("input", run_input, self.admission, self.router, self.ledger, self.microbatch)
        for ctx in self.stages:
            start_stage(ctx, sup)
        return sup

    @property
    def crash(self) -> BaseException | None:
        """The first exception a runtime task died of (a bug), or None."""
        return None if self._sup is None else self._sup.crash

    def rank(self, aging: float) -> None:
        """Every request queue hands out the most urgent request first from now on (the first
        urgent request calls this once; see ``urgency``)."""
        if self.ranked:
            return
        self.ranked = True
        clock = self.ledger.clock
        queues = {id(self.admission): self.admission}
        for ctx in self.stages:
            queues.update((id(c), c) for c in (*ctx.ports, ctx.inbox))
        for ch in queues.values():
            ch.rank(_urgency, aging, clock)

    def worker_busy(self) -> list[float]:
        """Each stage's seconds inside calls so far, per worker, the calls running now counted
        up to now (admission's measure of how busy the stages were)."""
        now = time.perf_counter()
        return [c.probe.spent(now) / max(1, c.workers) for c in self.stages]

    def need(self) -> float:
        """Seconds one request's calls take through every stage, as measured so far: at a
        batching stage, the call of a batch of its recent size (what the request rides in)."""
        inflight = len(self.ledger) + 1
        return sum(c.probe.ride(inflight) for c in self.stages)

    def where_request(self, req: Request) -> str:
        """Where ``req`` is, in words, for the message of a request that ran out of time (a
        scan of the queues, skipped when more than a few requests are in flight)."""
        if req.id not in self.ledger.inflight:
            return "it had just finished"
        if len(self.ledger) > 16:  # under load, many expire at once: no scan for each
            return f"it was one of {len(self.ledger)} requests in flight"
        at = self.locate(req)
        if at["stage"] is None:
            return "it was between stages"
        if at["where"] == "waiting for its batch to form":
            state = "held for its batch to form by"
        else:
            state = "queued for" if at["where"].startswith("waiting") else "in"
        return f"it was {state} stage {at['stage']!r}; it is dropped before any further compute"

    def admit(self, req: Request, payload: Any, *, over: bool = False) -> None:
        """Admit ``req``: the caller checked that admission has room, or (``over``) its caller
        waits on the result anyway, and it may wait in the admission queue's overflow."""
        self.ledger.admit(req)
        env = Envelope(payload, [req])
        router = self.router
        if router is not None and router.held is not None and router.route(env):
            return
        if over:
            self.admission.send_over(env)
        else:
            self.admission.send_nowait(env)

    def close_admission(self) -> None:
        self.admission.close()

    async def drained(self) -> None:
        """Return once every request admitted before ``close_admission`` has left the graph."""
        await self._done.next()

    def set_observer(self, observe: Any) -> None:
        """Turn the stages' event hooks on (``observe(kind, stage, **fields)``) or off (None)."""
        for ctx in self.stages:
            ctx.probe.observe = observe

    async def stop(self, thread_timeout: float) -> None:
        """Force the end: cancel every task, end what is left with ``PipelineClosed``, stop the
        threads, release remote replicas."""
        sup = self._sup
        if sup is not None:
            sup.cancel_all()
        self.ledger.fail_all(self.crash)
        for ctx in self.stages:
            for ch in {id(c): c for c in (*ctx.ports, ctx.inbox)}.values():
                ch.drain_nowait()
        if self.deadlines is not None:
            self.deadlines.close()
        if sup is not None:
            await sup.stop_threads(thread_timeout)
        self.release_remote()

    # -- introspection -----------------------------------------------------------------------------

    def view(self) -> RuntimeView:
        elapsed = max(1e-9, time.perf_counter() - self.started_at) if self.started_at else 0.0
        k = self.ledger.counters
        return RuntimeView(
            stages=tuple(self._stage_view(c, elapsed) for c in self.stages),
            admitted=k.admitted,
            completed=k.completed,
            failed=k.failed,
            cancelled=k.cancelled,
            timed_out=k.timed_out,
            overloaded=0 if self.control is None else self.control.refused,
            in_flight=len(self.ledger),
            elapsed=elapsed,
        )

    def _stage_view(self, ctx: StageContext, elapsed: float) -> StageView:
        p, st = ctx.probe, ctx.stage
        return StageView(
            name=st.name,
            kind=kind_of(st),
            runs_on=st.runs_on,
            workers=st.replicas if st.runs_on == "ray" else int(st.workers),
            inbox=ctx.inbox.statistics(),
            items=p.items,
            batches=p.batches,
            failures=p.failures,
            rows=p.rows,
            retries=p.retries,
            released=dict(p.released),
            busy=p.spent(),
            timed=p.timed,
            blocked=p.blocked,
            running=p.active,
            latency=(p.latency.quantile(0.5), p.latency.quantile(0.9), p.latency.quantile(0.99)),
            retries_exhausted=p.retries_exhausted,
            real_tokens=p.real_tokens,
            padded_tokens=p.padded_tokens,
            stepping=None if p.stepping is None else _step_stats(p.stepping, elapsed),
            misses=dict(p.misses),
            slack=(p.slack.quantile(0.5), p.slack.quantile(0.99)) if p.slack.total else None,
            slack_buckets=p.slack.cumulative(),
            slack_count=p.slack.total,
            slack_sum=p.slack.sum,
            inversions=p.inversions + ctx.inbox.inversions,
        )

    def in_flight(self) -> int:
        return len(self.ledger)

    def progress(self) -> int:
        """A number that grows whenever any stage finishes a call or any request ends."""
        k = self.ledger.counters
        return sum(c.probe.progress() for c in self.stages) + k.completed + k.failed + k.cancelled

    def locate_oldest(self) -> dict[str, Any] | None:
        """Where the oldest request in flight is held (for stall reports); None when idle."""
        oldest = self.ledger.oldest()
        return None if oldest is None else self.locate(oldest)

    def locate(self, req: Request) -> dict[str, Any]:
        """Where ``req`` is held: the stage, and whether that stage's input is empty and its
        output full. Scans the queues: for diagnostics, not the hot path."""
        holder: StageContext | None = None
        where = "running in the stage"
        for ctx in self.stages:
            if any(ch.holds(lambda e: req in e.requests) for ch in (*ctx.ports, ctx.inbox)):
                holder, where = ctx, "waiting in the stage's input queue"
                break
            if ctx.held is not None and ctx.held.holds(req):
                holder, where = ctx, "waiting for its batch to form"
                break
        if holder is None:
            holder = next((c for c in self.stages if self._running_calls(c) > 0), None)
        if holder is None:
            return {"stage": None, "request": req.id, "where": "between stages"}
        return {
            "stage": holder.name,
            "request": req.id,
            "where": where,
            "input_empty": len(holder.inbox) == 0,
            "output_full": not holder.outbox.has_room(),
            "calls_running": self._running_calls(holder),
        }

    def where(self, future: Any) -> str:
        """Where the request whose outcome is ``future`` is, in words (a scan: for the message
        of a timed-out request)."""
        if future is None:
            return "it was still waiting for admission (the pipeline was full)"
        req = next((r for r in self.ledger.inflight.values() if r.future is future), None)
        return "it had just finished" if req is None else self.where_request(req)

    @staticmethod
    def _running_calls(ctx: StageContext) -> int:
        """Calls in progress. Plain loop stages do not count their calls on the hot path: a
        worker neither waiting for input nor for room downstream is inside a call."""
        if ctx.stage.runs_on in ("thread", "ray") or kind_of(ctx.stage) != "plain":
            return ctx.probe.active
        waiting_in = ctx.inbox.statistics().waiting_receivers
        blocked_out = sum(ch.statistics().waiting_senders for ch in ctx.outbox.channels)
        return max(0, ctx.workers - waiting_in - blocked_out)


def _step_stats(c: Any, elapsed: float) -> StepStats:
    steps = c.steps
    return StepStats(
        steps=steps,
        steps_per_second=steps / elapsed if elapsed else 0.0,
        mean_active=c.active / steps if steps else 0.0,
        admissions_per_step=c.admitted / steps if steps else 0.0,
        first_output_p50=c.first_output.quantile(0.5),
        first_output_p99=c.first_output.quantile(0.99),
        output_gap_p50=c.gaps.quantile(0.5),
        output_gap_p99=c.gaps.quantile(0.99),
    )
