"""The decisions of a step stage, in sync code with an injected clock: who joins the active set
between steps (arrival order, ``max_active``, the cost budget), which compatible group steps
next (one key at a time, in turn; requests whose reader has no room are skipped this step), who
leaves (done, cancelled), and the step figures (active slots and admissions per step, time to
first output, time between outputs). The worker (``workers/stepped.py``) only runs what it says.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ..batching import Request
from ..stepping import Stepping
from .probe import LatencyHistogram

__all__ = ["Slot", "StepCounters", "Stepper"]


class Slot:
    """One request at a step stage: waiting, then active with its model ``state``."""

    __slots__ = ("cost", "key", "last_output", "offered", "payload", "req", "state")

    def __init__(self, req: Request, payload: Any, key: Hashable, cost: float, now: float) -> None:
        self.req, self.payload, self.key, self.cost = req, payload, key, cost
        self.offered = now  # arrival at the stage
        self.last_output: float | None = None
        self.state: Any = None


class StepCounters:
    """What ``stats()`` shows of a step stage."""

    __slots__ = ("active", "admitted", "first_output", "gaps", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.active = 0  # slots stepped, summed over steps
        self.admitted = 0  # requests that joined, summed
        self.first_output = LatencyHistogram()  # arrival at the stage -> first output
        self.gaps = LatencyHistogram()  # one output -> the next, per request


class Stepper:
    """The active set of one step stage and its waiting line."""

    def __init__(self, spec: Stepping, clock: Callable[[], float] = time.perf_counter) -> None:
        self.spec = spec
        self.clock = clock
        self.waiting: deque[Slot] = deque()
        self.active: list[Slot] = []
        self.counters = StepCounters()
        self._turn = 0  # which key's group steps next

    def offer(self, req: Request, payload: Any) -> Slot:
        """A request arrives; it waits to join. ``key``/``cost`` errors are the caller's to
        end the request with."""
        spec = self.spec
        key = spec.key(payload) if spec.key is not None else None
        try:
            hash(key)
        except TypeError:
            raise TypeError(
                f"Stepping: key= returned a {type(key).__name__}, which is not hashable: "
                "return a hashable value (a tuple, a string, a number)"
            ) from None
        cost = float(spec.cost(payload)) if spec.cost is not None else 1.0
        if not cost >= 0.0:  # NaN would make every budget comparison false
            raise ValueError(
                f"Stepping: cost= returned {cost!r} for this request: return a number >= 0 "
                "(math.inf: it steps alone)"
            )
        slot = Slot(req, payload, key, cost, self.clock())
        self.waiting.append(slot)
        return slot

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def leave_ended(self) -> tuple[list[Slot], list[Slot]]:
        """Take out the requests that already ended (cancelled, failed): (waiting, active)."""
        gone_waiting = [s for s in self.waiting if s.req.future.done()]
        if gone_waiting:
            self.waiting = deque(s for s in self.waiting if not s.req.future.done())
        gone_active = [s for s in self.active if s.req.future.done()]
        if gone_active:
            self.active = [s for s in self.active if not s.req.future.done()]
        return gone_waiting, gone_active

    def join(self) -> list[Slot]:
        """Who joins before the next step, in arrival order; the first that does not fit waits
        (and everyone behind it). A request heavier than the budget joins an empty set alone."""
        spec, joined = self.spec, []
        used = sum(s.cost for s in self.active)
        while self.waiting and len(self.active) < spec.max_active:
            slot = self.waiting[0]
            if spec.budget is not None and used + slot.cost > spec.budget and self.active:
                break
            self.waiting.popleft()
            self.active.append(slot)
            joined.append(slot)
            used += slot.cost
        self.counters.admitted += len(joined)
        return joined

    def group(self, ready: Callable[[Slot], bool] = lambda s: True) -> list[Slot]:
        """The slots to step now: one key's group (keys take turns), without those not
        ``ready`` (their reader has no room: they skip this step); empty when none is."""
        keys: list[Hashable] = []
        for s in self.active:
            if s.key not in keys and ready(s):
                keys.append(s.key)
        if not keys:
            return []
        key = keys[self._turn % len(keys)]
        self._turn += 1
        # Identity first, as ``in`` above compares (a key that is not equal to itself: NaN).
        return [s for s in self.active if (s.key is key or s.key == key) and ready(s)]

    def stepped(self, slots: Iterable[Slot], done: Iterable[bool]) -> list[Slot]:
        """``slots`` each made an output (``done``: their last); those done leave. Returns them."""
        now, c, finished = self.clock(), self.counters, []
        c.steps += 1
        for slot, last in zip(slots, done, strict=True):
            c.active += 1
            if slot.last_output is None:
                c.first_output.add(now - slot.offered)
            else:
                c.gaps.add(now - slot.last_output)
            slot.last_output = now
            if last:
                finished.append(slot)
        self.remove(finished)
        return finished

    def remove(self, slots: Iterable[Slot]) -> None:
        gone = {id(s) for s in slots}
        if gone:
            self.active = [s for s in self.active if id(s) not in gone]
