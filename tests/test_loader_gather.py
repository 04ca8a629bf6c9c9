"""TensorDataset (and Subsets of one): a batch gathered in one indexing per tensor, equal to what
DataLoader makes of the same samples; anything else still goes through ``__getitem__``."""

import contextlib
import dataclasses
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate, random_split

from asyncnn import AsyncLoader, LoaderError
from asyncnn.loader import gather as loader_gather
from asyncnn.loader.gather import gatherer


def dataset(n=50, width=3):
    torch.manual_seed(0)
    return TensorDataset(torch.randn(n, width), torch.arange(n), torch.randn(n, 2, 2).double())


async def gathered(loader):
    return [b async for b in loader]


def assert_same_batches(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert type(a) is type(b) is list
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
            assert torch.equal(x, y)


@pytest.mark.parametrize("width", [3, 4096])  # gathered on the loop, and on a thread
@pytest.mark.parametrize("drop_last", [False, True])
async def test_batches_equal_dataloaders(width, drop_last):
    ds = dataset(width=width)
    want = list(DataLoader(ds, batch_size=8, drop_last=drop_last))
    got = await gathered(AsyncLoader(ds, batch_size=8, drop_last=drop_last))
    assert_same_batches(got, want)


async def test_shuffled_batches_hold_what_their_samples_collate_to():
    ds = dataset()
    got = await gathered(AsyncLoader(ds, batch_size=8, shuffle=True))
    order = [i for b in got for i in b[1].tolist()]
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert_same_batches(got, [default_collate([ds[i] for i in b[1].tolist()]) for b in got])


async def test_subsets_from_random_split_are_gathered_through_their_indices(monkeypatch):
    ds = dataset(60)
    train, _ = random_split(ds, [40, 20], generator=torch.Generator().manual_seed(1))
    nested = Subset(train, list(range(39, -1, -2)))
    for source in (train, nested):
        want = list(DataLoader(source, batch_size=6))
        got = await gathered(AsyncLoader(source, batch_size=6))
        assert_same_batches(got, want)
    # and no sample was indexed on its own
    monkeypatch.setattr(TensorDataset, "__getitem__", _must_not_index)
    assert len(await gathered(AsyncLoader(nested, batch_size=6))) == 4


def _must_not_index(self, i):
    raise AssertionError("indexed one sample at a time")


class Doubling(TensorDataset):
    def __getitem__(self, i):
        return tuple(2 * t[i] for t in self.tensors)


class Labelled(TensorDataset):
    """Only adds: indexes as a TensorDataset does."""

    label = "mine"


async def test_a_subclass_with_its_own_getitem_is_indexed_by_it():
    ds = Doubling(torch.arange(10.0))
    assert gatherer(ds, default_collate) is None
    got = await gathered(AsyncLoader(ds, batch_size=4))
    assert [b[0].tolist() for b in got] == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]
    assert gatherer(Labelled(torch.arange(10.0)), default_collate) is not None
    assert gatherer(TensorDataset(torch.eye(4).to_sparse()), default_collate) is None


async def test_a_collate_of_ones_own_gets_the_samples():
    ds = dataset(12)
    seen = []

    def collate(samples):
        seen.append(len(samples))
        return default_collate(samples)

    assert gatherer(ds, collate) is None
    got = await gathered(AsyncLoader(ds, batch_size=5, collate=collate))
    assert seen == [5, 5, 2]
    assert_same_batches(got, list(DataLoader(ds, batch_size=5)))


class Sampler:
    def __init__(self, idxs):
        self.idxs = idxs

    def __iter__(self):
        return iter(self.idxs)

    def __len__(self):
        return len(self.idxs)


@pytest.mark.parametrize("width", [3, 4096])
async def test_an_index_out_of_range_is_named_and_skippable(width):
    ds = dataset(10, width)
    with pytest.raises(LoaderError, match="sample 99") as err:
        await gathered(AsyncLoader(ds, batch_size=4, sampler=Sampler([0, 1, 99, 3, 4])))
    assert err.value.index == 99
    loader = AsyncLoader(ds, batch_size=4, sampler=Sampler([0, 1, 99, 3, 4]), on_error="skip")
    got = await gathered(loader)
    assert [b[1].tolist() for b in got] == [[0, 1, 3], [4]]
    assert loader.stats().skipped == 1


async def test_indices_that_are_not_plain_integers_are_taken_as_the_dataset_takes_them():
    ds = dataset(10)
    idxs = [np.int32(2), np.int32(5), np.int32(7)]  # not int64: indexed one by one, as given
    got = await gathered(AsyncLoader(ds, batch_size=3, sampler=Sampler(idxs)))
    want = default_collate([ds[i] for i in idxs])
    assert_same_batches(got, [want])


def test_the_batch_size_decides_loop_or_thread():
    small, wide = (
        gatherer(dataset(width=3), default_collate),
        gatherer(dataset(width=4096), default_collate),
    )
    assert small is not None and wide is not None
    assert small.row_bytes == 3 * 4 + 8 + 4 * 8
    loader = AsyncLoader(dataset(), batch_size=64)
    assert loader_gather.on_loop(loader._config(), small)
    assert not loader_gather.on_loop(loader._config(), wide)
    pinned = dataclasses.replace(loader._config(), pin_memory=True)  # the collate thread's work
    assert not loader_gather.on_loop(pinned, small)


@pytest.mark.parametrize("width", [3, 4096])
async def test_leaving_an_epoch_early_then_running_another(width):
    ds = dataset(40, width)
    loader = AsyncLoader(ds, batch_size=8)
    async with contextlib.aclosing(aiter(loader)) as batches:
        async for b in batches:
            assert torch.equal(b[1], torch.arange(8))
            break
    assert_same_batches(await gathered(loader), list(DataLoader(ds, batch_size=8)))
    assert loader.stats().epochs == 2


async def test_small_batches_start_no_fetch_thread():
    names = set()
    async for _ in AsyncLoader(dataset(40), batch_size=8):
        names |= {t.name for t in threading.enumerate()}
    assert not any(n.startswith("asyncnn:loader:fetch") for n in names)


@pytest.mark.parametrize("width", [4, 8192])  # on the loop, on the thread
async def test_a_channels_last_tensor_batches_contiguous_as_stack_makes_it(width):
    images = torch.randn(20, 3, width // 4, 4).contiguous(memory_format=torch.channels_last)
    ds = TensorDataset(images, torch.arange(20))
    got = await gathered(AsyncLoader(ds, batch_size=8))
    assert_same_batches(got, list(DataLoader(ds, batch_size=8)))
    assert all(b[0].is_contiguous() for b in got)
