"""The edges of the graph: the input task, join collectors, and the sinks that end requests."""

from __future__ import annotations

from typing import Any

from ...batching import Envelope
from ...channels import EMPTY, END, Channel
from ...payload import concat_rows, split_rows
from ..context import Outbox, StageContext
from ..joins import PartTable
from ..ledger import Ledger

__all__ = ["run_collector", "run_input", "run_sink"]


async def run_input(
    admission: Channel[Envelope], outbox: Outbox, ledger: Ledger, microbatch: int | None
) -> None:
    """Between admission and the first stages: micro-batch splitting and input fan-out."""
    try:
        while (env := await admission.next()) is not END:
            if microbatch is None:
                await outbox.send(env)
                continue
            try:
                parts = split_rows(env.payload, microbatch)
            except Exception as exc:
                for req in env.requests:
                    ledger.fail(req, exc)
                continue
            for i, part in enumerate(parts):
                await outbox.send(Envelope(part, env.requests, (i, len(parts))))
    finally:
        outbox.sender_done()


async def run_collector(ctx: StageContext, port: int, ch: Channel[Envelope]) -> None:
    """One input port of a join: park each request's part until every port has delivered."""
    table: PartTable = ctx.join
    alive, count, work = ctx.ledger.alive, len(ctx.ports), ctx.inbox
    try:
        while (env := await ch.next()) is not END:
            for req in env.requests:
                if not alive(req):
                    continue
                parts = table.offer(req, port, count, env.payload)
                if parts is not None:
                    await work.send(Envelope(tuple(parts), [req], env.chunk))
    finally:
        work.sender_done()


async def run_sink(
    ledger: Ledger,
    port: int,
    ch: Channel[Envelope],
    outputs: PartTable | None,
    ports: int,
    chunks: PartTable | None,
    done: Channel[None],
) -> None:
    """Output ``port`` of the pipeline: match the outputs (``outputs``, when ``ports`` > 1)
    and the micro-batch chunks (``chunks``) of each request, then end it with its result.
    ``done`` counts the sinks: it closes when the last one leaves (the graph has drained)."""
    alive, complete = ledger.alive, ledger.complete
    try:
        while True:
            env = ch.poll()
            if env is EMPTY:
                env = await ch.next()
            if env is END:
                return
            payload, parts = env.payload, env.parts
            for k, req in enumerate(env.requests):
                if parts is not None:
                    payload = parts[k]
                if not alive(req):
                    continue
                result: Any = payload
                if outputs is not None:
                    joined = outputs.offer(req, port, ports, payload)
                    if joined is None:
                        continue
                    result = tuple(joined)
                if chunks is not None and env.chunk is not None:
                    index, total = env.chunk
                    pieces = chunks.offer(req, index, total, result)
                    if pieces is None:
                        continue
                    try:
                        result = concat_rows(pieces)
                    except Exception as exc:
                        ledger.fail(req, exc)
                        continue
                complete(req, result)
    finally:
        done.sender_done()
