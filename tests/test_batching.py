"""Dynamic batching: the sync batcher with an injected clock, then batching stages end to end."""

import asyncio

import anyio
import pytest
import torch
from anyio import wait_all_tasks_blocked

from asyncnn import Batching, Pipeline, PipelineFull, Stage, StageError
from asyncnn.batcher import Batcher, Item
from asyncnn.batching import Request
from asyncnn.batchrun import collate, finish, run_batch
from asyncnn.padding import request_length
from asyncnn.payload import signature


def req(i):
    loop = asyncio.new_event_loop()
    r = Request(i, loop.create_future())
    loop.close()
    return r


def item(i, rows=1, at=0.0, source=None):
    return Item(req(i), source if source is not None else torch.zeros(rows, 2), 0, rows, at)


KEY = ((2,), torch.float32, torch.device("cpu"))


# -- the batcher, driven by an explicit clock ------------------------------------------------


def test_batch_closes_on_size():
    b = Batcher(Batching(max_size=4, max_delay=1.0))
    for i in range(3):
        b.add(item(i, at=0.0), KEY)
    assert b.pop(now=0.0) is None
    b.add(item(3, at=0.1), KEY)
    batch = b.pop(now=0.1)
    assert batch.reason == "full" and [i.request.id for i in batch.items] == [0, 1, 2, 3]
    assert b.pending_rows == 0 and b.pop(now=5.0) is None


def test_batch_closes_on_delay_of_the_oldest():
    b = Batcher(Batching(max_size=64, max_delay=0.005))
    b.add(item(0, at=10.0), KEY)
    b.add(item(1, at=10.004), KEY)
    assert b.next_deadline() == pytest.approx(10.005)
    assert b.pop(now=10.0049) is None
    batch = b.pop(now=10.005)
    assert batch.reason == "delay" and len(batch.items) == 2


def test_batch_closes_on_drain():
    b = Batcher(Batching(max_size=64, max_delay=10.0))
    b.add(item(0), KEY)
    assert b.pop(now=0.0) is None
    batch = b.pop(now=0.0, draining=True)
    assert batch.reason == "drain" and len(batch.items) == 1


def test_full_batch_takes_whole_requests_up_to_max_size():
    b = Batcher(Batching(max_size=5, max_delay=1.0))
    for i, rows in enumerate([2, 2, 2]):
        b.add(item(i, rows), KEY)
    first = b.pop(now=0.0)
    assert first.reason == "full" and first.rows == 4  # 2+2; the third would overflow
    assert b.pending_rows == 2


def test_oversized_request_is_released_alone():
    b = Batcher(Batching(max_size=4, max_delay=1.0))
    b.add(item(0, rows=10), KEY)
    b.add(item(1, rows=1), KEY)
    batch = b.pop(now=0.0)
    assert [i.request.id for i in batch.items] == [0] and batch.rows == 10


def test_preferred_sizes_on_delay():
    b = Batcher(Batching(max_size=64, max_delay=0.01, preferred_sizes=(8, 16, 32, 64)))
    for i in range(45):
        b.add(item(i, at=0.0 if i < 44 else 0.02), KEY)
    first = b.pop(now=0.015)
    assert first.reason == "preferred" and first.rows == 32  # the largest preferred size available
    second = b.pop(now=0.015)
    assert second.rows == 8  # 13 left: the next preferred size, the rest keep waiting
    third = b.pop(now=0.015)
    assert third.rows == 5  # still overdue and no preferred size fits: they go as they are
    assert b.pending_rows == 0


def test_preferred_sizes_keep_fresh_requests_waiting():
    b = Batcher(Batching(max_size=64, max_delay=0.01, preferred_sizes=(4, 8)))
    for i in range(10):
        b.add(item(i, at=0.0 if i < 5 else 0.009), KEY)
    assert b.pop(now=0.011).rows == 8
    assert b.pop(now=0.011) is None  # the two left are not overdue yet
    assert b.pop(now=0.0191).rows == 2


