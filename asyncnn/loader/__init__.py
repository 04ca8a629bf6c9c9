"""Async data loading: fetch samples concurrently, collate them into batches, feed pipelines.

``AsyncLoader`` replaces a ``torch.utils.data.DataLoader``'s worker processes with concurrency on
one event loop: ``async`` fetches (network, object storage, databases) run on the loop, up to
``concurrency`` at once; a sync ``__getitem__`` runs on a small set of dedicated threads.
Collation, pinning and the early host-to-device copy run on a thread (the one that read the
batch, where one did, else a collate thread), never on the loop.
Batches are prepared ahead of the consumer by a producer task, ``prefetch`` of them and no more.
Memory is bounded: at most ``max(concurrency, batch_size) + prefetch * batch_size`` samples are
fetched (or being fetched) and not yet handed to the consumer.

The package: ``plan`` (source kinds, indices, batches; sync), ``reorder`` (samples back into
batches; sync), ``flow`` (slots and chunked reads), ``epoch`` (one pass: producer and consumer),
and this facade.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Literal

import torch

from ..devices import parse_device
from ..errors import check_whole
from .config import LoaderConfig, LoaderStats, loader_counters
from .epoch import Epoch
from .plan import source_kind

__all__ = ["AsyncLoader", "LoaderStats"]


class AsyncLoader:
    """Load samples concurrently and yield collated batches.

    Args:
        source: a map-style dataset (``__len__`` + ``__getitem__``, sync or ``async def``), a sync
            iterable of samples, an async iterable of samples, or a ``torch.utils.data.DataLoader``
            (its batches are passed through).
        batch_size: samples per batch (>= 1).
        concurrency: the most fetches in flight at once (map-style sources).
        prefetch: batches kept ready ahead of the consumer, and no more.
        shuffle: a new random order each epoch (map-style); seeded by ``generator``.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        collate: builds a batch from a list of samples (default: torch's ``default_collate``).
        pin_memory: collate into pinned (page-locked) host memory, for fast copies to a GPU.
        device: copy each batch to this device (e.g. ``"cuda:0"``) on a copy stream as soon as it
            is ready, ahead of the consumer.
        ordered: yield batches in sampler order (default) although fetches finish out of order;
            ``False`` yields batches as they fill, for the highest throughput.
        sampler: an iterable of indices (map-style) used instead of ``range`` or ``shuffle``.
        generator: a ``torch.Generator`` for ``shuffle`` (as in ``DataLoader``).
        fetch: ``async def fetch(index)`` used instead of ``source[index]``.
        on_error: ``"raise"`` (default: a ``LoaderError`` naming the index, cause chained) or
            ``"skip"`` (leave the sample out and count it in ``stats().skipped``; map-style).
        workers: fetch workers for a sync ``__getitem__``: threads or processes (below). Each
            fetches and collates a whole batch per call (through the dataset's
            ``__getitems__`` when it has one). Default ``None``: threads start as one while
            the first samples are measured, and up to ``min(concurrency, 32)`` fetch batches at
            once if fetching mostly waited (I/O: network, slow disks); processes: one per core.
        worker_kind: where a sync ``__getitem__`` runs. ``"process"``: in worker processes, as
            in a ``DataLoader`` with ``num_workers``, for decoding that computes in Python
            (``np.load``, ``torch.load``, image decoding): each process has its own GIL.
            Batch ``k`` goes to worker ``k % workers`` (seeded per worker, so augmentations
            repeat); tensors come back through shared memory; ``get_worker_info()`` works in
            the dataset; every worker is stopped when the epoch ends, however it ends. The
            batches must pickle, and the dataset and ``worker_init_fn`` too unless workers
            are forked. ``"thread"``: fetch threads only. ``"auto"`` (default): threads, and
            if the first samples computed rather than waited, forked worker processes for the
            rest of the epoch; if they waited but computed enough between waits that the fetch
            threads would keep the GIL busy (a sync HTTP client), worker processes that each
            spread their batches over threads of their own — only where that is safe and pays
            (see ``loader/choice.py``: two cores or more, a long enough epoch, CUDA not
            initialised, a dataset that pickles, so holds no open file or connection).
            ``stats().process_epochs`` counts the epochs that used them.
        threads: the same as ``workers`` with ``worker_kind="thread"`` (kept for older code).
        multiprocessing_context: the start method of worker processes (``"fork"``,
            ``"spawn"``, ``"forkserver"``); default: Python's, as in a ``DataLoader``.
        worker_init_fn: called with the worker's number in each worker process, first.

    Leaving an ``async for`` early cancels the fetches in flight once the abandoned epoch is
    closed; ``async with contextlib.aclosing(aiter(loader)) as batches:`` closes it at once.

    Example::

        loader = AsyncLoader(dataset, batch_size=64, concurrency=64, shuffle=True)
        async for batch in loader:
            ...
        async for y in pipe.stream(loader):   # a loader feeds a pipeline
            ...
    """

    def __init__(
        self,
        source: Any,
        batch_size: int = 64,
        concurrency: int = 64,
        prefetch: int = 2,
        shuffle: bool = False,
        drop_last: bool = False,
        collate: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        ordered: bool = True,
        *,
        sampler: Iterable[int] | None = None,
        generator: torch.Generator | None = None,
        fetch: Callable[[int], Any] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        threads: int | None = None,
        workers: int | None = None,
        worker_kind: Literal["auto", "thread", "process"] = "auto",
        multiprocessing_context: str | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        check_whole(batch_size, "AsyncLoader: batch_size")
        check_whole(concurrency, "AsyncLoader: concurrency")
        check_whole(prefetch, "AsyncLoader: prefetch", 0)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"AsyncLoader: on_error={on_error!r}: use 'raise' or 'skip'")
        kind = _checked_source(source, fetch, shuffle, sampler)
        if pin_memory and not torch.cuda.is_available():
            warnings.warn(
                "AsyncLoader(pin_memory=True): no accelerator here, so batches stay in pageable "
                "memory; drop pin_memory on CPU-only machines",
                RuntimeWarning,
                stacklevel=2,
            )
            pin_memory = False
        self.source = source
        self.kind = kind
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.collate = collate if collate is not None else torch.utils.data.default_collate
        self.pin_memory = pin_memory
        self.device = _checked_device(device)
        self.ordered = ordered
        self.sampler = sampler
        self.generator = generator
        self.fetch = fetch
        self.on_error = on_error
        self.workers = _resolve_workers(kind, workers, threads, worker_kind)
        # threads=N is workers=N of the thread kind: auto must not hand the epoch to processes
        self.worker_kind = "thread" if threads is not None else worker_kind
        _check_processes(multiprocessing_context, worker_init_fn, self.worker_kind)
        self.multiprocessing_context = multiprocessing_context
        self.worker_init_fn = worker_init_fn
        self._counters = loader_counters()

    def _config(self) -> LoaderConfig:
        """The settings as they are now: one epoch runs on one snapshot of them."""
        return LoaderConfig(**{f: getattr(self, f) for f in LoaderConfig.__dataclass_fields__})

    @property
    def buffer_bound(self) -> int:
        """The most samples fetched (or being fetched) and not yet handed to the consumer."""
        return self._config().buffer_bound

    def __len__(self) -> int:
        """Batches per epoch, where the source has a length."""
        cfg = self._config()
        if cfg.kind == "dataloader":
            return len(cfg.source)
        n: int
        if cfg.sampler is not None and hasattr(cfg.sampler, "__len__"):
            n = len(cfg.sampler)  # type: ignore[arg-type]
        elif hasattr(cfg.source, "__len__"):
            n = len(cfg.source)
        else:
            raise TypeError(f"AsyncLoader: this {cfg.kind} source has no length")
        return n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)

    def stats(self) -> LoaderStats:
        return LoaderStats(buffer_bound=self.buffer_bound, **self._counters)

    def __repr__(self) -> str:
        return (
            f"<AsyncLoader {self.kind} batch_size={self.batch_size} "
            f"concurrency={self.concurrency} prefetch={self.prefetch}>"
        )

    @property
    def threads(self) -> int | None:
        """Fetch threads (``workers`` of the thread kind)."""
        return self.workers if self.worker_kind == "thread" else None

    def __aiter__(self) -> AsyncIterator[Any]:
        """One epoch; each ``async for`` starts a new one (reshuffled when ``shuffle``)."""
        self._counters["epochs"] += 1
        return Epoch(self._config(), self._counters).batches()


def _resolve_workers(
    kind: str, workers: int | None, threads: int | None, worker_kind: str
) -> int | None:
    """``workers``, checked against the source and the other settings."""
    if worker_kind not in ("auto", "thread", "process"):
        raise ValueError(
            f"AsyncLoader: worker_kind={worker_kind!r}: use 'auto', 'thread' or 'process'"
        )
    if threads is not None:
        if workers is not None or worker_kind == "process":
            raise ValueError(
                "AsyncLoader: threads= is workers= for worker_kind='thread'; pass workers= only"
            )
        check_whole(threads, "AsyncLoader: threads")
        workers = threads
    if workers is not None:
        check_whole(workers, "AsyncLoader: workers")
    if worker_kind == "process" and kind != "map":
        raise ValueError(
            f"AsyncLoader(worker_kind='process') decodes a sync map-style dataset (__len__ + a "
            f"sync __getitem__) in worker processes; this source is {kind}: use the default "
            "worker_kind='thread' (async sources run on the loop, iterables on a reader thread)"
        )
    return workers


def _checked_source(
    source: Any, fetch: Callable[[int], Any] | None, shuffle: bool, sampler: Any
) -> str:
    """The source's kind, once ``fetch``, ``shuffle`` and ``sampler`` are known to fit it."""
    if fetch is not None and not inspect.iscoroutinefunction(fetch):
        raise TypeError("AsyncLoader: fetch must be an `async def fetch(index)`")
    kind = source_kind(source, fetch)
    if (shuffle or sampler is not None) and kind not in ("map", "async-map"):
        raise ValueError(
            f"AsyncLoader: shuffle/sampler need a map-style source (__len__ + __getitem__) "
            f"or fetch=; this source is {kind}"
        )
    if shuffle and sampler is not None:
        raise ValueError("AsyncLoader: pass shuffle=True or a sampler, not both")
    return kind


def _checked_device(device: str | torch.device | None) -> torch.device | None:
    """Where batches go (None: stay on the CPU); CUDA only where there is one."""
    if device is None:
        return None
    parsed = parse_device(device, "AsyncLoader")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"AsyncLoader: device={str(parsed)!r} was asked for but CUDA is not "
            "available here; leave device=None (batches stay on the CPU) or run on a "
            "machine with a GPU"
        )
    return parsed


def _check_processes(
    context: str | None, init: Callable[[int], None] | None, worker_kind: str
) -> None:
    if context is not None and context not in (starts := multiprocessing.get_all_start_methods()):
        raise ValueError(
            f"AsyncLoader: multiprocessing_context={context!r} is not a start "
            f"method here; use one of {starts}"
        )
    if init is not None and worker_kind == "thread":
        raise ValueError(
            "AsyncLoader: worker_init_fn runs in worker processes, and "
            "worker_kind='thread' (or threads=N) starts none; use worker_kind='process' or "
            "'auto', with workers=N"
        )
