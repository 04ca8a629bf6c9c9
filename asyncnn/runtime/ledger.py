"""The exactly-once contract, in one sync object: every admitted request ends here, once.

A request is *in flight* from ``admit`` until the one call that ends it: ``complete`` (its
result), ``fail`` (an error), ``drop`` (a stage boundary found it already cancelled or failed) or
``fail_all`` (the forced shutdown). Whoever takes it out of flight first counts its outcome; every
later attempt is a no-op. Join tables that park a part of a request register it here, so that a
request ending early never leaves a part behind. No event loop is needed: tests drive it with
plain futures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..batching import Envelope, Request
from ..errors import PipelineClosed, StageError, describe

__all__ = ["Counters", "Ledger", "Parking", "Probe"]


class Probe(Protocol):
    """What a deadline check needs of the stage about to compute (a ``StageProbe``)."""

    name: str

    def need(self, rows: int = 1) -> float: ...

    def missed(self, reason: str) -> None: ...


class Parking(Protocol):
    """A table that holds parts of requests (a join): ``forget`` frees a request's slot."""

    def forget(self, rid: int) -> None: ...


@dataclass
class Counters:
    """Request outcomes: ``admitted == completed + failed + cancelled + in_flight``."""

    admitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0  # of the cancelled: ended by their deadline (TimeoutError)


