"""Property: over random chains and small DAGs with random failures and cancellations, every
admitted request ends exactly once, with the right result, and the counters add up."""

import asyncio
import math
import os

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncnn import Batching, Graph, Pipeline, Stage, StageError
from asyncnn.batcher import Batcher, Item
from asyncnn.batching import Request
from asyncnn.pacing import Pacer, ServiceTimes


@st.composite
def graphs(draw):
    n = draw(st.integers(1, 5))
    nodes = []
    for i in range(n):
        kind = draw(st.sampled_from(["async", "thread", "inline"]))
        workers = draw(st.integers(1, 3)) if kind != "inline" else 1
        choices = list(range(-1, i))
        parents = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=2))
        nodes.append((kind, workers, tuple(parents), draw(st.integers(1, 5))))
    # Outputs: the last node, sometimes with one more; every node must reach an output, so we
    # add the nodes that nothing consumes.
    consumed = {p for _, _, ps, _ in nodes for p in ps}
    outputs = [i for i in range(n) if i not in consumed]
    return nodes, outputs


def make_fn(i, kind, add, fail_on):
    # Payloads are (request id, value); a join receives one such pair per input.
    def pure(*parts):
        rid = parts[0][0]
        if rid in fail_on:
            raise ValueError(f"poisoned at node {i}")
        return (rid, sum(p[1] for p in parts) + add)

    if kind == "async":

        async def afn(*parts):
            await asyncio.sleep(0)
            return pure(*parts)

        return afn
    return pure


def reference(nodes, outputs, rid):
    vals = {-1: rid}
    for i, (_, _, parents, add) in enumerate(nodes):
        vals[i] = sum(vals[p] for p in parents) + add
    outs = [(rid, vals[o]) for o in outputs]
    return outs[0] if len(outs) == 1 else tuple(outs)


def fails_for(nodes, outputs, rid, fail_plan):
    return any(rid in fail_plan.get(i, ()) for i in range(len(nodes)))


