"""A ``TensorDataset``'s batches without its samples: one indexing per tensor, ``t[indices]``,
which is what ``default_collate`` makes of the samples, and where to do it (on the loop when
the batch is small, else on the decoding thread). Sync: tests drive it directly."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Subset, TensorDataset, default_collate

from .config import LoaderConfig

__all__ = ["ON_LOOP_BYTES", "Gather", "gather_for", "gatherer", "on_loop"]

ON_LOOP_BYTES = 128 * 1024  # a TensorDataset batch this small is gathered on the loop: ~40 us
# at the most (a random gather of 256 KiB took 80 us on the 2-core VM), less than handing it to
# a thread and back costs the loop (~90 us of its CPU, ~230 us of a batch's time)


class Gather:
    """A ``TensorDataset``'s batch (through any ``Subset``s of it) in one indexing per tensor:
    ``t[indices]``, which is what ``default_collate`` makes of its samples (a list of
    ``torch.stack``-ed tensors), without indexing each sample and stacking them (64 samples of
    32 floats: ~15 us instead of ~500). Indices that are not plain integers raise ``TypeError``
    (the caller then fetches them one by one, as the dataset would)."""

    __slots__ = ("maps", "row_bytes", "tensors")

    def __init__(self, tensors: tuple[torch.Tensor, ...], maps: list[torch.Tensor]) -> None:
        self.tensors, self.maps = tensors, maps
        self.row_bytes = sum(t[0].numel() * t.element_size() for t in tensors if len(t))

    def __call__(self, idxs: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(idxs)
        if index.dtype != torch.long or index.dim() != 1:
            raise TypeError("not plain integer indices")  # taken one by one, as given
        for m in self.maps:
            index = m[index]
        # contiguous, as torch.stack makes it (a channels-last tensor's rows keep its layout)
        return [t[index].contiguous() for t in self.tensors]

    @property
    def in_memory(self) -> bool:
        """Every tensor is in host memory (indexing a device's is a launch, not a copy)."""
        return all(t.device.type == "cpu" for t in self.tensors)


def gatherer(source: Any, collate: Any) -> Gather | None:
    """A :class:`Gather` for a ``TensorDataset`` (or a ``Subset`` of one, as ``random_split``
    makes) collated by torch's ``default_collate``; None for any other source or collate, or
    a subclass with its own ``__getitem__``."""
    if collate is not default_collate:
        return None
    subsets: list[Any] = []  # the Subsets' index lists, outermost first
    while _is(source, Subset):
        subsets.append(source.indices)
        source = source.dataset
    if not _is(source, TensorDataset) or any(t.layout != torch.strided for t in source.tensors):
        return None  # (sparse tensors: default_collate refuses them anyway)
    try:
        maps = [torch.as_tensor(m) for m in subsets]
    except (TypeError, ValueError, RuntimeError):
        return None
    if any(m.dtype != torch.long or m.dim() != 1 for m in maps):
        return None  # not plain integer indices: as the Subset takes them, one by one
    return Gather(tuple(source.tensors), maps)


def _is(source: Any, cls: type) -> bool:
    """``source`` indexes as ``cls`` does (its class may be a subclass that only adds)."""
    kind = type(source)
    return isinstance(source, cls) and all(
        getattr(kind, name, None) is getattr(cls, name, None)
        for name in ("__getitem__", "__getitems__")
    )


def on_loop(cfg: LoaderConfig, gather: Gather) -> bool:
    """Is each batch cheaper to gather on the loop than to hand to a thread? Small batches
    of host tensors, neither pinned nor copied to a device (both are the collate thread's)."""
    small = gather.row_bytes * cfg.batch_size <= ON_LOOP_BYTES
    return small and gather.in_memory and not cfg.pin_memory and cfg.device is None


def gather_for(cfg: LoaderConfig) -> tuple[Gather | None, bool]:
    """A sync map-style source's :class:`Gather` (None unless it is a ``TensorDataset`` read
    on threads), and whether its batches are gathered on the loop (then no fetch thread is
    needed)."""
    gather = None if cfg.kind != "map" or cfg.processes else gatherer(cfg.source, cfg.collate)
    return gather, gather is not None and on_loop(cfg, gather)
