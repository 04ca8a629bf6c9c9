"""A worker's batch through its pipe: small tensors inline, large ones in shared memory, every
dtype and layout arriving equal, and a value that does not pickle refused before anything is
sent."""

import multiprocessing
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from torch.utils.data._utils import worker as torch_worker

from asyncnn.loader.transport import INLINE_BYTES, receive, send, worker_collate


def round_trip(item):
    r, w = multiprocessing.Pipe(duplex=False)
    sent = []
    # The sender writes in a thread: a large inline buffer would fill the pipe otherwise.
    t = threading.Thread(target=lambda: sent.append(send(w, item)))
    t.start()
    try:
        got = receive(r)
    finally:
        t.join()
        r.close()
        w.close()
    assert sent == [True]
    return got


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12, dtype=torch.float32).reshape(3, 4),
        torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
        torch.tensor(7, dtype=torch.int64),  # 0-d
        torch.empty(0, 5),  # no bytes
        torch.tensor([True, False, True]),
        torch.arange(6, dtype=torch.bfloat16),
        torch.complex(torch.arange(4.0), torch.ones(4)).conj(),  # a lazily conjugated view
        torch.randint(0, 255, (2, 3, 8), dtype=torch.uint8),
    ],
)
def test_small_tensors_arrive_equal(tensor):
    got = round_trip({"t": tensor})["t"]
    assert got.dtype == tensor.dtype and got.shape == tensor.shape
    assert torch.equal(got, tensor.resolve_conj())


def test_large_tensors_go_through_shared_memory_and_nesting_is_kept():
    big = torch.randn(INLINE_BYTES // 4 + 1)  # one element past the inline limit
    item = (3, [{"big": big, "small": torch.ones(2)}, "text"], None)
    got = round_trip(item)
    assert got[0] == 3 and got[1][1] == "text" and got[2] is None
    assert torch.equal(got[1][0]["big"], big) and got[1][0]["big"].is_shared()
    assert torch.equal(got[1][0]["small"], torch.ones(2)) and not got[1][0]["small"].is_shared()


def test_a_value_that_does_not_pickle_sends_nothing():
    r, w = multiprocessing.Pipe(duplex=False)
    try:
        assert send(w, {"lock": threading.Lock()}) is False
        assert not r.poll(0)
    finally:
        r.close()
        w.close()


@pytest.fixture
def in_a_worker():
    """``get_worker_info()`` answers, as in a worker process (torch's collate then stacks
    every tensor into a new shared-memory segment)."""
    before = torch_worker._worker_info
    info = torch_worker.WorkerInfo(id=0, num_workers=2, seed=0, dataset=None)
    torch_worker._worker_info = info
    yield info
    torch_worker._worker_info = before


def test_a_worker_collates_a_batch_for_the_pipe_in_its_own_memory(in_a_worker):
    samples = [
        {"ids": torch.arange(64) + i, "y": torch.tensor(i), "np": np.full(3, i, np.float32)}
        for i in range(32)
    ]
    want = default_collate(samples)
    assert want["ids"].is_shared()  # torch's, inside a worker: a segment for 16 KiB
    got = worker_collate(default_collate)(samples)
    assert not any(got[k].is_shared() for k in ("ids", "y", "np"))
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert torch.utils.data.get_worker_info() is in_a_worker  # answered again after


def test_a_worker_collates_a_batch_too_large_for_the_pipe_into_shared_memory(in_a_worker):
    rows = [torch.randn(INLINE_BYTES // 4 // 2 + 1) for _ in range(2)]  # a row past half
    got = worker_collate(default_collate)(rows)
    assert got.is_shared() and torch.equal(got, torch.stack(rows))


def test_a_worker_refuses_sparse_samples_as_torch_does(in_a_worker):
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="Batches of sparse tensors are not currently supported"):
        worker_collate(default_collate)([sparse, sparse])


def test_a_users_collate_is_left_as_it_is():
    def mine(samples):
        return samples

    assert worker_collate(mine) is mine
