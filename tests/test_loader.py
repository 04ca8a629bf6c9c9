"""AsyncLoader: every source kind, order, shuffle, collate, errors, early exit, bounded prefetch."""

import asyncio
import contextlib
import threading

import anyio
import pytest
import torch
from anyio import wait_all_tasks_blocked
from torch.utils.data import DataLoader

from asyncnn import AsyncLoader, LoaderError, Pipeline, Stage


class SyncDS:
    def __init__(self, n=10):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.tensor([float(i)])


class AsyncDS:
    """Fetches finish in reverse order within each group of 4 (later indices first)."""

    def __init__(self, n=12):
        self.n = n

    def __len__(self):
        return self.n

    async def __getitem__(self, i):
        for _ in range(4 - i % 4):
            await asyncio.sleep(0)
        return {"x": torch.tensor([float(i)]), "i": i}


def flat(batches):
    return [b.flatten().tolist() for b in batches]


async def collect(loader):
    return [b async for b in loader]


async def test_map_style_sync_dataset_in_order_with_len():
    loader = AsyncLoader(SyncDS(10), batch_size=4)
    assert len(loader) == 3
    assert flat(await collect(loader)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert loader.stats().samples == 10 and loader.stats().batches == 3


async def test_drop_last():
    loader = AsyncLoader(SyncDS(10), batch_size=4, drop_last=True)
    assert len(loader) == 2
    assert flat(await collect(loader)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


async def test_async_getitem_out_of_order_completion_yields_sampler_order():
    loader = AsyncLoader(AsyncDS(12), batch_size=4, concurrency=8)
    batches = await collect(loader)
    assert [b["i"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert batches[0]["x"].shape == (4, 1)


async def test_unordered_yields_as_batches_fill():
    loader = AsyncLoader(AsyncDS(12), batch_size=4, concurrency=12, ordered=False)
    batches = await collect(loader)
    got = [i for b in batches for i in b["i"].tolist()]
    assert sorted(got) == list(range(12))
    assert got != list(range(12))  # the fast (later) fetches filled the first batch


async def test_fetch_function_and_async_concurrency_bound():
    running = 0
    peak = 0

    async def fetch(i):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1
        return (torch.tensor([i]), torch.tensor([2 * i]))

    loader = AsyncLoader(range(40), batch_size=8, concurrency=5, fetch=fetch)
    batches = await collect(loader)
    assert peak <= 5
    assert batches[0][0].flatten().tolist() == list(range(8))
    assert batches[0][1].flatten().tolist() == [2 * i for i in range(8)]


async def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    def make():
        g = torch.Generator()
        g.manual_seed(123)
        return AsyncLoader(SyncDS(20), batch_size=5, shuffle=True, generator=g)

    a, b = make(), make()
    a1, b1 = flat(await collect(a)), flat(await collect(b))
    assert a1 == b1
    order1 = [i for b in a1 for i in b]
    assert sorted(order1) == list(range(20)) and order1 != list(range(20))
    a2 = flat(await collect(a))
    assert a2 != a1 and sorted(i for b in a2 for i in b) == list(range(20))
    assert a.stats().epochs == 2


async def test_sampler():
    loader = AsyncLoader(SyncDS(10), batch_size=3, sampler=[9, 0, 5, 5])
    assert len(loader) == 2
    assert flat(await collect(loader)) == [[9, 0, 5], [5]]


async def test_sync_iterable_async_iterable_and_dataloader_sources():
    gen = (torch.tensor([i]) for i in range(7))
    loader = AsyncLoader(gen, batch_size=3)
    assert flat(await collect(loader)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert (loader.stats().batches, loader.stats().samples) == (3, 7)

    async def agen():
        for i in range(5):
            await asyncio.sleep(0)
            yield {"v": torch.tensor(i)}

    batches = await collect(AsyncLoader(agen(), batch_size=2, drop_last=True))
    assert [b["v"].tolist() for b in batches] == [[0, 1], [2, 3]]

    dl = DataLoader(SyncDS(6), batch_size=4)
    loader = AsyncLoader(dl)
    assert len(loader) == 2
    assert flat(await collect(loader)) == [[0, 1, 2, 3], [4, 5]]
    assert (loader.stats().batches, loader.stats().samples) == (2, 6)


async def test_custom_collate_tuples_and_dicts():
    class Pairs:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (torch.full((2,), float(i)), {"label": i})

    batches = await collect(AsyncLoader(Pairs(), batch_size=4))
    x, meta = batches[0]
    assert x.shape == (4, 2) and meta["label"].tolist() == [0, 1, 2, 3]
    batches = await collect(AsyncLoader(Pairs(), batch_size=2, collate=lambda s: len(s)))
    assert batches == [2, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_pin_memory_without_accelerator_warns_and_falls_back():
    with pytest.warns(RuntimeWarning, match="no accelerator"):
        loader = AsyncLoader(SyncDS(4), batch_size=2, pin_memory=True)
    assert loader.pin_memory is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_when_the_loader_is_made():
    # It failed at the first batch with torch's "torch.cuda.Stream requires CUDA support".
    with pytest.raises(RuntimeError, match="device='cuda' was asked for but CUDA is not avail"):
        AsyncLoader(SyncDS(4), batch_size=2, device="cuda")


def test_threads_is_named_in_its_own_error():
    with pytest.raises(ValueError, match="threads=0 must be a whole number"):
        AsyncLoader(SyncDS(4), batch_size=2, threads=0)


@pytest.mark.gpu
async def test_pin_memory_and_early_copy_to_cuda():
    loader = AsyncLoader(SyncDS(8), batch_size=4, pin_memory=True, device="cuda:0")
    batches = await collect(loader)
    assert all(b.device.type == "cuda" for b in batches)
    assert [b.cpu().flatten().tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    pinned = await collect(AsyncLoader(SyncDS(4), batch_size=4, pin_memory=True))
    assert pinned[0].is_pinned()


async def test_failing_fetch_names_the_index_and_chains_the_cause():
    class Bad(SyncDS):
        def __getitem__(self, i):
            if i == 6:
                raise OSError("disk on fire")
            return super().__getitem__(i)

    loader = AsyncLoader(Bad(10), batch_size=4)
    got = []
    with pytest.raises(LoaderError, match="sample 6 failed with OSError: disk on fire") as info:
        async for b in loader:
            got.append(b)
    assert info.value.index == 6 and isinstance(info.value.__cause__, OSError)
    assert flat(got) == [[0, 1, 2, 3]]


async def test_skip_mode_counts_bad_samples():
    async def fetch(i):
        if i % 3 == 0:
            raise ValueError("corrupt")
        return torch.tensor([i])

    loader = AsyncLoader(range(9), batch_size=3, fetch=fetch, on_error="skip")
    assert flat(await collect(loader)) == [[1, 2], [4, 5], [7, 8]]
    assert loader.stats().skipped == 3

    # A batch whose samples all fail is left out and its slot goes back (a bound of one sample).
    loader = AsyncLoader(
        range(12), batch_size=1, concurrency=1, prefetch=0, fetch=fetch, on_error="skip"
    )
    assert flat(await collect(loader)) == [[1], [2], [4], [5], [7], [8], [10], [11]]
    assert loader.stats().skipped == 4 and loader.stats().batches == 8


async def test_iterable_error_ends_the_epoch_with_loader_error():
    def gen():
        yield torch.tensor([1])
        raise RuntimeError("stream broke")

    with pytest.raises(LoaderError, match="after 1 samples") as info:
        await collect(AsyncLoader(gen(), batch_size=1))
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_break_stops_in_flight_fetches_and_leaks_nothing():
    started = 0
    cancelled = 0

    async def fetch(i):
        nonlocal started, cancelled
        started += 1
        try:
            await asyncio.sleep(0 if i < 4 else 30)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return torch.tensor([i])

    before = asyncio.all_tasks()
    loader = AsyncLoader(range(1000), batch_size=4, concurrency=16, prefetch=1, fetch=fetch)
    async with contextlib.aclosing(aiter(loader)) as batches:
        async for _ in batches:
            assert any(t.get_name() == "asyncnn:loader-fetch" for t in asyncio.all_tasks())
            break
    assert started <= loader.buffer_bound + 4
    assert cancelled == started - 4
    assert asyncio.all_tasks() <= before  # no fetcher or producer task is left behind
    # A plain break also cleans up, once the abandoned generator is collected.
    async for _ in loader:
        break
    # Finalisation runs as a task of its own, with no event to wait on: give it its turns.
    with anyio.fail_after(5):
        while cancelled < started - 8 or any(  # noqa: ASYNC110
            t.name.startswith("asyncnn:") for t in threading.enumerate()
        ):
            await asyncio.sleep(0.001)


async def test_cancelling_the_consumer_stops_sync_fetch_threads():
    gate = threading.Event()

    class Slow(SyncDS):
        def __getitem__(self, i):
            gate.wait(0.05)
            return super().__getitem__(i)

    with anyio.move_on_after(0.02):
        async for _ in AsyncLoader(Slow(10_000), batch_size=8, concurrency=16):
            pass
    gate.set()
    # The autouse fixture checks that no asyncnn thread is left.


async def test_prefetch_is_bounded():
    started = 0

    class Counting(SyncDS):
        def __getitem__(self, i):
            nonlocal started
            started += 1  # counted when a fetch starts: in-flight fetches count as held
            return super().__getitem__(i)

    loader = AsyncLoader(
        Counting(500), batch_size=10, concurrency=8, prefetch=2, worker_kind="thread"
    )
    consumed = 0
    async for batch in loader:
        consumed += len(batch)
        assert started - consumed <= loader.buffer_bound  # measured from outside the loader
        await asyncio.sleep(0.001)  # a slow consumer: fetches run ahead only so far
    st = loader.stats()
    assert 0 < st.peak_buffered <= st.buffer_bound == max(8, 10) + 2 * 10


@pytest.mark.parametrize("ordered", [True, False])
async def test_fewer_fetches_than_a_batch_and_no_prefetch_still_fill_batches(ordered):
    async def fetch(i):
        await asyncio.sleep(0)
        return torch.tensor([float(i)])

    loader = AsyncLoader(
        range(10), batch_size=4, concurrency=1, prefetch=0, fetch=fetch, ordered=ordered
    )
    with anyio.fail_after(5):
        batches = flat(await collect(loader))
    assert sorted(x for b in batches for x in b) == list(range(10))
    assert [len(b) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize("prefetch", [0, 1, 3])
@pytest.mark.parametrize("source", ["map", "async-map", "iterable", "async-iterable"])
async def test_prefetch_batches_are_prepared_ahead_and_no_more(prefetch, source):
    collated = 0
    ahead = threading.Event()  # set on the collate thread once 1 + prefetch batches exist

    def collate(samples):
        nonlocal collated
        collated += 1
        if collated == 1 + prefetch:
            ahead.set()
        return torch.stack(samples)

    async def fetch(i):
        return torch.tensor([float(i)])

    async def agen():
        for i in range(100):
            yield torch.tensor([float(i)])

    src = {
        "map": {"source": SyncDS(100)},
        "async-map": {"source": range(100), "fetch": fetch},
        "iterable": {"source": [torch.tensor([float(i)]) for i in range(100)]},
        "async-iterable": {"source": agen()},
    }[source]
    loader = AsyncLoader(batch_size=5, prefetch=prefetch, collate=collate, **src)
    async with contextlib.aclosing(aiter(loader)) as batches:
        first = await anext(batches)
        assert first.flatten().tolist() == [0, 1, 2, 3, 4]
        assert await anyio.to_thread.run_sync(ahead.wait, 10)  # it ran ahead this far...
        await wait_all_tasks_blocked()  # ...and, with every task now waiting, no further
        assert collated == 1 + prefetch
        second = await anext(batches)
        assert second.flatten().tolist() == [5, 6, 7, 8, 9]


async def test_failing_collate_names_the_batch_and_chains_the_cause():
    def collate(samples):
        if float(samples[0]) >= 4:
            raise ValueError("ragged")
        return torch.stack(samples)

    loader = AsyncLoader(SyncDS(10), batch_size=4, collate=collate)
    got = []
    with pytest.raises(LoaderError, match=r"collating batch 1 \(4 samples\).*ragged") as info:
        async for b in loader:
            got.append(b)
    assert len(got) == 1 and isinstance(info.value.__cause__, ValueError)


async def test_a_loader_feeds_a_pipeline():
    loader = AsyncLoader(SyncDS(20), batch_size=5)
    model = torch.nn.Linear(1, 1)
    async with Pipeline([Stage(model)]) as pipe:
        outs = [y async for y in pipe.stream(loader)]
    assert len(outs) == 4 and outs[0].shape == (5, 1)


async def test_a_pipeline_inside_a_loader():
    async def decode(raw):
        await asyncio.sleep(0)
        return torch.tensor([float(raw) * 10])

    async with Pipeline([Stage(decode)]) as pipe:

        async def fetch(i):
            return await pipe.send(i)

        batches = await collect(AsyncLoader(range(6), batch_size=3, fetch=fetch))
    assert flat(batches) == [[0, 10, 20], [30, 40, 50]]


@pytest.mark.parametrize(
    ("kwargs", "err"),
    [
        ({"batch_size": 0}, ValueError),
        ({"concurrency": 0}, ValueError),
        ({"prefetch": -1}, ValueError),
        ({"on_error": "ignore"}, ValueError),
        ({"shuffle": True, "sampler": [0]}, ValueError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        AsyncLoader(SyncDS(), **kwargs)


def test_bad_sources():
    with pytest.raises(TypeError, match="cannot load from int"):
        AsyncLoader(42)
    with pytest.raises(ValueError, match="map-style"):
        AsyncLoader(iter([1, 2]), shuffle=True)
    with pytest.raises(TypeError, match="async def fetch"):
        AsyncLoader(range(3), fetch=lambda i: i)
    with pytest.raises(TypeError, match="no length"):
        len(AsyncLoader(iter([1])))
