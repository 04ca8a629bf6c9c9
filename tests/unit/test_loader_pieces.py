"""The loader's sync pieces: the batch plan and the reassembly of out-of-order samples."""

import itertools

import pytest
import torch

from asyncnn.loader.choice import as_before_fetching, attributes, pickles, set_by_fetching
from asyncnn.loader.plan import batch_count, batch_plan, epoch_indices, rows, source_kind
from asyncnn.loader.probe import waits
from asyncnn.loader.reorder import Reassembler


def test_batch_plan_cuts_and_drops_the_short_last_batch_only_when_asked():
    assert batch_plan(list(range(7)), 3, False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batch_plan(list(range(7)), 3, True) == [[0, 1, 2], [3, 4, 5]]
    assert batch_plan([], 3, True) == []
    for n in range(9):
        for drop in (False, True):
            assert len(batch_plan(list(range(n)), 3, drop)) == batch_count(n, 3, drop)


def test_a_batch_is_spread_over_threads_only_when_it_waits_long_enough_to_pay():
    # (CPU seconds, seconds waited) for 8 samples; batches of 64
    assert waits(0.0001, 0.160, 8, 64)  # 20 ms HTTP reads
    assert not waits(0.0032, 0.0008, 8, 64)  # torch.load: computing
    # An in-memory dataset: 8 samples in 50 us, mostly "waiting" for the clocks and the GIL.
    # Spread over 32 threads, each batch was two samples per hand-off: 0.2x a plain loop.
    assert not waits(0.00001, 0.00004, 8, 64)
    assert waits(0.00001, 0.00026, 8, 64)  # a slow disk: 0.26 ms a batch of 8, 2 ms of 64


def test_epoch_indices_follow_the_sampler_or_a_seeded_shuffle():
    assert epoch_indices(4, [3, 1], False, None) == [3, 1]
    assert epoch_indices(4, None, False, None) == [0, 1, 2, 3]
    a = epoch_indices(50, None, True, torch.Generator().manual_seed(0))
    b = epoch_indices(50, None, True, torch.Generator().manual_seed(0))
    assert a == b and sorted(a) == list(range(50)) and a != list(range(50))


def test_source_kinds():
    class Async:
        def __len__(self):
            return 1

        async def __getitem__(self, i):
            return i

    assert source_kind([1, 2], None) == "map"
    assert source_kind(Async(), None) == "async-map"
    assert source_kind(iter([1]), None) == "iterable"
    assert source_kind(torch.utils.data.DataLoader([1, 2]), None) == "dataloader"
    with pytest.raises(TypeError, match="cannot load from int"):
        source_kind(3, None)


def test_rows_of_a_dataloader_batch():
    assert rows(torch.zeros(5, 2)) == 5
    assert rows({"x": torch.zeros(3, 1), "y": [1, 2, 3]}) == 3
    assert rows([1, 2, 3, 4]) == 4


@pytest.mark.parametrize("ordered", [True, False])
def test_every_arrival_order_gives_back_every_sample_in_planned_batch_sizes(ordered):
    plan = [[10, 11], [12, 13], [14]]
    slots = [(b, pos) for b, idxs in enumerate(plan) for pos in range(len(idxs))]
    for order in itertools.permutations(slots):
        parts = Reassembler(plan, ordered, batch_size=2)
        taken, k = [], 0
        for b, pos in order:
            parts.put(b, pos, plan[b][pos])
            while k < len(plan) and parts.ready(k):
                taken.append(parts.take(k))
                k += 1
        assert [len(t) for t in taken] == [2, 2, 1]
        if ordered:
            assert taken == plan  # in sampler order whatever order fetches finished in
        else:
            assert sorted(x for t in taken for x in t) == [10, 11, 12, 13, 14]
            arrived = [plan[b][p] for b, p in order]
            assert [x for t in taken for x in t] == arrived  # as they came


class Lazy:
    def __init__(self):
        self.paths = ["a", "b"]
        self.handle = None

    def __getitem__(self, i):
        if self.handle is None:
            self.handle = open(__file__)  # a handle held, as HDF5's would be
        self.cache = i
        return self.paths[i]


def test_the_dataset_workers_get_is_as_it_was_before_it_fetched():
    ds = Lazy()
    before = attributes(ds)
    ds[0]
    try:
        initial = set_by_fetching(before, attributes(ds))
        assert set(initial) == {"handle", "cache"} and initial["handle"] is None
        assert not pickles(ds)
        clean = as_before_fetching(ds, initial)
        assert clean.handle is None and not hasattr(clean, "cache") and pickles(clean)
        assert clean.paths is ds.paths and ds.handle is not None  # the original is untouched
        assert attributes(3) is None and as_before_fetching(3, {"x": 1}) is None
    finally:
        ds.handle.close()
