"""Exactly-once under chaos: random graphs, stage kinds, failures, cancellations, deadlines,
priorities, admission limits and shutdown points; every admitted request must end exactly once,
correctly, without a hang.

Used by tests/test_chaos.py (a few hundred cases in CI) and by ``make stress``:

    python -m tests.chaos --cases 10000
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field

import anyio
import torch

from asyncnn import (
    Batching,
    Graph,
    Overloaded,
    Pipeline,
    PipelineClosed,
    Stage,
    StageError,
    Stepping,
)

KINDS = ("async", "thread", "inline", "batched-thread", "batched-async")
# A streaming case puts one of these right after the input: every request becomes 0..N parts
# (1..N for a step model), each going through the rest of the graph as a request of its own.
GENERATORS = ("gen-async", "gen-thread", "step")


@dataclass
class Case:
    seed: int
    nodes: list[tuple[str, int, tuple[int, ...], int]]  # kind, workers, parents, add
    outputs: list[int]
    n_requests: int
    queue_size: int
    fail: dict[int, set[int]]  # node -> request ids that fail there
    cancel: dict[int, int]  # request id -> loop turns before its caller is cancelled
    deadline: dict[int, float]  # request id -> send(timeout=...)
    shutdown: tuple[int, float] | None  # (loop turns, aclose timeout) or None: normal drain
    gen: str | None = None  # a generator stage after the input (GENERATORS), or None
    priority: dict[int, int] = field(default_factory=dict)  # request id -> send(priority=...)
    auto: bool = False  # batching stages use max_delay="auto"
    max_in_flight: int | None = None  # admission control: refusals end with Overloaded
    notes: list[str] = field(default_factory=list)

    def parts(self, rid: int) -> int:
        """How many parts request ``rid`` streams (its value goes up by one a part)."""
        return rid % 3 + (self.gen == "step")


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    n = rng.randint(1, 5)
    nodes = []
    for i in range(n):
        kind = rng.choice(KINDS)
        workers = 1 if kind == "inline" else rng.randint(1, 3)
        parents = tuple(rng.sample(range(-1, i), k=min(i + 1, rng.choice((1, 1, 2)))))
        nodes.append((kind, workers, parents, rng.randint(1, 9)))
    consumed = {p for _, _, ps, _ in nodes for p in ps}
    outputs = [i for i in range(n) if i not in consumed]
    reqs = rng.randint(1, 40)
    rids = list(range(reqs))
    fail = {i: set(rng.sample(rids, k=rng.randint(0, min(3, reqs)))) for i in range(n)}
    cancel = {r: rng.randint(0, 8) for r in rng.sample(rids, k=rng.randint(0, min(4, reqs)))}
    deadline = {
        r: rng.choice((0.0005, 0.002, 0.05, 1e300, math.inf))  # the last two: ~never
        for r in rng.sample(rids, k=rng.randint(0, min(3, reqs)))
    }
    shutdown = (rng.randint(0, 30), rng.choice((0.0, 0.001, 0.05))) if rng.random() < 0.3 else None
    gen = rng.choice(GENERATORS) if rng.random() < 0.3 else None
    case = Case(
        seed, nodes, outputs, reqs, rng.randint(1, 4), fail, cancel, deadline, shutdown, gen
    )
    # Drawn after the rest, so that a seed keeps the graph it had before these existed.
    if rng.random() < 0.4:
        case.priority = {r: rng.choice((-1, 0, 1, 2)) for r in rids if rng.random() < 0.5}
    case.auto = rng.random() < 0.3
    if rng.random() < 0.2:
        case.max_in_flight = rng.randint(1, 20)
    return case


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot print")


def _stop(i: int) -> BaseException:
    return StopIteration(i)  # asyncio refuses it in a future


_POISONS = (lambda i: ValueError(f"poisoned at node {i}"), _stop, lambda i: _Unprintable())


def _fn(i: int, kind: str, add: int, fail_on: set[int]):
    # A payload is a (1, 2) tensor [[request id, value]] (a batch stacks them); a join sums values.
    def compute(*parts: torch.Tensor) -> torch.Tensor:
        x = parts[0]
        poisoned = [int(r) for r in x[:, 0].tolist() if int(r) in fail_on]
        if poisoned:  # the kinds of exception that once lost a request or ended the run
            raise _POISONS[poisoned[0] % len(_POISONS)](i)
        out = x.clone()
        out[:, 1] = sum(p[:, 1] for p in parts) + add
        return out

    if kind.endswith("async") or kind == "async":

        async def acompute(*parts: torch.Tensor) -> torch.Tensor:
            await asyncio.sleep(0)
            return compute(*parts)

        return acompute
    return compute


def reference(case: Case, rid: int, start: float | None = None) -> list[float]:
    vals: dict[int, float] = {-1: float(rid) if start is None else start}
    for i, (_, _, parents, add) in enumerate(case.nodes):
        vals[i] = sum(vals[p] for p in parents) + add
    return [vals[o] for o in case.outputs]


class _Parts:
    """The chaos step model: request [[rid, v]] steps out [[rid, v]], [[rid, v + 1]], ..."""

    def __init__(self, case: Case) -> None:
        self.case = case

    def admit(self, inputs: list[torch.Tensor]) -> list[list[float]]:
        return [[float(x[0, 0]), float(x[0, 1]), 0] for x in inputs]

    def step(self, states: list[list[float]]) -> tuple[list[torch.Tensor], list[bool]]:
        outs, done = [], []
        for st in states:
            rid, v, j = st
            outs.append(torch.tensor([[rid, v + j]]))
            st[2] = j + 1
            done.append(st[2] >= self.case.parts(int(rid)))
        return outs, done


def _generator(case: Case) -> Stage:
    def parts(x: torch.Tensor):
        rid, v = float(x[0, 0]), float(x[0, 1])
        for j in range(case.parts(int(rid))):
            yield torch.tensor([[rid, v + j]])

    async def aparts(x: torch.Tensor):
        for part in parts(x):
            await asyncio.sleep(0)
            yield part

    if case.gen == "step":
        return Stage(_Parts(case), name="gen", step=Stepping(max_active=3))
    return Stage(aparts if case.gen == "gen-async" else parts, name="gen", workers=2)


def build(case: Case) -> Pipeline:
    g = Graph()
    handles = {-1: g.input()}
    if case.gen is not None:  # every path goes through the one generator stage
        handles[-1] = g.add(_generator(case), handles[-1])
    for i, (kind, workers, parents, add) in enumerate(case.nodes):
        delay = "auto" if case.auto else 0.001
        batch = Batching(max_size=4, max_delay=delay) if kind.startswith("batched") else None
        executor = "inline" if kind == "inline" else "auto"
        stage = Stage(
            _fn(i, kind, add, case.fail[i]),
            name=f"n{i}",
            workers=workers,
            executor=executor,
            batch=batch,
        )
        handles[i] = g.add(stage, *[handles[p] for p in parents])
    g.output(*[handles[o] for o in case.outputs])
    return Pipeline(
        g, queue_size=case.queue_size, drain_timeout=5.0, max_in_flight=case.max_in_flight
    )


async def run_case(case: Case) -> float:
    """Run one case; raise AssertionError on a broken promise. Returns its duration."""
    t0 = time.perf_counter()
    pipe = build(case)
    outcomes: dict[int, tuple[str, object]] = {}
    with anyio.fail_after(15):
        async with pipe:

            async def caller(rid: int) -> None:
                x = torch.tensor([[float(rid), float(rid)]])
                try:
                    y = await pipe.send(
                        x, timeout=case.deadline.get(rid), priority=case.priority.get(rid, 0)
                    )
                except Overloaded:
                    outcomes[rid] = ("overloaded", None)
                except StageError as e:
                    outcomes[rid] = ("error", e.stage)
                except PipelineClosed:
                    outcomes[rid] = ("closed", None)
                except TimeoutError:
                    outcomes[rid] = ("timeout", None)
                except asyncio.CancelledError:
                    outcomes[rid] = ("cancelled", None)
                    raise
                else:
                    outcomes[rid] = ("ok", y)

            tasks = {r: asyncio.ensure_future(caller(r)) for r in range(case.n_requests)}

            async def chaos() -> None:
                for rid, turns in sorted(case.cancel.items(), key=lambda kv: kv[1]):
                    for _ in range(turns):
                        await asyncio.sleep(0)
                    tasks[rid].cancel()

            async def stopper() -> None:
                assert case.shutdown is not None
                turns, timeout = case.shutdown
                for _ in range(turns):
                    await asyncio.sleep(0)
                await pipe.aclose(timeout=timeout)

            helpers = [asyncio.ensure_future(chaos())]
            if case.shutdown is not None:
                helpers.append(asyncio.ensure_future(stopper()))
            await asyncio.gather(*tasks.values(), *helpers, return_exceptions=True)
            for rid, task in tasks.items():
                if rid not in outcomes and task.cancelled():
                    outcomes[rid] = ("cancelled", None)
    stats = pipe.stats()
    assert set(outcomes) == set(range(case.n_requests)), "a request never ended"
    for rid, (kind, value) in outcomes.items():
        if kind == "ok" and case.gen is not None:
            assert isinstance(value, list) and len(value) == case.parts(rid), (rid, value)
            for j, part in enumerate(value):
                _check(case, rid, part, reference(case, rid, float(rid + j)))
        elif kind == "ok":
            _check(case, rid, value, reference(case, rid))
        elif kind == "error":
            assert rid in case.fail[int(str(value)[1:])], f"request {rid} failed at {value}"
        elif kind == "closed":
            assert case.shutdown is not None, f"request {rid}: PipelineClosed without a shutdown"
        elif kind == "timeout":
            near = case.deadline.get(rid, math.inf) < 1.0
            assert near, f"request {rid}: TimeoutError without a near deadline"
        elif kind == "overloaded":
            assert case.max_in_flight is not None, f"request {rid}: Overloaded without a limit"
        else:
            assert rid in case.cancel
    assert stats.in_flight == 0, stats
    assert stats.admitted == stats.completed + stats.failed + stats.cancelled, stats
    # Every outcome a caller saw is one the counters hold (a caller cancelled just as its
    # result arrived sees a cancellation of a completed request, hence <=).
    kinds = [kind for kind, _ in outcomes.values()]
    assert kinds.count("ok") <= stats.completed, (kinds.count("ok"), stats)
    assert kinds.count("error") <= stats.failed, (kinds.count("error"), stats)
    assert stats.admitted <= case.n_requests, stats
    assert stats.overloaded == kinds.count("overloaded"), stats
    assert stats.admitted + stats.overloaded <= case.n_requests, stats
    return time.perf_counter() - t0


def _check(case: Case, rid: int, value: object, want: list[float]) -> None:
    got = value if isinstance(value, tuple) else (value,)
    assert [float(t[0, 1]) for t in got] == want, f"request {rid}: {got} != {want}"  # type: ignore[index]
    assert all(float(t[0, 0]) == rid for t in got), f"request {rid} got another's rows"  # type: ignore[index]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="asyncnn chaos stress: random cases, exactly once")
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0, help="first case seed")
    args = ap.parse_args(argv)
    failures = []
    slowest = (0.0, -1)
    t0 = time.perf_counter()
    for k in range(args.cases):
        seed = args.seed + k
        try:
            dt = asyncio.run(run_case(make_case(seed)))
        except Exception as exc:  # a broken promise: report the seed that reproduces it
            failures.append((seed, f"{type(exc).__name__}: {exc}"))
            continue
        slowest = max(slowest, (dt, seed))
        if (k + 1) % 500 == 0:
            print(
                f"{k + 1} cases, {len(failures)} failures, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print(
        f"chaos: {args.cases} cases, {len(failures)} failures, slowest case seed {slowest[1]} "
        f"took {slowest[0] * 1e3:.0f} ms; {time.perf_counter() - t0:.0f} s in all"
    )
    for seed, why in failures[:20]:
        print(f"  seed {seed}: {why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