def test_shape_buckets_never_mix():
    b = Batcher(Batching(max_size=64, max_delay=0.0))
    small = torch.zeros(1, 2)
    wide = torch.zeros(1, 3)
    ints = torch.zeros(1, 2, dtype=torch.int64)
    for i, t in enumerate([small, wide, ints, small]):
        b.add(Item(req(i), t, 0, 1, float(i)), signature(t))
    got = []
    while (batch := b.pop(now=10.0)) is not None:
        got.append(sorted(i.request.id for i in batch.items))
    assert got == [[0, 3], [1], [2]]  # oldest bucket first


def test_signature_of_structures_and_bad_payloads():
    t = torch.zeros(3, 4)
    assert signature({"a": t, "b": (t, t)}) == signature({"a": t, "b": (t, t)})
    assert signature((t,)) != signature({"a": t})
    with pytest.raises(TypeError, match="got str"):
        signature("text")
    with pytest.raises(TypeError, match="0-d"):
        signature(torch.tensor(1.0))
    with pytest.raises(TypeError, match="pads dim 1"):
        request_length(Batching(pad=0), torch.zeros(3))


def test_batch_key_is_signature_and_rows_in_one_look():
    from asyncnn.payload import batch_key, count_rows

    class Sub(torch.Tensor):  # a tensor subclass takes the general path
        pass

    t = torch.zeros(3, 4)
    cases = [t, torch.zeros(0, 2), t.as_subclass(Sub), {"a": t, "b": (t, t)}, [t, t]]
    for p in cases:
        key, rows = batch_key(p)
        assert key == signature(p) and hash(key) == hash(signature(p))
        assert rows == count_rows(p)
    assert batch_key(t)[0] == batch_key(torch.ones(7, 4))[0]  # same trailing shape: one batch
    assert batch_key(t)[0] != batch_key(torch.zeros(3, 5))[0]
    assert batch_key(t)[0] != batch_key(torch.zeros(3, 4, dtype=torch.float64))[0]
    with pytest.raises(TypeError, match="got str"):
        batch_key("text")
    with pytest.raises(TypeError, match="0-d"):
        batch_key(torch.tensor(1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_size": 0}, "max_size"),
        ({"max_delay": -1}, "max_delay"),
        ({"preferred_sizes": (0,)}, "preferred_sizes"),
        ({"max_size": 8, "preferred_sizes": (16,)}, "larger than max_size"),
    ],
)
def test_bad_batching_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Batching(**kwargs)


def test_run_batch_splits_each_callers_rows_exactly():
    sources = [torch.arange(3.0).reshape(3, 1), torch.arange(10.0, 12.0).reshape(2, 1)]
    ranges = [(sources[0], 0, 3), (sources[1], 0, 2), (sources[0], 1, 2)]
    _, rows, parts, done = run_batch("double", lambda x: x * 2, ranges, Batching(max_size=64))
    assert rows == [3, 2, 1] and done is None
    assert [p.flatten().tolist() for p in parts] == [[0, 2, 4], [20, 22], [2]]


def test_run_batch_chunks_an_oversized_request():
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return x + 1

    src = torch.arange(10.0).reshape(10, 1)
    out, _, _, _ = run_batch("m", model, [(src, 0, 10)], Batching(max_size=4))
    assert calls == [4, 4, 2] and torch.equal(out, src + 1)


def test_row_mismatch_names_the_stage_and_both_numbers():
    from asyncnn.payload import RowMismatch

    with pytest.raises(RowMismatch, match=r"stage 'embed' returned 31 rows for a batch of 32"):
        finish("embed", torch.zeros(31, 2), [16, 16], Batching())
    with pytest.raises(RowMismatch, match="returned NoneType"):
        finish("embed", None, [1], Batching())


