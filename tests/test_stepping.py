"""Step stages end to end, with a scripted fake model: joins between steps, leaving on done and
on cancel, budget and keys, one failing request among many, drain at shutdown."""

import asyncio
import contextlib
import threading

import anyio
import pytest

from asyncnn import Pipeline, Stage, StageError, Stepping

pytestmark = pytest.mark.hang_guard(30)


class Counter:
    """Request x = (name, n): yields (name, 0) .. (name, n-1), one per step. Records each step's
    names and every eviction; a name starting with "bad" fails its step."""

    def __init__(self, delay=0.0):
        self.steps = []
        self.admits = []
        self.evicted = []
        self.delay = delay
        self.threads = set()

    def admit(self, inputs):
        self.admits.append([name for name, _ in inputs])
        return [{"name": name, "n": n, "i": 0} for name, n in inputs]

    def step(self, states):
        self.threads.add(threading.current_thread().name)
        if any(s["name"].startswith("bad") for s in states):
            raise ValueError("bad state")  # before touching any state, as a tensor op would
        self.steps.append([s["name"] for s in states])
        if self.delay:
            threading.Event().wait(self.delay)
        outs = [(s["name"], s["i"]) for s in states]
        for s in states:
            s["i"] += 1
        return outs, [s["i"] >= s["n"] for s in states]

    def evict(self, states):
        self.evicted.extend(s["name"] for s in states)


async def test_each_request_streams_its_own_outputs_and_send_collects_them():
    model = Counter()
    async with Pipeline([Stage(model, step=Stepping(max_active=8))]) as pipe:
        assert [p async for p in pipe.send_stream(("a", 3))] == [("a", 0), ("a", 1), ("a", 2)]
        assert await pipe.send(("b", 2)) == [("b", 0), ("b", 1)]
        stats = pipe.stats()
    st = stats["Counter"].stepping
    assert st.steps == 5 and st.mean_active == 1.0 and st.admissions_per_step == pytest.approx(0.4)
    assert st.first_output_p50 > 0 and stats.in_flight == 0
    assert all(t.startswith("asyncnn:") for t in model.threads)  # the model runs off the loop
    assert sorted(model.evicted) == ["a", "b"]


async def test_new_requests_join_a_running_set_between_steps_and_finished_ones_leave():
    model = Counter(delay=0.002)
    async with Pipeline([Stage(model, step=Stepping(max_active=8))]) as pipe:
        long = asyncio.ensure_future(pipe.send(("long", 40)))
        await anyio.sleep(0.02)  # "long" is generating
        short = await pipe.send(("short", 2))
        assert await long == [("long", i) for i in range(40)]
    assert short == [("short", 0), ("short", 1)]
    together = [s for s in model.steps if set(s) == {"long", "short"}]
    assert len(together) == 2  # "short" joined mid-run, and left after its two steps
    assert model.steps[-1] == ["long"] and model.steps[0] == ["long"]


async def test_max_active_and_the_budget_bound_each_step():
    model = Counter()
    spec = Stepping(max_active=3, cost=lambda x: x[1], budget=10)
    async with Pipeline([Stage(model, step=spec)]) as pipe:
        outs = await asyncio.gather(*(pipe.send((f"r{i}", 4)) for i in range(7)))
    assert outs == [[(f"r{i}", k) for k in range(4)] for i in range(7)]
    assert max(len(s) for s in model.steps) == 2  # 3 x 4 = 12 would exceed the budget of 10


async def test_requests_with_different_keys_never_share_a_step():
    model = Counter()
    spec = Stepping(key=lambda x: x[0][0])  # "a..." and "b..." never mix
    async with Pipeline([Stage(model, step=spec)]) as pipe:
        names = ["a1", "b1", "a2", "b2", "a3"]
        outs = await asyncio.gather(*(pipe.send((n, 3)) for n in names))
    assert outs == [[(n, k) for k in range(3)] for n in names]
    assert all(len({name[0] for name in step}) == 1 for step in model.steps)
    assert all(len({name[0] for name in adm}) == 1 for adm in model.admits)


async def test_one_failing_request_among_many_fails_alone_and_the_rest_carry_on():
    model = Counter(delay=0.001)
    async with Pipeline([Stage(model, name="gen", step=Stepping(max_active=8))]) as pipe:
        names = ["a", "b", "bad", "c", "d"]
        outs = await asyncio.gather(*(pipe.send((n, 5)) for n in names), return_exceptions=True)
        stats = pipe.stats()
    for name, out in zip(names, outs, strict=True):
        if name == "bad":
            assert isinstance(out, StageError) and out.stage == "gen"
            assert isinstance(out.__cause__, ValueError)
        else:
            assert out == [(name, k) for k in range(5)]
    assert stats["gen"].retries >= 1 and stats.failed == 1 and stats.in_flight == 0
    assert "bad" in model.evicted


