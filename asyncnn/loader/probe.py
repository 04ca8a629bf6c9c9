"""What a sync map-style dataset's fetching is, from its first samples: timed on a thread
(computing, which holds the GIL, or waiting, on I/O), whether a batch waits long enough to
spread it over threads, the CPU a batch computes (and whether, spread, it would keep the GIL
busy), and what the fetches set on the dataset (for the copy worker processes get). The
measuring runs on the fetch thread; ``waits`` is sync."""

from __future__ import annotations

import time
from typing import Any

from ..executors import ThreadWorker
from .choice import attributes, gil_bound, remember_fetching, set_by_fetching
from .config import LoaderConfig
from .flow import fetch_many

__all__ = ["IO_BOUND", "PROBE", "SPREAD_WAIT", "WARM_UP", "probe", "timed_fetch", "waits"]

IO_BOUND = 0.5  # a fetch that computed less than this share of its time was waiting on I/O
SPREAD_WAIT = 0.002  # seconds a batch waits on I/O, at the least, for spreading it over threads
# to pay (each part is a thread hand-off: an in-memory dataset's 8 samples take ~20 us, and
# the few microseconds of reading the clocks made them look like waiting)
PROBE = 8  # samples fetched alone first, to measure that
WARM_UP = 2.0  # a first look computing this many times the second's was a warm-up


def timed_fetch(source: Any, idxs: list[int]) -> tuple[list[Any], float, float]:
    """On a fetch thread: the samples, the CPU seconds this thread computed fetching them
    (decoding, which holds the GIL), and the seconds it waited (on I/O, or for the GIL). Time
    spent ready to run but waiting for a core (other processes busy) is neither, where Linux
    says how much it was: on a loaded machine cheap samples do not look costly or slow."""
    queued = _queued()  # reading it costs ~35 us of CPU: outside what is timed
    wall, cpu = time.perf_counter(), time.thread_time()
    samples = fetch_many(source, idxs)
    computed = time.thread_time() - cpu
    took = time.perf_counter() - wall
    off_core = min(took * 0.9, _queued() - queued)
    return samples, computed, max(0.0, took - off_core - computed)


def waits(computed: float, waited: float, samples: int, batch_size: int) -> bool:
    """Is fetching I/O-bound enough to spread each batch over threads? It must mostly wait
    (compute under ``IO_BOUND`` of its time), and a batch must wait long enough at that rate
    (``SPREAD_WAIT``) to pay for the hand-offs."""
    busy = computed / max(1e-9, computed + waited)
    return busy < IO_BOUND and waited / max(1, samples) * batch_size >= SPREAD_WAIT


def _queued() -> float:
    """Seconds this thread has spent runnable but waiting for a core (0 where unknown)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


async def probe(
    pool: ThreadWorker, cfg: LoaderConfig, idxs: list[int]
) -> tuple[list[Any], bool, float, list[int], bool]:
    """The first batch's first samples, fetched alone on a thread and timed: (the samples,
    whether fetching waits enough to spread batches over threads, the CPU seconds a batch
    computes at this rate, the batch's indices left to fetch, whether the fetch threads would
    keep the GIL busy at this rate: ``choice.gil_bound``).

    What the dataset sets while it fetches (a handle it opens lazily in ``__getitem__``: an
    HDF5 file, an LMDB environment, a connection) is remembered with its value before, so
    that worker processes can get the dataset as it was (``choice.for_workers``)."""
    source = cfg.source
    before = attributes(source)
    head, cpu, waited = await pool.run(timed_fetch, (source, idxs[:PROBE]))
    per_sample = cpu / max(1, len(head))
    spread = waits(cpu, waited, len(head), cfg.batch_size)
    wait = waited / max(1, len(head))
    idxs = idxs[PROBE:]
    if idxs:
        # A second look. Waiting for the GIL reads as waiting: confirm before spreading what
        # may be decoding over many threads (the worst choice for it). And the first call on a
        # fresh thread pays its warm-up (an in-memory dataset's first 8 samples took 10-20x
        # their cost): the cheaper look is the rate, or processes would take over for it.
        more, cpu, waited = await pool.run(timed_fetch, (source, idxs[:PROBE]))
        again = waits(cpu, waited, len(more), cfg.batch_size)
        second = cpu / max(1, len(more))
        # A first look that computed over twice the second's was the warm-up's (a client or a
        # handle opened on first use): the second look alone says what fetching is.
        spread = again if second * WARM_UP < per_sample else spread and again
        if second < per_sample:
            per_sample, wait = second, waited / max(1, len(more))
        head += more  # one list, emptied (its samples freed) where it is collated
        idxs = idxs[PROBE:]
    after = attributes(source)
    if before is not None and after is not None:
        remember_fetching(source, set_by_fetching(before, after))
    bound = spread and gil_bound(per_sample, wait, cfg.fetch_threads)
    return head, spread, per_sample * cfg.batch_size, idxs, bound