def test_padding_round_trip():
    spec = Batching(pad=0, trim=True)
    a = torch.ones(1, 3, dtype=torch.long)
    b = torch.full((2, 5), 7, dtype=torch.long)
    payload, rows, lengths, target = collate([(a, 0, 1), (b, 0, 2)], spec)
    assert payload.shape == (3, 5) and payload[0].tolist() == [1, 1, 1, 0, 0]
    _, rows, parts = finish("seq", payload * 2, rows, spec, lengths, target)
    assert parts[0].tolist() == [[2, 2, 2]] and parts[1].shape == (2, 5)


# -- batching stages, end to end -----------------------------------------------------------


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).eval()


async def test_concurrent_callers_each_get_their_own_rows():
    model = linear()
    pipe = Pipeline([Stage(model, batch=Batching(max_size=16, max_delay=0.01))], queue_size=128)
    xs = [torch.randn(1 + i % 4, 4) for i in range(100)]
    async with pipe:
        ys = await asyncio.gather(*(pipe.send(x) for x in xs))
        st = pipe.stats()["Linear"]
    with torch.inference_mode():
        for x, y in zip(xs, ys, strict=True):
            torch.testing.assert_close(y, model(x))
    assert st.items == 100 and st.rows == sum(x.shape[0] for x in xs)
    assert st.batches < 100 and st.mean_batch_size > 1
    assert st.released_full + st.released_delay + st.released_drain == st.batches


async def test_dict_and_tuple_payloads():
    def f(d):
        return {"sum": d["a"] + d["b"][0], "prod": d["a"] * d["b"][1]}

    pipe = Pipeline([Stage(f, batch=Batching(max_size=8, max_delay=0.01))])
    async with pipe:
        xs = [
            {"a": torch.full((2, 1), float(i)), "b": (torch.ones(2, 1), torch.full((2, 1), 2.0))}
            for i in range(6)
        ]
        ys = await asyncio.gather(*(pipe.send(x) for x in xs))
    for i, y in enumerate(ys):
        assert y["sum"].flatten().tolist() == [i + 1.0, i + 1.0]
        assert y["prod"].flatten().tolist() == [2.0 * i, 2.0 * i]


async def test_consecutive_batched_stages_pass_the_merged_batch_along():
    seen = []

    def a(x):
        seen.append(("a", x.shape[0]))
        return x + 1

    def b(x):
        seen.append(("b", x.shape[0]))
        return x * 10

    spec = Batching(max_size=64, max_delay=0.05)
    pipe = Pipeline(
        [
            Stage(a, batch=spec),
            Stage(b, batch=spec),
            Stage(lambda x: x.sum().item(), name="unbatched"),
        ]
    )
    async with pipe:
        for i in range(8):
            pipe.submit_nowait(torch.full((1, 1), float(i)))
        futs = [pipe.submit_nowait(torch.full((1, 1), float(i))) for i in range(8, 10)]
        res = await asyncio.gather(*futs)
    assert res == [90.0, 100.0]
    assert ("a", 10) in seen and ("b", 10) in seen  # one merged batch through both stages


async def test_shape_buckets_end_to_end():
    calls = []

    def f(x):
        calls.append(tuple(x.shape))
        return x.sum(dim=1, keepdim=True)

    pipe = Pipeline([Stage(f, batch=Batching(max_size=64, max_delay=0.05))])
    async with pipe:
        xs = [torch.ones(1, 2), torch.ones(1, 3), torch.ones(2, 2), torch.ones(1, 3)]
        ys = await asyncio.gather(*(pipe.send(x) for x in xs))
    assert [y.flatten().tolist() for y in ys] == [[2.0], [3.0], [2.0, 2.0], [3.0]]
    assert sorted(calls) == [(2, 3), (3, 2)]


async def test_padding_end_to_end():
    def embed(x):
        return x.unsqueeze(-1).float() * 2

    pipe = Pipeline([Stage(embed, batch=Batching(max_size=8, max_delay=0.05, pad=0, trim=True))])
    async with pipe:
        xs = [torch.ones(1, n, dtype=torch.long) for n in (2, 5, 3)]
        ys = await asyncio.gather(*(pipe.send(x) for x in xs))
        assert pipe.stats()["embed"].batches == 1
    assert [tuple(y.shape) for y in ys] == [(1, 2, 1), (1, 5, 1), (1, 3, 1)]


