"""The exactly-once contract, in one sync object: every admitted request ends here, once.

A request is *in flight* from ``admit`` until the one call that ends it: ``complete`` (its
result), ``fail`` (an error), ``drop`` (a stage boundary found it already cancelled or failed) or
``fail_all`` (the forced shutdown). Whoever takes it out of flight first counts its outcome; every
later attempt is a no-op. Join tables that park a part of a request register it here, so that a
request ending early never leaves a part behind. No event loop is needed: tests drive it with
plain futures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..batching import Envelope, Request
from ..errors import PipelineClosed, StageError

__all__ = ["Counters", "Ledger", "Parking"]


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


class Ledger:
    """Requests in flight (oldest first) and the counts of how they ended."""

    __slots__ = ("counters", "inflight", "parked", "parts")

    def __init__(self) -> None:
        self.inflight: dict[int, Request] = {}
        self.counters = Counters()
        self.parked: dict[int, list[Parking]] = {}  # request id -> tables holding a part of it
        # Parts of streaming requests (negative ids) end here too, but the counts are of the
        # callers' requests: parts in flight are counted apart.
        self.parts = 0

    def admit(self, req: Request) -> None:
        self.inflight[req.id] = req
        if req.id >= 0:
            self.counters.admitted += 1
        else:
            self.parts += 1

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
        if self.parked:
            for table in self.parked.pop(req.id, ()):
                table.forget(req.id)
        return True

    # -- checks at stage boundaries ----------------------------------------------------------------

    def live(self, env: Envelope) -> bool:
        """Drop the requests of ``env`` that already ended; False when none is left to compute."""
        reqs = env.requests
        if len(reqs) == 1:
            if reqs[0].future.done():
                self.drop(reqs[0])
                return False
            return True
        live = [r for r in reqs if not r.future.done()]
        if len(live) != len(reqs):
            for r in reqs:
                if r.future.done():
                    self.drop(r)
            env.requests = live
        return bool(live)

    def alive(self, req: Request) -> bool:
        """False (and dropped) when ``req`` already ended: cancelled by its caller, or failed."""
        if req.future.done():
            self.drop(req)
            return False
        return True

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
        if self._release(req) and req.future.cancelled() and req.id >= 0:
            self.counters.cancelled += 1

    # -- outcomes ----------------------------------------------------------------------------------

    def complete(self, req: Request, value: Any) -> bool:
        """End ``req`` with its result; False when it had already ended."""
        if not self._release(req):
            return False
        fut = req.future
        counted = req.id >= 0  # a part of a streaming request is not counted
        if fut.done():  # cancelled between the last boundary and now
            if fut.cancelled() and counted:
                self.counters.cancelled += 1
            return False
        if counted:
            self.counters.completed += 1
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
            return False
        self.counters.failed += counted
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
        text = message or f"raised {type(cause).__name__}: {cause}"
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
