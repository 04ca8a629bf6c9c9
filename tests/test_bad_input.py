"""The bad-input catalogue: each kind of bad input or bad stage behaviour gets an error that
names the stage and says what to do, and the pipeline keeps serving afterwards."""

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from anyio import wait_all_tasks_blocked

import asyncnn
from asyncnn import (
    AsyncLoader,
    Batching,
    Graph,
    GraphError,
    LoaderError,
    Pipeline,
    PipelineClosed,
    Stage,
    StageError,
)


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def batched(fn, name="m", **kw):
    return Stage(fn, name=name, batch=Batching(max_size=8, max_delay=0.0, **kw))


async def still_serves(pipe, x=None, expect=None):
    x = torch.ones(1, 4) if x is None else x
    y = await pipe.send(x)
    if expect is not None:
        assert torch.equal(y, expect)
    return y


async def fails_alone(pipe, bad, match, stage="m"):
    with pytest.raises(StageError, match=match) as info:
        await pipe.send(bad)
    assert info.value.stage == stage and f"'{stage}'" in str(info.value)
    return info.value


# 1
async def test_non_tensor_to_a_batching_stage():
    async with Pipeline([batched(lambda x: x)]) as pipe:
        err = await fails_alone(pipe, "text", "a batching stage takes a tensor.*got str")
        assert isinstance(err.__cause__, TypeError)
        await still_serves(pipe)


# 2
async def test_wrong_trailing_shape_for_the_model():
    async with Pipeline([batched(linear())]) as pipe:
        err = await fails_alone(pipe, torch.ones(1, 5), "raised RuntimeError")
        assert "shapes" in str(err.__cause__)
        await still_serves(pipe)


# 3
async def test_wrong_dtype_forms_its_own_batch_and_fails_alone():
    async with Pipeline([batched(linear())]) as pipe:
        good = asyncio.ensure_future(pipe.send(torch.ones(1, 4)))
        with pytest.raises(StageError, match="'m' raised RuntimeError"):
            await pipe.send(torch.ones(1, 4, dtype=torch.float64))
        assert (await good).shape == (1, 2)


# 4
async def test_empty_tensor():
    async with Pipeline([batched(lambda x: x)]) as pipe:
        await fails_alone(pipe, torch.zeros(0, 4), "0 rows")
        await still_serves(pipe)


# 5
async def test_nan_rejected_by_a_stage():
    def finite_only(x):
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input: clean NaN/inf before sending")
        return x

    async with Pipeline([batched(finite_only)]) as pipe:
        await fails_alone(pipe, torch.tensor([[float("nan"), 1, 2, 3]]), "non-finite input")
        await fails_alone(pipe, torch.tensor([[float("inf"), 1, 2, 3]]), "non-finite input")
        await still_serves(pipe)


# 6
async def test_request_over_max_request_rows():
    async with Pipeline([lambda x: x], max_request_rows=8) as pipe:
        with pytest.raises(ValueError, match="9 rows refused: max_request_rows=8; split it"):
            await pipe.send(torch.zeros(9, 4))
        await still_serves(pipe)


# 7
async def test_stage_returns_the_wrong_number_of_rows():
    async with Pipeline([batched(lambda x: x[:-1])]) as pipe:
        await fails_alone(pipe, torch.ones(3, 4), "returned 2 rows for a batch of 3: a batched")


# 8
async def test_stage_returns_none():
    async with Pipeline([batched(lambda x: None)]) as pipe:
        await fails_alone(pipe, torch.ones(1, 4), "returned NoneType for a batch of 1 rows")


# 9
async def test_stage_returns_a_non_tensor():
    async with Pipeline([batched(lambda x: "oops")]) as pipe:
        await fails_alone(pipe, torch.ones(1, 4), "returned str .* must return a tensor")


# 10
async def test_tensor_on_a_device_the_stage_cannot_use():
    async with Pipeline([Stage(lambda x: x + 1, name="m", device="cpu")]) as pipe:
        err = await fails_alone(pipe, torch.ones(1, 4, device="meta"), "raised")
        assert "meta" in str(err).lower()
        await still_serves(pipe)