async def test_oversized_request_is_chunked_and_reassembled():
    sizes = []

    def f(x):
        sizes.append(x.shape[0])
        return x * 3

    async with Pipeline([Stage(f, batch=Batching(max_size=4, max_delay=0.0))]) as pipe:
        y = await pipe.send(torch.arange(10.0).reshape(10, 1))
    assert torch.equal(y, torch.arange(10.0).reshape(10, 1) * 3)
    assert sizes == [4, 4, 2]


async def test_one_poisoned_request_among_63_fails_alone():
    def model(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x * 2

    gate = asyncio.Event()

    async def hold(x):
        await gate.wait()
        return x

    pipe = Pipeline(
        [
            Stage(hold, workers=64),
            Stage(model, name="model", batch=Batching(max_size=64, max_delay=1.0)),
        ],
        queue_size=64,
    )
    async with pipe:
        futs = [
            pipe.submit_nowait(torch.full((1, 1), -1.0 if i == 17 else float(i))) for i in range(64)
        ]
        await wait_all_tasks_blocked()
        gate.set()
        results = await asyncio.gather(*futs, return_exceptions=True)
        st = pipe.stats()["model"]
    for i, r in enumerate(results):
        if i == 17:
            assert isinstance(r, StageError) and r.stage == "model"
            assert isinstance(r.__cause__, ValueError)
        else:
            assert r.item() == 2.0 * i
    assert st.batches == 1 and st.retries > 0 and st.released_full == 1
    assert st.failures >= 1


async def test_isolation_can_be_turned_off():
    def model(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x

    gate = asyncio.Event()

    async def hold(x):
        await gate.wait()
        return x

    spec = Batching(max_size=4, max_delay=1.0, isolate_failures=False)
    async with Pipeline([Stage(hold, workers=4), Stage(model, batch=spec)]) as pipe:
        futs = [pipe.submit_nowait(torch.full((1, 1), -1.0 if i == 0 else 1.0)) for i in range(4)]
        await wait_all_tasks_blocked()
        gate.set()
        results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, StageError) for r in results)


async def test_wrong_row_count_is_a_clear_error_even_for_one_request():
    def drops_a_row(x):
        return x[1:]

    async with Pipeline([Stage(drops_a_row, batch=Batching(max_size=8, max_delay=0.0))]) as pipe:
        with pytest.raises(StageError, match=r"returned 1 rows for a batch of 2"):
            await pipe.send(torch.zeros(2, 1))
        with pytest.raises(StageError, match="returned 0 rows for a batch of 1"):
            await pipe.send(torch.zeros(1, 1))


async def test_non_tensor_and_empty_requests_fail_alone():
    async with Pipeline(
        [Stage(lambda x: x, name="m", batch=Batching(max_size=8, max_delay=0.0))]
    ) as pipe:
        with pytest.raises(StageError, match=r"'m' cannot batch this request: .*got str"):
            await pipe.send("hello")
        with pytest.raises(StageError, match="0 rows"):
            await pipe.send(torch.zeros(0, 3))
        assert (await pipe.send(torch.ones(1, 3))).shape == (1, 3)


async def test_cancelled_caller_is_removed_from_its_forming_batch():
    seen_rows = []

    def model(x):
        seen_rows.extend(x.flatten().tolist())
        return x

    spec = Batching(max_size=64, max_delay=30.0)
    pipe = Pipeline([Stage(model, batch=spec)])
    async with pipe:
        keep = [asyncio.ensure_future(pipe.send(torch.full((1, 1), float(i)))) for i in range(3)]
        gone = asyncio.ensure_future(pipe.send(torch.full((1, 1), 99.0)))
        await wait_all_tasks_blocked()
        gone.cancel()
        await wait_all_tasks_blocked()
        await pipe.aclose(timeout=5)  # drain releases the forming batch
    assert [k.result().item() for k in keep] == [0.0, 1.0, 2.0]
    assert 99.0 not in seen_rows
    st = pipe.stats()
    assert st.cancelled == 1 and st.in_flight == 0


