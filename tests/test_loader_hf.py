"""A Hugging Face ``datasets`` Arrow dataset through AsyncLoader, as a user has one: saved to disk,
loaded back with the torch format, dict samples read through its ``__getitems__``; the batches
equal a DataLoader's on a thread, in worker processes, and with the default choice."""

import multiprocessing

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from asyncnn import AsyncLoader


def arrow_dataset(folder, n=300):
    rows = {
        "input_ids": [[(i + j) % 97 for j in range(16)] for i in range(n)],
        "attention_mask": [[1] * (4 + i % 12) + [0] * (12 - i % 12) for i in range(n)],
        "label": [i % 3 for i in range(n)],
        "score": [i / 7 for i in range(n)],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder)).with_format("torch")


@pytest.mark.parametrize("kind", ["thread", "process", "auto"])
async def test_an_arrow_dataset_gives_a_dataloaders_batches(tmp_path, kind):
    if kind == "process" and "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("worker processes are forked here")
    ds = arrow_dataset(tmp_path / "ds")
    assert hasattr(ds, "__getitems__")  # what makes a batch one read
    want = list(DataLoader(ds, batch_size=32))
    loader = AsyncLoader(ds, batch_size=32, worker_kind=kind)
    got = [b async for b in loader]
    assert len(got) == len(want) == 10
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key
    assert loader.stats().samples == 300