# 11, 12
@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit(3)"])
@pytest.mark.parametrize("where", ["thread", "loop"])
def test_base_exceptions_are_not_swallowed(exc, where):
    code = textwrap.dedent(
        f"""
        import asyncio, asyncnn
        def sync_stage(x):
            raise {exc}
        async def async_stage(x):
            raise {exc}
        async def main():
            fn = sync_stage if "{where}" == "thread" else async_stage
            async with asyncnn.Pipeline([fn]) as pipe:
                await pipe.send(1)
        asyncio.run(main())
        print("SWALLOWED")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "SWALLOWED" not in proc.stdout
    if exc == "KeyboardInterrupt":
        assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    else:
        assert proc.returncode == 3  # the exit the stage asked for, not wrapped in a group


# 13
async def test_a_stage_that_blocks_forever_deadline_and_watchdog():
    release = asyncio.Event()

    async def stuck(x):
        await release.wait()
        return x

    pipe = Pipeline([Stage(stuck, name="stuck")], stall_timeout=0.05)
    stalls = pipe.events.listen(kinds="stall")
    async with pipe:
        with pytest.raises(TimeoutError):
            await pipe.send(1, timeout=0.01)
        pending = pipe.submit_nowait(2)
        stall = await stalls.__anext__()
        assert stall.stage == "stuck"
        release.set()
        assert await pending == 2


# 14
async def test_a_sync_stage_that_returns_a_coroutine_by_mistake():
    async def helper(x):
        return x

    def forgot_async(x):
        return helper(x) if x == 1 else x

    async with Pipeline([Stage(forgot_async, name="m", executor="inline")]) as pipe:
        await fails_alone(pipe, 1, "returned a coroutine: .* make the stage's function `async def`")
        assert await pipe.send(2) == 2
    async with Pipeline([Stage(forgot_async, name="m")]) as pipe:  # on a thread
        await fails_alone(pipe, 1, "returned a coroutine")
        assert await pipe.send(2) == 2


# 15
def test_a_generator_stage_that_also_batches():
    async def gen(x):
        yield x

    with pytest.raises(TypeError, match=r"async generator .* cannot also batch"):
        Stage(gen, batch=Batching(max_size=4))


# 16
def test_a_graph_with_a_cycle():
    g = Graph()
    x = g.input()
    a = g.add(Stage(abs, name="a"), x)
    b = g.add(Stage(abs, name="b"), a)
    a.parents = (x, b)
    g.output(b)
    with pytest.raises(GraphError, match="cycle through stage"):
        Pipeline(g)


# 17
async def test_a_join_whose_branches_fail_differently():
    def left(x):
        raise ValueError("left broke")

    def right(x):
        raise KeyError("right broke")

    g = Graph()
    x = g.input()
    g.output(
        g.add(Stage(lambda a, b: a, name="join"), g.add(Stage(left), x), g.add(Stage(right), x))
    )
    async with Pipeline(g) as pipe:
        with pytest.raises(StageError) as info:
            await pipe.send(1)
        assert info.value.stage in ("left", "right")
        await asyncio.sleep(0)
        st = pipe.stats()
    assert st.failed == 1 and st.admitted == 1 and st.in_flight == 0  # failed once, not twice


# 18
async def test_a_loader_sample_that_raises():
    async def fetch(i):
        if i == 1:
            raise ConnectionError("peer reset")
        return torch.tensor([i])

    with pytest.raises(LoaderError, match="sample 1 failed with ConnectionError: peer reset"):
        async for _ in AsyncLoader(range(4), batch_size=2, fetch=fetch):
            pass


# 19
async def test_a_dict_payload_with_missing_keys():
    def needs_b(d):
        return {"a": d["a"] + d["b"]}

    async with Pipeline([batched(needs_b)]) as pipe:
        good = asyncio.ensure_future(pipe.send({"a": torch.ones(1, 2), "b": torch.ones(1, 2)}))
        err = await fails_alone(pipe, {"a": torch.ones(1, 2)}, "raised KeyError: 'b'")
        assert isinstance(err.__cause__, KeyError)
        assert torch.equal((await good)["a"], torch.full((1, 2), 2.0))


# 20
async def test_tensors_of_one_request_disagree_on_rows():
    async with Pipeline([batched(lambda t: t)]) as pipe:
        await fails_alone(pipe, (torch.ones(2, 1), torch.ones(3, 1)), "disagree on dim 0")
        await still_serves(pipe)


# 21
async def test_a_zero_dimensional_tensor_to_a_batching_stage():
    async with Pipeline([batched(lambda t: t)]) as pipe:
        await fails_alone(pipe, torch.tensor(3.0), "0-d tensor has no rows")
        await still_serves(pipe)


# 22
async def test_a_deeply_nested_payload_is_refused_before_it_is_walked():
    deep = torch.ones(1, 1)
    for _ in range(10_000):
        deep = {"x": deep}
    async with Pipeline([batched(lambda t: t)], max_request_rows=4) as pipe:
        with pytest.raises(TypeError, match="more than 16 levels deep"):
            await pipe.send(deep)  # refused at admission by the rows check
        await still_serves(pipe)
    async with Pipeline([batched(lambda t: t)]) as pipe:
        await fails_alone(pipe, deep, "more than 16 levels deep")
        await still_serves(pipe)


# 22b
async def test_a_nested_tensor_to_a_batching_stage_fails_alone():
    # torch raised an internal error reading its shape, outside any request: the run ended.
    ragged = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    with warnings.catch_warnings():  # the strided layout is a prototype: torch warns
        warnings.simplefilter("ignore", UserWarning)
        strided = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    for batch in (Batching(max_size=8, max_delay="auto"), Batching(max_size=8, pad=0.0)):
        async with Pipeline([Stage(lambda t: t, name="m", batch=batch)]) as pipe:
            for bad in (ragged, strided):
                err = await fails_alone(pipe, bad, "nested .ragged. tensor.*Batching.pad=")
                assert isinstance(err.__cause__, TypeError)
            await still_serves(pipe)
    async with Pipeline([batched(lambda t: t)], max_request_rows=4) as pipe:
        await fails_alone(pipe, ragged, "nested")  # counting its rows at admission: no crash
        await still_serves(pipe)


class Unprintable(Exception):
    """An exception whose message cannot be made (a format string that does not match its
    arguments, say): str() raises."""

    def __str__(self):
        raise RuntimeError("cannot print")


def raises_when_negative(x):
    if x.sum() < 0:
        raise Unprintable()
    return x


async def araises_when_negative(x):
    return raises_when_negative(x)


def yields_then_raises(x):
    yield x
    raises_when_negative(x)


# 22c
async def test_an_exception_that_cannot_be_printed_fails_its_request_alone():
    # The runtime words a stage's exception inside its own task: str() raising there ended
    # the run for every request, whatever the stage's kind.
    for stage in (
        Stage(raises_when_negative, name="m"),
        Stage(araises_when_negative, name="m"),
        Stage(raises_when_negative, name="m", executor="inline"),
        batched(raises_when_negative),
        Stage(yields_then_raises, name="m"),
    ):
        async with Pipeline([stage]) as pipe:
            err = await fails_alone(pipe, -torch.ones(1, 4), "Unprintable: <str.. of this exc")
            assert isinstance(err.__cause__, Unprintable)
            await still_serves(pipe)


class UnprintableSamples(torch.utils.data.Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        if i == 130:
            raise Unprintable()
        return torch.full((4,), float(i))


# 22d
@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_a_loader_sample_whose_exception_cannot_be_printed_is_still_named(kind):
    with pytest.raises(LoaderError, match="sample 130 failed with Unprintable") as info:
        async for _ in AsyncLoader(UnprintableSamples(), batch_size=64, worker_kind=kind):
            pass
    assert info.value.index == 130


def stubborn(x):
    while True:
        try:
            yield x
        except GeneratorExit:
            yield x  # ignores the close: Python raises RuntimeError from close()


async def astubborn(x):
    while True:
        try:
            yield x
        except GeneratorExit:
            yield x


# 22e
async def test_a_generator_that_ignores_close_is_named_and_the_stage_carries_on(caplog):
    # Closing an async generator that ignored GeneratorExit raised in the stage's task: the
    # run ended when a reader left early. A sync one was closed silently.
    for fn in (stubborn, astubborn):
        caplog.clear()
        async with Pipeline([Stage(fn, name="g")]) as pipe:
            for _ in range(3):  # each reader leaves after one part: the generator is closed
                async with contextlib.aclosing(pipe.send_stream(torch.ones(1, 4))) as parts:
                    async for part in parts:
                        assert torch.equal(part, torch.ones(1, 4))
                        break
            await wait_all_tasks_blocked()
            assert pipe.state == "running" and pipe.stats().in_flight == 0
        assert "stage 'g': closing a generator raised RuntimeError" in caplog.text, fn


def stops_when_negative(x):
    if (x < 0).any():
        next(iter([]))  # a next() past the end: StopIteration
    return x


# 22f
async def test_a_stage_that_raises_stopiteration_fails_its_request_alone():
    # asyncio refuses StopIteration in a future: a thread stage's request never ended (its
    # caller hung) and the loop logged "Exception in callback".
    for stage in (
        Stage(stops_when_negative, name="m"),
        Stage(stops_when_negative, name="m", workers=2),  # calls queued ahead on its threads
        batched(stops_when_negative),
        Stage(stops_when_negative, name="m", batch=Batching(max_size=8, max_delay="auto")),
    ):
        async with Pipeline([stage]) as pipe:
            err = await fails_alone(pipe, -torch.ones(1, 4), "StopIteration.*give next.. a def")
            assert isinstance(err.__cause__, RuntimeError)
            assert isinstance(err.__cause__.__cause__, StopIteration)
            await still_serves(pipe)


# 22g
async def test_a_call_from_another_thread_or_loop_is_refused_before_anything_is_touched():
    # A sync web handler on a worker thread calling asyncio.run(pipe.send(x)) admitted the
    # request from that thread (the queues and ledger are the loop's, unguarded) and then
    # failed on a future of the wrong loop: the answer was computed and lost.
    async with Pipeline([Stage(lambda t: t * 2, name="m")]) as pipe:
        loop = asyncio.get_running_loop()

        def handler():
            with pytest.raises(RuntimeError, match=r"pipe.send\(\) was called from another"):
                asyncio.run(pipe.send(torch.ones(1)))
            with pytest.raises(RuntimeError, match=r"submit_nowait.*a thread with no loop"):
                pipe.submit_nowait(torch.ones(1))
            ok = asyncio.run_coroutine_threadsafe(pipe.send(torch.ones(1)), loop)  # as advised
            return ok.result(timeout=10)

        assert torch.equal(await asyncio.to_thread(handler), torch.full((1,), 2.0))
        assert pipe.stats().admitted == 1 and pipe.stats().in_flight == 0
        await still_serves(pipe, torch.ones(1), torch.full((1,), 2.0))


# 23
def test_bad_configuration_is_refused_at_construction():
    with pytest.raises(TypeError, match="must be an async def"):
        Stage(None)
    with pytest.raises(ValueError, match="workers=0"):
        Stage(abs, workers=0)
    with pytest.raises(ValueError, match="queue_size=-1"):
        Pipeline([abs], queue_size=-1)
    with pytest.raises(ValueError, match="max_delay"):
        Batching(max_delay=-0.1)
    with pytest.raises(TypeError, match=r"batch=.* must be asyncnn\.Batching"):
        Stage(abs, batch={"max_size": 8})
    # Options passed positionally: the call written with keywords, not Python's "takes 1
    # positional argument but 2 were given".
    with pytest.raises(TypeError, match=r"write Batching\(max_size=64, max_delay=0\.01\)"):
        Batching(64, 0.01)
    with pytest.raises(TypeError, match=r"takes fn positionally .* write Stage\(<fn>, name='m'\)"):
        Stage(abs, "m")
    with pytest.raises(TypeError, match=r"write Stepping\(max_active=8\)"):
        asyncnn.Stepping(8)
    assert Batching(max_size=8).max_size == 8 and Stage(abs, name="m").name == "m"


# 24
async def test_requests_after_close_get_pipeline_closed():
    pipe = Pipeline([abs])
    async with pipe:
        pass
    with pytest.raises(PipelineClosed, match="closed: it accepts no new requests"):
        await pipe.send(1)


# 25
async def test_one_poisoned_request_fails_alone_in_a_batch_of_16():
    gate = asyncio.Event()

    async def hold(x):
        await gate.wait()
        return x

    def model(x):
        if (x < 0).any():
            raise ValueError("negative")
        return x

    pipe = Pipeline(
        [Stage(hold, workers=16), Stage(model, name="m", batch=Batching(max_size=16, max_delay=1))]
    )
    async with pipe:
        futs = [pipe.submit_nowait(torch.full((1, 1), -1.0 if i == 5 else 1.0)) for i in range(16)]
        await wait_all_tasks_blocked()
        gate.set()
        res = await asyncio.gather(*futs, return_exceptions=True)
        await still_serves(pipe, torch.ones(1, 1), torch.ones(1, 1))
    assert [i for i, r in enumerate(res) if isinstance(r, Exception)] == [5]


def test_catalogue_covers_at_least_twenty_kinds():
    kinds = [
        n
        for n in globals()
        if n.startswith("test_") and n != "test_catalogue_covers_at_least_twenty_kinds"
    ]
    assert len(kinds) >= 20, kinds
    assert asyncnn.__version__