async def test_deadline_raises_timeout_error_and_drops_before_compute():
    computed = []
    gate = asyncio.Event()

    async def slow_front(x):
        await gate.wait()
        return x

    def model(x):
        computed.extend(x.flatten().tolist())
        return x

    pipe = Pipeline(
        [Stage(slow_front, workers=8), Stage(model, batch=Batching(max_size=8, max_delay=0.0))]
    )
    async with pipe:
        with pytest.raises(TimeoutError):
            await pipe.send(torch.full((1, 1), 5.0), timeout=0.01)
        gate.set()
        assert (await pipe.send(torch.full((1, 1), 6.0), timeout=5)).item() == 6.0
    assert computed == [6.0]
    st = pipe.stats()
    assert st.cancelled == 1 and st.completed == 1 and st.in_flight == 0


async def test_max_request_rows_refuses_oversized_requests():
    async with Pipeline([lambda x: x], max_request_rows=4) as pipe:
        with pytest.raises(ValueError, match="max_request_rows=4"):
            await pipe.send(torch.zeros(5, 1))
        with pytest.raises(ValueError, match="5 rows refused"):
            pipe.submit_nowait(torch.zeros(5, 1))
        assert (await pipe.send(torch.zeros(4, 1))).shape == (4, 1)
        assert pipe.stats().admitted == 1


async def test_load_shedding_with_a_batching_stage():
    gate = anyio.Event()

    async def held(x):
        await gate.wait()
        return x

    pipe = Pipeline([Stage(held), Stage(lambda x: x, name="m", batch=Batching())], queue_size=2)
    async with pipe:
        futs = []
        with pytest.raises(PipelineFull):
            for _ in range(10):
                futs.append(pipe.submit_nowait(torch.zeros(1, 1)))
        gate.set()
        await asyncio.gather(*futs)


async def test_async_batched_stage_runs_on_the_loop():
    async def model(x):
        await asyncio.sleep(0)
        return x + 1

    async with Pipeline([Stage(model, batch=Batching(max_size=4, max_delay=0.01))]) as pipe:
        ys = await asyncio.gather(*(pipe.send(torch.full((1, 1), float(i))) for i in range(10)))
        big = await pipe.send(torch.zeros(9, 1))
    assert [y.item() for y in ys] == [i + 1.0 for i in range(10)]
    assert torch.equal(big, torch.ones(9, 1))


def test_microbatch_and_batching_do_not_mix():
    from asyncnn import GraphError

    with pytest.raises(GraphError, match="microbatch does not mix"):
        Pipeline([Stage(abs, batch=Batching())], microbatch=2)


@pytest.mark.parametrize(("max_retries", "failed", "retries"), [(None, 1, 6), (3, 4, 3), (0, 8, 0)])
async def test_max_retries_bounds_what_isolating_one_poisoned_request_costs(
    max_retries, failed, retries
):
    def picky(x):
        if (x < 0).any():
            raise ValueError("negative")
        return x

    spec = Batching(max_size=8, max_delay=0.05, max_retries=max_retries)
    async with Pipeline([Stage(picky, batch=spec)]) as pipe:
        xs = [torch.full((1, 1), -1.0 if i == 5 else float(i)) for i in range(8)]
        got = await asyncio.gather(*(pipe.send(x) for x in xs), return_exceptions=True)
        st = pipe.stats()["picky"]
    assert sum(isinstance(g, StageError) for g in got) == failed
    assert isinstance(got[5], StageError)  # the guilty one always fails
    assert st.retries == retries and st.batches == 1
    assert (st.retries_exhausted > 0) == (max_retries is not None)