async def test_a_reader_that_leaves_frees_its_slot_and_is_evicted():
    model = Counter(delay=0.001)
    async with Pipeline([Stage(model, step=Stepping(max_active=1))]) as pipe:
        async with contextlib.aclosing(pipe.send_stream(("forever", 10**9), buffer=2)) as parts:
            async for _, i in parts:
                if i == 3:
                    break
        # max_active=1: only once "forever" left can another request run.
        with anyio.fail_after(10):
            assert await pipe.send(("next", 2)) == [("next", 0), ("next", 1)]
        stats = pipe.stats()
    assert "forever" in model.evicted and stats.cancelled >= 1 and stats.in_flight == 0


async def test_a_slow_reader_skips_steps_without_holding_the_others_back():
    model = Counter()
    async with Pipeline([Stage(model, step=Stepping(max_active=4))]) as pipe:
        slow = pipe.send_stream(("slow", 30), buffer=2)
        assert await slow.__anext__() == ("slow", 0)  # then it stops reading for a while
        with anyio.fail_after(10):
            assert await pipe.send(("fast", 20)) == [("fast", k) for k in range(20)]
        rest = [p async for p in slow]
    assert rest == [("slow", k) for k in range(1, 30)]
    fast_steps = [s for s in model.steps if "fast" in s]
    assert any(s == ["fast"] for s in fast_steps)  # "slow" skipped those steps


async def test_closing_the_pipeline_drains_every_request_to_its_end():
    model = Counter(delay=0.001)
    pipe = Pipeline([Stage(model, step=Stepping(max_active=2))])
    async with pipe:
        futs = [asyncio.ensure_future(pipe.send((f"r{i}", 3 + i))) for i in range(5)]
        await anyio.lowlevel.checkpoint()
    for i, fut in enumerate(futs):
        assert fut.result() == [(f"r{i}", k) for k in range(3 + i)]


async def test_step_outputs_flow_on_through_later_stages():
    async def upper(part):
        name, i = part
        return f"{name.upper()}{i}"

    async with Pipeline([Stage(Counter(), step=Stepping()), Stage(upper)]) as pipe:
        assert [p async for p in pipe.send_stream(("x", 3))] == ["X0", "X1", "X2"]


async def test_a_step_that_returns_the_wrong_shape_is_named():
    class Wrong(Counter):
        def step(self, states):
            return [0] * (len(states) + 1), [True] * (len(states) + 1)  # one output too many

    async with Pipeline([Stage(Wrong(), name="w", step=Stepping())]) as pipe:
        outs = await asyncio.gather(
            pipe.send(("a", 1)), pipe.send(("b", 1)), return_exceptions=True
        )
    for out in outs:
        assert isinstance(out, StageError) and out.stage == "w"
        assert "must return (outputs, done), one of each per state" in str(out.__cause__)


async def test_a_key_or_cost_the_stage_cannot_use_fails_that_request_alone():
    # An unhashable key once ended the run (the stage groups its admissions by key).
    odd_key = Stepping(key=lambda x: [x[0]] if x[0] == "odd" else "k")
    odd_cost = Stepping(cost=lambda x: float("nan") if x[0] == "odd" else 1.0, budget=4.0)
    for stepping, match in ((odd_key, "not hashable"), (odd_cost, "cost= returned nan")):
        async with Pipeline([Stage(Counter(), name="s", step=stepping)]) as pipe:
            outs = await asyncio.gather(
                pipe.send(("a", 2)),
                pipe.send(("odd", 2)),
                pipe.send(("b", 1)),
                return_exceptions=True,
            )
            assert outs[0] == [("a", 0), ("a", 1)] and outs[2] == [("b", 0)]
            assert isinstance(outs[1], StageError) and outs[1].stage == "s"
            assert match in str(outs[1])
            assert await pipe.send(("c", 1)) == [("c", 0)]


def test_step_stages_are_declared_with_a_step_model():
    with pytest.raises(TypeError, match="needs an object with batched admit"):
        Stage(lambda x: x, step=Stepping())
    with pytest.raises(TypeError, match=r"must be asyncnn\.Stepping"):
        Stage(Counter(), step=8)
    with pytest.raises(ValueError, match="one step loop"):
        Stage(Counter(), step=Stepping(), workers=2)
    assert Stage(Counter(), step=Stepping()).yields


async def test_a_failing_evict_is_counted_by_the_stage_and_ends_no_request():
    class BadEvict(Counter):
        def evict(self, states):
            super().evict(states)
            raise RuntimeError("evict failed")

    model = BadEvict()
    async with Pipeline([Stage(model, name="c", step=Stepping(max_active=4))]) as pipe:
        got = await asyncio.gather(pipe.send(("a", 2)), pipe.send(("b", 3)))
    assert got == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1), ("b", 2)]]
    stats = pipe.stats()
    # Evictions run on the stage's thread without the loop waiting; each failure is counted.
    assert sorted(model.evicted) == ["a", "b"] and stats["c"].failures >= 1
    assert stats.completed == 2 and stats.failed == 0
