"""A worker's batch through its pipe: small tensors inline, large ones in shared memory, every
dtype and layout arriving equal, and a value that does not pickle refused before anything is
sent."""

import multiprocessing
import threading

import pytest
import torch

from asyncnn.loader.transport import INLINE_BYTES, receive, send


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
