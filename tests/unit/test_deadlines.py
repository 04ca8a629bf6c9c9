"""Deadlines in one heap, one timer: driven by a fake timer and clock, no loop."""

from __future__ import annotations

from typing import Any

from asyncnn.runtime.deadlines import RESOLUTION, Deadlines


class FakeTimers:
    def __init__(self) -> None:
        self.now = 0.0
        self.armed: list[list[Any]] = []  # [when, callback, cancelled]

    def arm(self, when: float, callback: Any) -> Any:
        entry = [when, callback, False]
        self.armed.append(entry)

        class Handle:
            def cancel(self) -> None:
                entry[2] = True

        return Handle()

    def live(self) -> list[float]:
        return [when for when, _, cancelled in self.armed if not cancelled]

    def run_until(self, t: float) -> None:
        """Fire every live timer due by ``t``, in time order, moving the clock."""
        while True:
            due = sorted((e for e in self.armed if not e[2] and e[0] <= t), key=lambda e: e[0])
            if not due:
                self.now = t
                return
            entry = due[0]
            entry[2] = True
            self.now = entry[0]
            entry[1]()


def make() -> tuple[FakeTimers, Deadlines, list[tuple[int, float | None, float]]]:
    timers = FakeTimers()
    fired: list[tuple[int, float | None, float]] = []
    deadlines = Deadlines(
        timers.arm, lambda: timers.now, lambda r, t: fired.append((r, t, timers.now))
    )
    return timers, deadlines, fired


def test_one_timer_for_many_deadlines_armed_for_the_earliest() -> None:
    timers, deadlines, _ = make()
    deadlines.add(5.0, 1, 5.0)
    deadlines.add(7.0, 2, 7.0)  # later: the timer stays
    deadlines.add(6.0, 3, 6.0)
    assert timers.live() == [5.0]
    deadlines.add(2.0, 4, 2.0)  # earlier: re-armed, the old one cancelled
    assert timers.live() == [2.0]
    assert len(deadlines) == 4


def test_each_deadline_expires_at_its_time_in_order() -> None:
    timers, deadlines, fired = make()
    for rid, when in ((1, 5.0), (2, 3.0), (3, 9.0), (4, 3.0)):
        deadlines.add(when, rid, when)
    timers.run_until(4.0)
    assert fired == [(2, 3.0, 3.0), (4, 3.0, 3.0)]
    assert timers.live() == [5.0]  # re-armed for the next one
    timers.run_until(20.0)
    assert [(r, at) for r, _, at in fired] == [(2, 3.0), (4, 3.0), (1, 5.0), (3, 9.0)]
    assert timers.live() == [] and len(deadlines) == 0


def test_a_timer_that_fires_within_the_resolution_early_still_expires() -> None:
    timers, deadlines, fired = make()
    deadlines.add(1.0, 7, 1.0)
    timers.now = 1.0 - RESOLUTION / 2
    timers.armed[0][2] = True
    timers.armed[0][1]()  # the loop fired it a little early
    assert [r for r, _, _ in fired] == [7]


def test_an_expiry_may_add_a_deadline_and_the_timer_follows() -> None:
    timers, deadlines, fired = make()

    def expire(rid: int, timeout: float | None) -> None:
        fired.append((rid, timeout, timers.now))
        if rid == 1:
            deadlines.add(timers.now + 1.0, 2, 1.0)

    deadlines._expire = expire  # type: ignore[misc]
    deadlines.add(1.0, 1, 1.0)
    timers.run_until(5.0)
    assert [(r, at) for r, _, at in fired] == [(1, 1.0), (2, 2.0)]
    assert len(timers.live()) == 0


def test_close_forgets_every_deadline_and_disarms() -> None:
    timers, deadlines, fired = make()
    deadlines.add(1.0, 1, None)
    deadlines.close()
    assert timers.live() == [] and len(deadlines) == 0
    timers.run_until(5.0)
    assert fired == []


def test_a_timer_that_fires_early_beyond_the_resolution_is_armed_again() -> None:
    timers = FakeTimers()
    fired: list[int] = []
    deadlines = Deadlines(timers.arm, lambda: timers.now, lambda r, t: fired.append(r), 1e-9)
    deadlines.add(1.0, 7, 1.0)
    timers.now = 0.9995
    timers.armed[0][2] = True
    timers.armed[0][1]()  # fired half a millisecond early: a loop with a fine clock waits
    assert fired == [] and timers.live() == [1.0]
    timers.run_until(1.0)
    assert fired == [7]
