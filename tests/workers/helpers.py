"""Build a stage context by hand: an in-memory inbox, collecting output channels, a real ledger."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from asyncnn.batching import Envelope, Request
from asyncnn.channels import Channel
from asyncnn.executors import prepare_call
from asyncnn.runtime.context import Outbox, StageContext
from asyncnn.runtime.joins import PartTable
from asyncnn.runtime.ledger import Ledger
from asyncnn.runtime.probe import StageProbe
from asyncnn.stage import Stage


def make_ctx(
    fn: Any, *, outs: int = 1, merged: bool = False, ports: int = 1, **stage_kw: Any
) -> StageContext:
    stage = Stage(fn, **stage_kw)
    probe = StageProbe(stage.name)
    port_chs = [Channel[Envelope](256, f"{stage.name}[{p}]") for p in range(ports)]
    led = Ledger()
    return StageContext(
        stage=stage,
        index=0,
        inbox=Channel(64, "joined") if ports > 1 else port_chs[0],
        ports=port_chs,
        outbox=Outbox([Channel(256, f"out{i}") for i in range(outs)], [merged] * outs, probe),
        ledger=led,
        probe=probe,
        call=prepare_call(fn, stage.runs_on),
        workers=stage.workers,
        join=PartTable(led) if ports > 1 else None,
    )


def admit(ctx: StageContext, rid: int) -> Request:
    req = Request(rid, asyncio.get_running_loop().create_future())
    ctx.ledger.admit(req)
    return req


def feed(ch: Channel[Envelope], *envs: Envelope, close: bool = True) -> None:
    for env in envs:
        ch.send_nowait(env)
    if close:
        ch.close()


def drained(ch: Channel[Any]) -> list[Any]:
    items = ch.drain_nowait()
    assert ch.closed, f"{ch.name} was not closed by its senders"
    return items


class FirstHeld:
    """A stage function that records what it is called with and holds the call of ``0`` until
    ``release`` is set (``started`` says it began): a call to queue others behind."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.seen: list[Any] = []

    def __call__(self, x: Any) -> Any:
        self.seen.append(x)
        if x == 0:
            self.started.set()
            self.release.wait(5)
        return x
