"""How a batching stage files arrivals and hands batches to its runners, sync: the key a
request shares a batch by, the check of its time left on the way in (a paced stage asks for
the call of the batch about to form: :class:`PacedNeed`), and the release of a due batch into
the runners' slot, counted."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from ...batcher import Batch, Batcher, Item
from ...batching import Batching, Envelope, Request
from ...channels import EMPTY, END, Channel
from ...errors import text_of
from ...padding import pad_signature, request_length
from ...payload import batch_key, count_rows
from ..context import StageContext
from ..probe import StageProbe

__all__ = ["Doomed", "PacedNeed", "dispatch", "file_request", "pull", "release"]

# Requests a paced stage found with too little time left: (request, the time it needed).
Doomed = deque[tuple[Request, float]]


def _key(spec: Batching, payload: Any) -> tuple[Any, int, int | None]:
    """(what must match to share a batch, rows, length along pad_dim) of one request."""
    if spec.collate is not None:
        return None, 1, None  # hooks: any payload, one row per request
    if spec.pad is None:
        key, rows = batch_key(payload)  # signature first: its message says what a stage takes
        return key, rows, None
    length = request_length(spec, payload)
    return (pad_signature(spec, payload), spec.bucket(length)), count_rows(payload), length


class PacedNeed:
    """The time a request must have left to be filed into a paced stage's batch, for one pull
    (the stage's service line read once). Paced, a request is filed when a runner is free, into
    the batch about to form: it needs time for that batch's call, not a call of its own, and
    that batch takes what waits behind it too (a row each at least). A call's time spreads
    around its estimate (``service.slow``, the tracked 90th percentile: 1.2-1.3x on a loaded
    2-core VM), so one filed on the mean misses in flight about half the time, its row spent.
    When a request of its own class (or a more urgent one) waits that this batch has no room
    for, that one can take the row instead: the request must have time for a slow call. When
    none does, its row would go unused or to a less urgent class: the mean will do."""

    __slots__ = ("batcher", "fixed", "inbox", "max_size", "per_row", "slow")

    def __init__(self, ctx: StageContext, batcher: Batcher) -> None:
        service = ctx.probe.service
        self.fixed, self.per_row = service.line() if service.ready else (0.0, 0.0)
        self.slow = max(1.0, service.slow)
        self.batcher, self.inbox, self.max_size = batcher, ctx.inbox, batcher.spec.max_size

    def __call__(self, rows: int, priority: int) -> float:
        size, inbox = self.max_size, self.inbox
        filed = self.batcher.pending_rows + rows
        waiting = len(inbox)
        if filed + waiting <= size:  # the batch takes everything: no row to give away
            return self.fixed + self.per_row * (filed + waiting)
        need = self.fixed + self.per_row * size
        return need * self.slow if filed + inbox.waiting_upto(priority) > size else need


def _short(req: Request, now: float, need: float) -> bool:
    """``req`` has time left, but less than ``need``, and has not ended."""
    deadline = req.deadline
    return deadline is not None and 0.0 < deadline - now <= need and not req.future.done()


def file_request(
    ctx: StageContext,
    batcher: Batcher,
    env: Envelope,
    now: float,
    paced: PacedNeed | None = None,
    doomed: Doomed | None = None,
) -> None:
    """Put an arriving envelope's requests into the batcher (or fail the unbatchable).
    ``paced``: the time a request needs (else a call of its own); ``doomed``: where one with
    less goes, to be ended soon after rather than on the way to the batch a runner waits for
    (else it is ended now)."""
    spec = ctx.stage.batch
    assert spec is not None
    try:
        key, total, length = _key(spec, env.payload)
    except Exception as exc:  # whatever a payload does when looked at, it fails alone
        ctx.fail(env.requests, exc, f"cannot batch this request: {text_of(exc)}")
        return
    if total == 0:
        ctx.fail(env.requests, ValueError("0 rows"), "got a request with 0 rows (dim 0 is 0)")
        return
    if batcher.pacer is not None:
        batcher.pacer.arrivals.add(now, total)
    if env.rows is None:  # one request: the common case, without a loop
        _file_one(
            ctx, batcher, env.requests[0], env.payload, 0, total, key, length, now, paced, doomed
        )
        return
    start = 0
    for req, n in zip(env.requests, env.rows, strict=True):
        _file_one(ctx, batcher, req, env.payload, start, start + n, key, length, now, paced, doomed)
        start += n


def _file_one(
    ctx: StageContext,
    batcher: Batcher,
    req: Request,
    payload: Any,
    start: int,
    stop: int,
    key: Any,
    length: int | None,
    now: float,
    paced: PacedNeed | None,
    doomed: Doomed | None,
) -> None:
    need = None  # a call of one request
    if paced is not None:
        need = paced(stop - start, req.priority)
        if doomed is not None and _short(req, now, need):
            doomed.append((req, need))
            return
    if ctx.ledger.alive(req, ctx.probe, need):
        batcher.add(Item(req, payload, start, stop, now, length), key)


def pull(
    ctx: StageContext,
    batcher: Batcher,
    now: Callable[[], float],
    doomed: Doomed | None = None,
) -> bool:
    """File what waits in the inbox, up to a full batch; True once the input has ended.
    ``doomed`` (paced stages): see ``file_request``."""
    spec, inbox = batcher.spec, ctx.inbox
    paced = PacedNeed(ctx, batcher) if batcher.pacer is not None else None
    while batcher.pending_rows < spec.max_size:
        env = inbox.poll()
        if env is EMPTY:
            return False
        if env is END:
            return True
        file_request(ctx, batcher, env, now(), paced, doomed)
    return False


def release(
    probe: StageProbe,
    batcher: Batcher,
    batches: Channel[Batch],
    now: float,
    draining: bool,
    idle: bool,
) -> bool:
    """Hand the batch due now (if any) to the runners' slot, counted; True when one went."""
    batch = batcher.pop(now, draining=draining, idle=idle)
    if batch is None:
        return False
    dispatch(probe, batcher, batch, now)
    batches.send_nowait(batch)
    return True


def dispatch(probe: StageProbe, batcher: Batcher, batch: Batch, now: float) -> None:
    """Count a released batch: why, its requests' slack, and whether a more urgent request
    stays behind (in another bucket: it could not share this batch)."""
    probe.formed(batch.rows, batch.reason)
    if not batcher.ranked:
        return
    worst = 0
    for item in batch.items:
        req = item.request
        if req.deadline is not None:
            probe.slack.add(max(0.0, req.deadline - now))
        worst = max(worst, req.priority)
    if batcher.most_urgent() < worst:
        probe.inversions += 1