@settings(
    max_examples=int(os.environ.get("ASYNCNN_PROPERTY_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    spec=graphs(),
    n_requests=st.integers(1, 30),
    data=st.data(),
    queue_size=st.integers(1, 4),
)
def test_every_request_ends_exactly_once(spec, n_requests, data, queue_size):
    nodes, outputs = spec
    rids = list(range(n_requests))
    fail_plan = {
        i: set(data.draw(st.lists(st.sampled_from(rids), max_size=3), label=f"fail@{i}"))
        for i in range(len(nodes))
    }
    cancel_after = data.draw(
        st.dictionaries(st.sampled_from(rids), st.integers(0, 6), max_size=5), label="cancel"
    )

    g = Graph()
    handles = {-1: g.input()}
    for i, (kind, workers, parents, add) in enumerate(nodes):
        fn = make_fn(i, kind, add, fail_plan[i])
        executor = "inline" if kind == "inline" else "auto"
        stage = Stage(fn, name=f"n{i}", workers=workers, executor=executor)
        handles[i] = g.add(stage, *[handles[p] for p in parents])
    g.output(*[handles[o] for o in outputs])
    pipe = Pipeline(g, queue_size=queue_size)

    async def main():
        outcomes = {}
        with anyio.fail_after(10):
            async with pipe:

                async def caller(rid):
                    try:
                        outcomes[rid] = ("ok", await pipe.send((rid, rid)))
                    except StageError as e:
                        outcomes[rid] = ("error", e.stage)
                    except asyncio.CancelledError:
                        outcomes[rid] = ("cancelled", None)
                        raise

                tasks = {rid: asyncio.ensure_future(caller(rid)) for rid in rids}
                for rid, k in cancel_after.items():
                    for _ in range(k):
                        await asyncio.sleep(0)
                    tasks[rid].cancel()
                await asyncio.gather(*tasks.values(), return_exceptions=True)
                for rid, task in tasks.items():
                    if rid not in outcomes and task.cancelled():  # cancelled before it started
                        outcomes[rid] = ("cancelled", None)
            stats = pipe.stats()  # after the drain: cancelled requests are dropped by now
        return outcomes, stats

    outcomes, stats = asyncio.run(main())
    assert set(outcomes) == set(rids), "a request never ended"
    for rid in rids:
        kind, value = outcomes[rid]
        if kind == "ok":
            assert value == reference(nodes, outputs, rid)
            assert not fails_for(nodes, outputs, rid, fail_plan)
        elif kind == "error":
            assert rid in fail_plan[int(value[1:])]
        else:
            assert rid in cancel_after
    assert stats.in_flight == 0
    assert stats.admitted == stats.completed + stats.failed + stats.cancelled
    # A caller cancelled just as its result landed sees the cancellation while the pipeline
    # counted a completion (or failure): that is still exactly one outcome for the request.
    n_ok = sum(1 for k, _ in outcomes.values() if k == "ok")
    n_err = sum(1 for k, _ in outcomes.values() if k == "error")
    n_cancel = sum(1 for k, _ in outcomes.values() if k == "cancelled")
    assert n_ok <= stats.completed <= n_ok + n_cancel
    assert n_err <= stats.failed <= n_err + n_cancel


def test_reference_helper_sanity():
    nodes = [("async", 1, (-1,), 1), ("thread", 1, (0, -1), 2)]
    assert reference(nodes, [1], 3) == (3, (3 + 1) + 3 + 2)
    with pytest.raises(ValueError):
        make_fn(0, "thread", 1, {5})((5, 5))


# What a caller may pass as a request's timeout and priority: anything a program could compute.
TIMEOUTS = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.sampled_from([True, "1", 1e300, -0.0, 5e-324, 10**400, -(10**400)]),
)
PRIORITIES = st.one_of(
    st.integers(-(2**31), 2**31 - 1), st.integers(), st.sampled_from([True, 1.0, None, "0"])
)


def legal(timeout, priority):
    """Whether ``send`` should take these (else ValueError or TypeError, before admission)."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        return False
    if not -(2**31) <= priority < 2**31:
        return False
    if timeout is None:
        return True
    return not isinstance(timeout, bool) and isinstance(timeout, int | float) and timeout >= 0


@settings(
    max_examples=int(os.environ.get("ASYNCNN_PROPERTY_EXAMPLES", "200")) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(st.tuples(TIMEOUTS, PRIORITIES), min_size=1, max_size=12))
def test_no_timeout_or_priority_a_caller_passes_breaks_the_pipeline(calls):
    # Deadlines and priorities reach sync arithmetic in every stage (aging, the paced cut,
    # the slack histogram): whatever a caller passes is refused at once or served, and the
    # pipeline keeps serving everyone else.
    import torch

    from asyncnn import Batching, Overloaded

    auto = Stage(lambda x: x + 1, name="auto", batch=Batching(max_size=4, max_delay="auto"))
    pipe = Pipeline([auto, Stage(lambda x: x * 2, name="plain")], max_in_flight=64)

    async def main():
        refused = 0
        with anyio.fail_after(10):
            async with pipe:
                for i, (timeout, priority) in enumerate(calls):
                    try:
                        y = await pipe.send(torch.full((1,), i), timeout=timeout, priority=priority)
                    except (ValueError, TypeError):
                        assert not legal(timeout, priority), (timeout, priority)
                        refused += 1
                    except (TimeoutError, Overloaded):
                        assert legal(timeout, priority) and timeout is not None
                    else:
                        assert legal(timeout, priority) and y.item() == (i + 1) * 2
                assert (await pipe.send(torch.full((1,), -1))).item() == 0  # still serving
                stats = pipe.stats()
        assert stats.admitted == len(calls) - refused + 1 == stats.completed + stats.timed_out
        assert stats.in_flight == 0

    asyncio.run(main())


@st.composite
def payloads(draw, depth=0):
    """What a caller may send a batching stage: tensors of any rank, dtype and rows, and
    tuples, lists and dicts of them (or of anything)."""
    import torch

    kind = draw(st.sampled_from(["tensor", "tensor", "tuple", "list", "dict", "other"]))
    if kind == "tensor" or depth >= 2:
        shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
        dtype = draw(st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float16]))
        return torch.zeros(shape, dtype=dtype)
    if kind == "other":
        return draw(st.sampled_from([None, "text", 3, 2.5, b"x", (), {}, []]))
    items = draw(st.lists(payloads(depth + 1), min_size=0, max_size=3))
    if kind == "dict":
        return {f"k{i}": v for i, v in enumerate(items)}
    return tuple(items) if kind == "tuple" else items


@settings(
    max_examples=int(os.environ.get("ASYNCNN_PROPERTY_EXAMPLES", "200")) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    sent=st.lists(payloads(), min_size=1, max_size=8),
    batch=st.sampled_from(["fixed", "auto", "padded"]),
)
def test_no_payload_a_caller_sends_breaks_a_batching_stage(sent, batch):
    # Whatever is sent, each request is answered (its own rows back) or fails alone with a
    # StageError, and the stage keeps serving: the batcher files, keys, pads and splits
    # every payload inside its own task.
    import torch

    from asyncnn import Batching

    spec = {
        "fixed": Batching(max_size=4, max_delay=0.001),
        "auto": Batching(max_size=4, max_delay="auto"),
        "padded": Batching(max_size=4, max_delay="auto", pad=0),
    }[batch]
    pipe = Pipeline([Stage(lambda x: x, name="m", batch=spec)])

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    async def main():
        with anyio.fail_after(10):
            async with pipe:
                outs = await asyncio.gather(*(pipe.send(x) for x in sent), return_exceptions=True)
                for x, out in zip(sent, outs, strict=True):
                    if isinstance(out, BaseException):
                        assert isinstance(out, StageError) and out.stage == "m", repr(out)
                    elif batch != "padded":
                        assert same(x, out)
                alive = await pipe.send(torch.ones(1, 2))
                assert torch.equal(alive, torch.ones(1, 2))
                stats = pipe.stats()
        assert stats.in_flight == 0 and stats.admitted == stats.completed + stats.failed

    asyncio.run(main())


ARRIVALS = st.lists(
    st.tuples(
        st.floats(0.0, 0.1),  # when it arrives
        st.one_of(st.none(), st.floats(0.0, 0.2)),  # its timeout, if any
        st.integers(-1, 1),  # its priority
        st.sampled_from(["a", "b"]),  # what it can share a batch with
    ),
    min_size=1,
    max_size=30,
)


def arriving(arrivals):
    """(Item, key) in arrival order, each with its deadline and priority."""
    loop = asyncio.new_event_loop()
    items = []
    for i, (at, timeout, priority, key) in enumerate(sorted(arrivals, key=lambda a: a[0])):
        deadline = None if timeout is None else at + timeout
        r = Request(i, loop.create_future(), None, deadline, priority, at)
        items.append((Item(r, None, 0, 1, at), key))
    loop.close()
    return items


def drive_former(b, items, strict):
    """Drive a batcher as a former does, a runner always free: file each arrival at its time
    and pop; else sleep until ``next_deadline()`` and pop; with nothing left to wait for,
    close (drain). Each wake-up must release something (``strict``: a fixed delay) or look
    again later, never at once (the former would spin). Returns when each item went."""
    released: dict[int, float] = {}

    def take(now, draining=False):
        while (batch := b.pop(now, draining=draining, idle=True)) is not None:
            if batch.reason == "deadline" and b.pacer is None:  # (paced: or target_latency)
                assert any(i.request.deadline is not None for i in batch.items)
            for it in batch.items:
                assert it.request.id not in released, "released twice"
                released[it.request.id] = now

    pending, clock = list(items), 0.0
    while pending or b.pending_rows:
        wake = b.next_deadline()
        if pending and (wake is None or pending[0][0].arrived <= wake):
            it, key = pending.pop(0)
            clock = it.arrived
            if b.pacer is not None:
                b.pacer.arrivals.add(clock, it.rows)
            b.add(it, key)
            take(clock)
        elif wake is None or wake == math.inf:
            take(clock, draining=True)  # nothing is due before the pipeline closes
        else:
            clock, before = max(clock, wake), len(released)
            take(clock)
            if len(released) == before:
                again = b.next_deadline()
                assert not strict and (again is None or again > clock), (
                    f"woke at {wake} with nothing due, next look {again}: the former spins"
                )
    assert sorted(released) == list(range(len(items)))
    return released


@settings(max_examples=int(os.environ.get("ASYNCNN_PROPERTY_EXAMPLES", "200")), deadline=None)
@given(
    ARRIVALS,
    st.sampled_from([0.0, 0.001, 0.005, 0.05, math.inf]),
    st.sampled_from([None, 0.0, 0.002, 0.03]),
    st.integers(1, 8),
)
def test_a_fixed_delay_former_wakes_to_release_and_never_outwaits_a_deadline(
    arrivals, delay, need, max_size
):
    # Every item goes once, by its delay and by the time its call needs before its deadline
    # (or at once if it came too late for that); every wake-up of the former releases.
    b = Batcher(Batching(max_size=max_size, max_delay=delay), need=lambda rows: need)
    items = arriving(arrivals)
    released = drive_former(b, items, strict=True)
    for it, _ in items:
        at, deadline, out = it.arrived, it.request.deadline, released[it.request.id]
        assert out <= at + delay + 1e-9  # (math.inf: only at the close)
        if deadline is not None:
            latest = deadline if need is None else deadline - need
            assert out <= max(at, latest) + 1e-9


@settings(max_examples=int(os.environ.get("ASYNCNN_PROPERTY_EXAMPLES", "200")), deadline=None)
@given(
    ARRIVALS,
    st.floats(0.0, 0.01),
    st.floats(0.0, 0.001),
    st.integers(1, 64),
    st.integers(1, 3),
    st.one_of(st.none(), st.floats(0.001, 0.1)),
)
def test_a_paced_former_never_looks_again_at_once_and_releases_everything(
    arrivals, fixed, per_row, max_size, runners, target
):
    service = ServiceTimes()
    for rows in (1, 8, 32, 64) * 3:  # a measured stage: calls of fixed + per_row * rows
        service.observe(rows, fixed + per_row * rows)
    spec = Batching(max_size=max_size, target_latency=target)
    b = Batcher(spec, Pacer(max_size, runners, spec.target_latency, service))
    drive_former(b, arriving(arrivals), strict=False)