class Ledger:
    """Requests in flight (oldest first) and the counts of how they ended."""

    __slots__ = ("by_priority", "clock", "counters", "inflight", "parked", "parts")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # the loop's clock, which deadlines are on
        self.inflight: dict[int, Request] = {}
        self.counters = Counters()
        self.parked: dict[int, list[Parking]] = {}  # request id -> tables holding a part of it
        # Parts of streaming requests (negative ids) end here too, but the counts are of the
        # callers' requests: parts in flight are counted apart.
        self.parts = 0
        # Callers' requests in flight per priority, kept once admission control asks for it.
        self.by_priority: dict[int, int] | None = None

    def admit(self, req: Request) -> None:
        self.inflight[req.id] = req
        if req.id >= 0:
            self.counters.admitted += 1
            if self.by_priority is not None:
                p = req.priority
                self.by_priority[p] = self.by_priority.get(p, 0) + 1
        else:
            self.parts += 1

    def admit_many(self, reqs: list[Request]) -> None:
        """``admit`` for a burst of callers' requests (ids >= 0), counted once."""
        if self.by_priority is not None:
            for req in reqs:
                self.admit(req)
            return
        inflight = self.inflight
        for req in reqs:
            inflight[req.id] = req
        self.counters.admitted += len(reqs)

    def park(self, req: Request, table: Parking) -> None:
        """``table`` now holds a part of ``req``; it is forgotten there when ``req`` ends."""
        self.parked.setdefault(req.id, []).append(table)

    def unpark(self, req: Request, table: Parking) -> None:
        tables = self.parked.get(req.id)
        if tables is not None:
            tables.remove(table)
            if not tables:
                del self.parked[req.id]

    def _release(self, req: Request) -> bool:
        """Take ``req`` out of flight; True for the one caller that gets to count its outcome."""
        if self.inflight.pop(req.id, None) is None:
            return False
        if req.id < 0:
            self.parts -= 1
        elif self.by_priority is not None:
            self.by_priority[req.priority] -= 1
        if self.parked:
            for table in self.parked.pop(req.id, ()):
                table.forget(req.id)
        return True

    # -- checks at stage boundaries ----------------------------------------------------------------

    def live(self, env: Envelope, probe: Probe | None = None) -> bool:
        """Drop the requests of ``env`` that already ended; False when none is left to compute.
        With ``probe`` (the stage about to compute), also end the requests whose deadline has
        passed or is closer than the stage's service time (see ``alive``)."""
        reqs = env.requests
        if len(reqs) == 1:
            return self.alive(reqs[0], probe)
        live = [r for r in reqs if self.alive(r, probe)]
        if len(live) != len(reqs):
            env.requests = live
        return bool(live)

    def alive(self, req: Request, probe: Probe | None = None, need: float | None = None) -> bool:
        """False (and dropped) when ``req`` already ended: cancelled by its caller, or failed.
        With ``probe``, a request whose deadline has passed, or is nearer than a call of that
        stage takes (``need`` seconds: a call of one request unless given), is ended here with
        ``TimeoutError`` (counted as the stage's miss)."""
        if req.future.done():
            self.drop(req)
            return False
        if req.deadline is None or probe is None:
            return True
        left = req.deadline - self.clock()
        if need is None:
            need = probe.need()
        if left > need:
            return True
        reason = "expired" if left <= 0 else "hopeless"
        probe.missed(reason)
        if left <= 0:
            why = f"its deadline passed {-left * 1e3:.2f} ms before the stage took it"
        else:
            why = f"{left * 1e3:.2f} ms were left and a call takes ~{need * 1e3:.2f} ms"
        self.expire(
            req,
            TimeoutError(
                f"request missed its deadline at stage {probe.name!r} ({reason}): {why}; it was "
                "not computed (allow a longer timeout=, or shed load earlier with max_in_flight=)"
            ),
        )
        return False

    def expire(self, req: Request, exc: TimeoutError) -> None:
        """End ``req`` by its deadline (counted as cancelled and timed out); a no-op when it
        already ended. A streaming request's parts in flight are dropped."""
        if req.id not in self.inflight:
            return
        if req.stream is not None:
            for fut in req.stream.abandon():
                fut.cancel()
        self._release(req)
        if req.id >= 0:
            self.counters.cancelled += 1
            self.counters.timed_out += 1
        if req.trace is not None:
            req.trace.end("timed_out", exc)
        if not req.future.done():
            req.future.set_exception(exc)

    def abandon(self, req: Request) -> None:
        """A streaming request ended early (its reader left; it failed or was cancelled while
        generating): its parts in flight are cancelled, so the next boundary drops them, and it
        is counted once (cancelled, unless something ended it before)."""
        if req.stream is not None:
            for fut in req.stream.abandon():
                fut.cancel()
        self.drop(req)

    def drop(self, req: Request) -> None:
        """A boundary found ``req`` already ended; count a cancellation once."""
        if self._release(req):
            cancelled = req.future.cancelled()
            if cancelled and req.id >= 0:
                self.counters.cancelled += 1
            if req.trace is not None:
                req.trace.end("cancelled" if cancelled else "dropped")

    # -- outcomes ----------------------------------------------------------------------------------

    def complete(self, req: Request, value: Any) -> bool:
        """End ``req`` with its result; False when it had already ended."""
        rid = req.id
        if rid < 0 or self.by_priority is not None or self.parked:
            if not self._release(req):
                return False
        elif self.inflight.pop(rid, None) is None:  # ``_release``'s common case, inlined
            return False
        fut = req.future
        counted = rid >= 0  # a part of a streaming request is not counted
        if fut.done():  # cancelled between the last boundary and now
            if fut.cancelled() and counted:
                self.counters.cancelled += 1
            if req.trace is not None:
                req.trace.end("cancelled")
            return False
        if counted:
            self.counters.completed += 1
        if req.trace is not None:
            req.trace.end("ok")
        fut.set_result(value)
        return True

    def fail(self, req: Request, exc: BaseException) -> bool:
        """End ``req`` with ``exc``; False when it had already ended."""
        if not self._release(req):
            return False
        fut = req.future
        counted = req.id >= 0
        if fut.cancelled():
            self.counters.cancelled += counted
            if req.trace is not None:
                req.trace.end("cancelled")
            return False
        self.counters.failed += counted
        if req.trace is not None:
            req.trace.end("closed" if isinstance(exc, PipelineClosed) else "error", exc)
        if not fut.done():
            fut.set_exception(exc)
        return True

    def fail_stage(
        self, stage: str, reqs: Sequence[Request], cause: Exception, message: str | None = None
    ) -> None:
        """End ``reqs`` with a ``StageError`` naming ``stage``, ``cause`` chained."""
        for req in reqs:
            self.fail(req, self.stage_error(stage, cause, message))

    @staticmethod
    def stage_error(stage: str, cause: Exception, message: str | None = None) -> StageError:
        """The ``StageError`` that names ``stage``, with ``cause`` chained."""
        text = message or f"raised {describe(cause)}"
        err = StageError(stage, f"stage {stage!r} {text}")
        err.__cause__ = cause
        return err

    def fail_all(self, reason: BaseException | None) -> None:
        """End every request still in flight with ``PipelineClosed`` (forced shutdown)."""
        for req in list(self.inflight.values()):
            exc = PipelineClosed(
                "pipeline closed before this request finished "
                "(aclose timeout, cancellation, or a runtime failure)"
            )
            if reason is not None:
                exc.__cause__ = reason
            self.fail(req, exc)

    def oldest(self) -> Request | None:
        return next(iter(self.inflight.values()), None)

    def __len__(self) -> int:
        """Requests in flight (not counting the parts of streaming requests)."""
        return len(self.inflight) - self.parts
