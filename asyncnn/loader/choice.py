"""``worker_kind="auto"``: whether worker processes should decode the rest of an epoch. Sync:
tests drive it directly.

Processes are chosen only where they are safe and pay: the first samples showed that fetching
computes (decoding holds the GIL, so threads cannot run it in parallel), or that it waits (on
I/O) but computes enough between waits that the fetch threads would keep the GIL busy (a sync
HTTP client's ~2 ms of Python a read: one process's threads top out at ~500 reads a second, and
each worker process then spreads its batches over threads of its own), and is costly enough
(an in-memory dataset is cheaper to index than to send between processes), the process may use
two cores or more, the epoch is long enough to pay for starting them, workers can be forked
(spawning one costs seconds), CUDA is not initialised here (a forked child could not use it),
and the dataset pickles — a dataset that does not holds a handle (an open file, an HDF5 or LMDB
handle, a connection) that forked processes must not share. Anything else keeps the threads.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import types
import weakref
from pathlib import PurePath
from typing import Any

import torch

from .config import LoaderConfig

__all__ = [
    "MIN_BATCHES_PER_CORE",
    "MIN_BATCH_SECONDS",
    "MIN_EPOCH_SECONDS",
    "MIN_WAITING_BATCHES_PER_CORE",
    "as_before_fetching",
    "attributes",
    "for_workers",
    "gil_bound",
    "pickles",
    "processes_unsuitable",
    "remember_fetching",
    "set_by_fetching",
]

MIN_BATCHES_PER_CORE = 4  # fewer batches left than this per core: starting workers does not pay
# ... for batches that wait on I/O (each ~0.1 s or more): the epoch's length decides instead
MIN_WAITING_BATCHES_PER_CORE = 1
# Cheaper batches cost less to fetch than to send between processes. Measured on the 2-core VM
# (batches of 32 samples of three small tensors, decoding that holds the GIL, three rounds):
# two worker processes against the fetch thread 1.18x at 0.25 ms a batch, 1.13x at 0.5, 1.30x
# at 1, 1.63x at 2 (a Hugging Face Arrow dataset's batch of 32 costs 1-2 ms).
MIN_BATCH_SECONDS = 0.0005
# The rest of the epoch must take this long on the fetch thread: starting and stopping two
# worker processes costs ~50 ms (the first batch 40 ms later than a thread's, on the 2-core VM),
# which the workers must win back.
MIN_EPOCH_SECONDS = 0.25


def gil_bound(computed: float, waited: float, threads: int) -> bool:
    """Would ``threads`` fetch threads keep one process's GIL busy, each fetch computing
    ``computed`` seconds (holding it) and waiting ``waited`` (on I/O)? Then more threads cannot
    go faster, and worker processes, each with threads of its own, can."""
    return threads * computed >= computed + waited


class _Discard:
    def write(self, data: Any) -> int:
        # bytes, or a ``pickle.PickleBuffer`` (protocol 5 writes large buffers as they are:
        # pyarrow's, so a Hugging Face dataset's), which has no len()
        return memoryview(data).nbytes


_ALWAYS = (str, bytes, int, float, bool, PurePath, torch.Tensor)  # pickle, and are common
# Code, not state: a forked worker inherits it whether or not it pickles (a lambda transform,
# a class defined in a function), and it holds no handle.
_CODE = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
)


class _ShapeOnly(pickle.Pickler):
    """Pickles everything but what always pickles (paths, strings, numbers, tensors, arrays)
    and code (classes, functions, modules: forked workers inherit them): a dataset's list of
    100,000 paths is checked in milliseconds, and a lambda among its transforms is no handle.
    What code holds is state, and is checked: a closure's cells and defaults, the object a
    method is bound to (``f.read`` holds the file ``f``)."""

    def __init__(self, seen: set[int] | None = None) -> None:
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        self.seen = set() if seen is None else seen

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _ALWAYS) or type(obj).__name__ == "ndarray":
            return 0
        if isinstance(obj, _CODE):
            if id(obj) not in self.seen:
                self.seen.add(id(obj))
                _ShapeOnly(self.seen).dump(_held_by(obj))
            return 0
        return None


def _held_by(code: Any) -> list[Any]:
    """What a piece of code keeps alive besides code: its closure's cells, its defaults, the
    object it is bound to."""
    held: list[Any] = []
    if isinstance(code, types.FunctionType):
        for cell in code.__closure__ or ():
            try:
                held.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        held += [code.__defaults__, code.__kwdefaults__]
    bound = getattr(code, "__self__", None)
    if isinstance(code, types.MethodType | types.BuiltinFunctionType) and not isinstance(
        bound, types.ModuleType
    ):
        held.append(bound)
    return held


def pickles(obj: Any) -> bool:
    """Does ``obj`` pickle? Nothing is kept: the bytes are discarded as they are written."""
    try:
        _ShapeOnly().dump(obj)
    except Exception:
        return False
    return True


_UNSET = object()  # an attribute the dataset did not have before it fetched


def attributes(obj: Any) -> dict[str, Any] | None:
    """``obj``'s instance attributes as they are now (None where it keeps none)."""
    try:
        return dict(vars(obj))
    except TypeError:
        return None


