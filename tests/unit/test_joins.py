"""PartTable: the parts of a request come together in every arrival order, once."""

import itertools

from asyncnn.runtime.joins import PartTable
from asyncnn.runtime.ledger import Ledger
from tests.fakes import request


def test_parts_come_together_in_every_arrival_order():
    for order in itertools.permutations(range(3)):
        led = Ledger()
        table = PartTable(led)
        r = request(7)
        led.admit(r)
        results = [table.offer(r, i, 3, f"part{i}") for i in order]
        assert results[:-1] == [None, None]
        assert results[-1] == ["part0", "part1", "part2"]
        assert len(table) == 0 and led.parked == {}


def test_one_part_passes_straight_through():
    led = Ledger()
    table = PartTable(led)
    r = request(1)
    assert table.offer(r, 0, 1, "only") == ["only"]
    assert len(table) == 0 and led.parked == {}


def test_requests_are_matched_by_id_not_by_arrival():
    led = Ledger()
    table = PartTable(led)
    a, b = request(1), request(2)
    assert table.offer(a, 0, 2, "a0") is None
    assert table.offer(b, 1, 2, "b1") is None
    assert table.offer(b, 0, 2, "b0") == ["b0", "b1"]
    assert table.offer(a, 1, 2, "a1") == ["a0", "a1"]


def test_chunks_of_a_request_that_fails_free_their_slot():
    led = Ledger()
    chunks = PartTable(led)
    r = request(3)
    led.admit(r)
    chunks.offer(r, 2, 4, "c2")
    chunks.offer(r, 0, 4, "c0")
    led.fail(r, ValueError("chunk 1 failed"))
    assert len(chunks) == 0 and led.parked == {}
    chunks.forget(r.id)  # idempotent
