"""Matching the parts of one request: fan-in joins, several outputs, micro-batch chunks. Sync."""

from __future__ import annotations

from typing import Any

from ..batching import Request
from .ledger import Ledger

__all__ = ["PartTable"]

_MISSING = object()


class PartTable:
    """Parks the parts of each request until all of them have arrived.

    ``offer(req, index, count, part)`` parks part ``index`` of ``count`` and returns all parts in
    order once the last one arrives (else None). A join has one part per input port; the sink
    has one per output, and a micro-batched request one per chunk. The ledger learns what is
    parked, so a request that ends early (failed on another branch, cancelled) is forgotten here.
    """

    __slots__ = ("ledger", "parts")

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.parts: dict[int, list[Any]] = {}

    def offer(self, req: Request, index: int, count: int, part: Any) -> list[Any] | None:
        slot = self.parts.get(req.id)
        if slot is None:
            if count == 1:
                return [part]
            slot = self.parts[req.id] = [_MISSING] * count
            self.ledger.park(req, self)
        slot[index] = part
        if any(p is _MISSING for p in slot):
            return None
        del self.parts[req.id]
        self.ledger.unpark(req, self)
        return slot

    def forget(self, rid: int) -> None:
        self.parts.pop(rid, None)

    def __len__(self) -> int:
        return len(self.parts)