def set_by_fetching(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The attributes a dataset set or rebound while it fetched (a handle it opens lazily, a
    cache, a count), each with its value before: ``_UNSET`` if it had none."""
    return {k: before.get(k, _UNSET) for k, v in after.items() if before.get(k, _UNSET) is not v}


def as_before_fetching(source: Any, initial: dict[str, Any]) -> Any:
    """A shallow copy of ``source`` with the attributes in ``initial`` as they were before it
    first fetched: what a DataLoader's worker gets (its parent never fetches). None where it
    cannot be made."""
    try:
        clean = copy.copy(source)
        state = vars(clean)
        for k, v in initial.items():
            if v is _UNSET:
                state.pop(k, None)
            else:
                state[k] = v
    except Exception:
        return None
    return clean


def processes_unsuitable(
    cfg: LoaderConfig,
    batches: int,
    cores: int,
    per_batch: float,
    source: Any = None,
    *,
    per_core: int = MIN_BATCHES_PER_CORE,
) -> str | None:
    """Why worker processes should not take over an epoch of ``batches`` batches whose first
    samples computed, ``per_batch`` seconds a batch at that rate; None when they should.
    ``source``: the dataset the workers would get, when not ``cfg.source``. ``per_core``: the
    fewest batches left per core that pay for starting workers (``MIN_WAITING_BATCHES_PER_CORE``
    for batches that wait on I/O: the epoch's length below is what decides)."""
    if per_batch < MIN_BATCH_SECONDS:
        return (
            f"a batch takes {per_batch * 1e3:.2f} ms to fetch, too little to pay for sending "
            "it between processes"
        )
    if cores < 2:
        return "this process may use one core"
    if batches - 1 < per_core * cores:
        return f"the epoch has {batches} batches, too few to pay for starting workers"
    if (batches - 1) * per_batch < MIN_EPOCH_SECONDS:
        return (
            f"the rest of the epoch takes {(batches - 1) * per_batch:.2f} s on a thread, too "
            "little to pay for starting workers"
        )
    if cfg.multiprocessing_context not in (None, "fork") or (
        "fork" not in multiprocessing.get_all_start_methods()
    ):
        return "workers cannot be forked here"
    if torch.cuda.is_initialized():
        return "CUDA is initialised in this process, and a forked worker could not use it"
    if not pickles(cfg.source if source is None else source):
        return "the dataset does not pickle (it holds a handle forked workers must not share)"
    return None


# Per dataset, the attributes its fetches set, with their values before the first: kept across
# epochs (a later epoch's dataset already holds what the first probe opened).
_BEFORE_FETCHING: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def remember_fetching(source: Any, initial: dict[str, Any]) -> None:
    """Keep what ``source``'s fetches set, with the values before the first (``initial``,
    from ``set_by_fetching``), for ``for_workers``."""
    try:
        known = _BEFORE_FETCHING.setdefault(source, {})
    except TypeError:  # not hashable, or no weak reference to it
        return
    for k, v in initial.items():
        known.setdefault(k, v)


def for_workers(source: Any) -> Any:
    """The dataset worker processes get: as it was before this process fetched from it (a
    DataLoader's workers get it so: its parent never fetches), where it can be copied so."""
    try:
        initial = _BEFORE_FETCHING.get(source)
    except TypeError:
        initial = None
    if not initial:
        return source
    clean = as_before_fetching(source, initial)
    return source if clean is None else clean
