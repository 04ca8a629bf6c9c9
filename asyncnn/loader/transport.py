"""How a worker process's batch crosses to its parent: small tensors through the pipe, large
ones through shared memory.

A tensor sent through torch's shared-memory reductions costs a fixed ~1 ms or more (a segment
created, its file descriptor passed over a socket with an authentication handshake, mapped),
which for a batch of 64 small samples is more than the batch's own bytes cost to copy through
the pipe (~0.2 ms for 128 KiB on the 2-core VM; see ``BENCHMARKS.md``). So a tensor of up to
``INLINE_BYTES`` travels as a raw out-of-band buffer (pickle protocol 5: the bytes are written
to the pipe straight from the tensor, read straight into the new tensor's memory), and a larger
one through shared memory, where the fixed cost is small against its size.

One message: a header (the buffers' sizes, then the pickle stream), followed by one message per
buffer. Only the parent reads what its own forked worker wrote to a pipe they alone hold.

The same line decides where a worker's ``default_collate`` stacks a batch (``worker_collate``):
inside a worker torch's collates every tensor into a new shared-memory segment, ~0.26 ms a
tensor on the 2-core VM, which for a batch the pipe carries anyway is pure loss (a Hugging Face
dataset's batch of three small tensors: fetch and collate 3.0 ms in a worker instead of 2.1).
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import struct
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing  # registers torch's reductions, read below
from torch.utils.data import default_collate
from torch.utils.data._utils import collate as torch_collate
from torch.utils.data._utils import worker as torch_worker

__all__ = ["INLINE_BYTES", "receive", "send", "worker_collate"]

INLINE_BYTES = 256 * 1024  # tensors up to this size are copied through the pipe

# The reductions torch registers for multiprocessing (tensors and storages to shared memory).
_REDUCERS = {**copyreg.dispatch_table, **ForkingPickler._extra_reducers}  # type: ignore[attr-defined]


def _inline(obj: Any) -> bool:
    return (
        type(obj) is torch.Tensor
        and obj.layout == torch.strided
        and obj.device.type == "cpu"
        and not obj.requires_grad
        and not obj.is_quantized
        and obj.nbytes <= INLINE_BYTES
    )


def _stack(batch: list[torch.Tensor], *, collate_fn_map: Any = None) -> torch.Tensor:
    """torch's collating of tensors, into shared memory only when the batch is too large for
    the pipe (torch's own test for a worker, ``get_worker_info()``, hidden from it otherwise)."""
    if sum(t.numel() * t.element_size() for t in batch) > INLINE_BYTES:  # (sparse: no nbytes)
        return torch_collate.collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    info, torch_worker._worker_info = torch_worker._worker_info, None
    try:
        return torch_collate.collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    finally:
        torch_worker._worker_info = info


def worker_collate(collate: Any) -> Any:
    """What a worker process collates with: ``default_collate`` made to stack small batches in
    the worker's own memory (``_stack``); any other collate as it is."""
    table = getattr(torch_collate, "default_collate_fn_map", None)
    if collate is not default_collate or not isinstance(table, dict):
        return collate
    return functools.partial(torch_collate.collate, collate_fn_map={**table, torch.Tensor: _stack})


class _Writer(pickle.Pickler):
    def __init__(self, file: io.BytesIO, buffers: list[pickle.PickleBuffer]) -> None:
        super().__init__(file, 5, buffer_callback=buffers.append)
        self.dispatch_table = _REDUCERS

    def persistent_id(self, obj: Any) -> Any:
        if not _inline(obj):
            return None
        flat = obj.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        return (obj.dtype, tuple(obj.shape), pickle.PickleBuffer(flat.numpy()))


class _Reader(pickle.Unpickler):  # unpickles: from our own worker, on our pipe
    def persistent_load(self, pid: Any) -> Any:
        dtype, shape, buf = pid
        if not len(buf):
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


def send(conn: Connection, item: Any) -> bool:
    """Pickle ``item`` here and send it; False (nothing sent) when it does not pickle."""
    stream = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    try:
        _Writer(stream, buffers).dump(item)
    except Exception:
        return False
    raws = [b.raw() for b in buffers]
    conn.send_bytes(struct.pack(f"<I{len(raws)}Q", len(raws), *(r.nbytes for r in raws)))
    conn.send_bytes(stream.getbuffer())
    for r in raws:
        conn.send_bytes(r)
    return True


def receive(conn: Connection) -> Any:
    """What ``send`` sent, its tensors' buffers read straight into their new memory."""
    head = conn.recv_bytes()
    (n,) = struct.unpack_from("<I", head)
    sizes = struct.unpack_from(f"<{n}Q", head, 4)
    stream = conn.recv_bytes()
    buffers = []
    for size in sizes:
        buf = bytearray(size)
        if size:
            conn.recv_bytes_into(buf)
        else:
            conn.recv_bytes()
        buffers.append(buf)
    return _Reader(
        io.BytesIO(stream), buffers=buffers
    ).load()  # unpickles: from our own worker, on our pipe
