"""OpenTelemetry spans for requests, the stages they pass through, and the batches that carried
them (``Pipeline(tracing=True)`` or a tracer; ``pip install "asyncnn[otel]"``).

- ``asyncnn.request``: one span per request, from admission to its end, a child of the caller's
  current span (a request sent from an instrumented FastAPI handler sits in that handler's
  trace). Its status says how it ended: ok, ``StageError`` (recorded, with the stage), cancelled,
  timed out, ``PipelineClosed``.
- ``asyncnn.stage <name>``: a child of the request per stage it passed through, from the moment
  it was handed to the stage (queued) to the end of the call that computed it;
  ``asyncnn.queue_seconds`` and ``asyncnn.run_seconds`` say which part was waiting.
- ``asyncnn.batch <name>``: one span per batched call, with a *link* to the span of every
  request it carried, and its size, why it was released and (padded batches) the padding waste:
  "was I slow because I waited for a batch, or because the batch was slow?".

Spans are made on the event loop from times the runtime takes anyway; with tracing off nothing
is built (the runtime checks one attribute). Every stage's function runs with its span as the
current span, so spans it makes itself are children of that span: a plain, join or device
stage's function in its stage span (on a thread, inline, on the loop, or on a Ray replica,
where the context travels as a W3C trace-context carrier), a batched one in its batch span, a
generator in its stage span, a step model's ``admit``/``step``/``evict`` in the span of that
call (an ``asyncnn.batch`` span linked to the requests it carried). Only
``opentelemetry-api`` is needed; without an SDK configured, the API's no-op tracer makes every
span free.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .errors import describe, text_of

__all__ = ["Carried", "RequestTrace", "Tracing", "tracing_from"]


def _otel() -> Any:
    try:
        from opentelemetry import context, trace
    except ImportError:
        raise ImportError(
            'Pipeline(tracing=...) needs OpenTelemetry: pip install "asyncnn[otel]" '
            "(opentelemetry-api), and an SDK to export the spans"
        ) from None
    return trace, context


def _record(span: Any, exc: BaseException) -> None:
    """``span.record_exception(exc)``, for an exception whose ``str()`` raises too (the SDK
    words it: a failure here would end the stage's task and every request in flight)."""
    try:
        span.record_exception(exc)
    except Exception:
        span.record_exception(RuntimeError(describe(exc)))


class RequestTrace:
    """One request's span, and when it was last handed to a stage (its queue's start)."""

    __slots__ = ("_otel", "last", "span")

    def __init__(self, span: Any, otel: Any, now: int) -> None:
        self.span = span
        self._otel = otel
        self.last = now  # ns: when it entered the queue of the next stage

    def part(self) -> PartTrace:
        """The trace of one part of this (streaming) request: the stages after the generator
        add their spans to this request's span."""
        return PartTrace(self.span, self._otel, time.time_ns())

    def end(self, outcome: str, exc: BaseException | None = None) -> None:
        """The request ended (called once, by the ledger)."""
        trace = self._otel
        span = self.span
        span.set_attribute("asyncnn.outcome", outcome)
        if outcome == "ok":
            span.set_status(trace.Status(trace.StatusCode.OK))
        elif exc is not None:
            _record(span, exc)
            stage = getattr(exc, "stage", None)
            if stage is not None:
                span.set_attribute("asyncnn.stage", stage)
            span.set_status(trace.Status(trace.StatusCode.ERROR, describe(exc)))
        else:
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        span.end()


class PartTrace(RequestTrace):
    """A part of a streaming request: its stage spans go under the request's span, and its end
    is not the request's (the request's own trace ends it)."""

    __slots__ = ()

    def end(self, outcome: str, exc: BaseException | None = None) -> None:
        return None


class Carried:
    """A payload on its way to a call, with the OpenTelemetry context to run it in."""

    __slots__ = ("context", "payload")

    def __init__(self, context: Any, payload: Any) -> None:
        self.context = context
        self.payload = payload


class Tracing:
    """Makes the spans of one pipeline (see the module's doc)."""

    __slots__ = ("_context", "_trace", "tracer")

    def __init__(self, tracer: Any) -> None:
        self._trace, self._context = _otel()
        self.tracer = tracer

    def begin(self, req: Any) -> None:
        """Open ``req``'s span under the caller's current context."""
        attrs: dict[str, Any] = {"asyncnn.request_id": req.id}
        if req.priority:
            attrs["asyncnn.priority"] = req.priority
        span = self.tracer.start_span(
            "asyncnn.request", context=self._context.get_current(), attributes=attrs
        )
        req.trace = RequestTrace(span, self._trace, time.time_ns())

    def open(self, stage: str, requests: Sequence[Any]) -> list[tuple[Any, Any]]:
        """Stage spans opened before a call (from when each request was handed to the stage),
        so that spans the stage's function makes are their children (see ``carry``)."""
        out = []
        for req in requests:
            rt = req.trace
            if rt is not None:
                span = self.tracer.start_span(
                    f"asyncnn.stage {stage}",
                    context=self._trace.set_span_in_context(rt.span),
                    start_time=rt.last,
                    attributes={"asyncnn.stage": stage},
                )
                out.append((req, span))
        return out

    def close(self, spans: list[tuple[Any, Any]], seconds: float, **attrs: Any) -> None:
        """The call of ``open``'s spans ended after ``seconds``."""
        ended = time.time_ns()
        started = ended - int(seconds * 1e9)
        for req, span in spans:
            rt = req.trace
            queued = min(rt.last, started)
            span.set_attribute("asyncnn.queue_seconds", (started - queued) / 1e9)
            span.set_attribute("asyncnn.run_seconds", seconds)
            for key, value in attrs.items():
                span.set_attribute(key, value)
            span.end(end_time=ended)
            rt.last = ended

    def carry(self, spans: list[tuple[Any, Any]], payload: Any) -> Any:
        """``payload`` with the first stage span's context, for a ``carrying`` call."""
        if not spans:
            return Carried(None, payload)
        return Carried(self._trace.set_span_in_context(spans[0][1]), payload)

    def remote(self, pool: Any, join: bool = False) -> Any:
        """A Ray stage's ``invoke`` for ``Carried`` payloads: the context crosses to the replica
        as a W3C trace-context carrier (``_Replica.run_traced``). ``join``: the payload is the
        tuple of a join's parts, spread into the call."""

        def invoke(arg: Carried) -> Any:
            args = tuple(arg.payload) if join else (arg.payload,)
            return pool.call("run_traced", self.carrier(arg.context), args)

        return invoke

    def carrier(self, context: Any) -> dict[str, str]:
        """``context`` as a W3C trace-context carrier, to cross into another process."""
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        if context is not None:
            propagate.inject(carrier, context=context)
        return carrier

    def within(self, context: Any, call: Any) -> Any:
        """``call`` (sync) run with ``context`` attached, on whichever thread runs it."""
        return self.boxed(call, [context], False)

    def attach(self, context: Any) -> Any:
        """Make ``context`` current in this task or thread; ``detach`` the token it returns."""
        return self._context.attach(context)

    def detach(self, token: Any) -> None:
        self._context.detach(token)

    def carrying(self, call: Any, is_async: bool, join: bool = False) -> Any:
        """``call`` taking a ``Carried`` payload: it runs with the stage span as the current
        span, on whichever thread runs it (a stage's thread, or the loop). ``join``: the
        payload is the tuple of a join's parts, spread into the call."""
        attach, detach = self._context.attach, self._context.detach

        if is_async:

            async def carried_async(arg: Carried) -> Any:
                token = attach(arg.context) if arg.context is not None else None
                try:
                    return await (call(*arg.payload) if join else call(arg.payload))
                finally:
                    if token is not None:
                        detach(token)

            return carried_async

        def carried(arg: Carried) -> Any:
            token = attach(arg.context) if arg.context is not None else None
            try:
                return call(*arg.payload) if join else call(arg.payload)
            finally:
                if token is not None:
                    detach(token)

        return carried

    def _stage(self, req: Any, stage: str, started: int, ended: int, **attrs: Any) -> None:
        rt = req.trace
        if rt is None:
            return
        queued = min(rt.last, started)
        span = self.tracer.start_span(
            f"asyncnn.stage {stage}",
            context=self._trace.set_span_in_context(rt.span),
            start_time=queued,
            attributes={
                "asyncnn.stage": stage,
                "asyncnn.queue_seconds": (started - queued) / 1e9,
                "asyncnn.run_seconds": (ended - started) / 1e9,
                **attrs,
            },
        )
        span.end(end_time=ended)
        rt.last = ended

    def open_batch(self, stage: str, requests: Sequence[Any], reason: str, **attrs: Any) -> Any:
        """A batched call of ``stage`` starts: its span, linked to every request's span (a root
        of its own: it belongs to many traces)."""
        links = [
            self._trace.Link(r.trace.span.get_span_context())
            for r in requests
            if r.trace is not None
        ]
        return self.tracer.start_span(
            f"asyncnn.batch {stage}",
            context=self._context.Context(),
            links=links,
            attributes={
                "asyncnn.stage": stage,
                "asyncnn.batch.size": len(requests),
                "asyncnn.batch.reason": reason,
                **attrs,
            },
        )

    def close_batch(
        self,
        span: Any,
        stage: str,
        requests: Sequence[Any],
        seconds: float,
        error: BaseException | None = None,
    ) -> None:
        """The batched call ended after ``seconds``: its span ends, and (when it succeeded)
        each request gets its stage span."""
        ended = time.time_ns()
        if error is not None:
            _record(span, error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, text_of(error)))
        span.end(end_time=ended)
        if error is None:
            started = ended - int(seconds * 1e9)
            for req in requests:
                self._stage(req, stage, started, ended, **{"asyncnn.batch.size": len(requests)})

    def context_of(self, span: Any) -> Any:
        """The context in which ``span`` is current (for ``boxed`` calls)."""
        return self._trace.set_span_in_context(span)

    def boxed(self, call: Any, box: list[Any], is_async: bool) -> Any:
        """``call`` run in the context held in ``box[0]`` when it runs (set by the one runner
        that owns ``box`` before each call it makes, on whichever thread runs the call)."""
        attach, detach = self._context.attach, self._context.detach

        if is_async:

            async def boxed_async(*args: Any) -> Any:
                token = attach(box[0]) if box[0] is not None else None
                try:
                    return await call(*args)
                finally:
                    if token is not None:
                        detach(token)

            return boxed_async

        def boxed_call(*args: Any) -> Any:
            token = attach(box[0]) if box[0] is not None else None
            try:
                return call(*args)
            finally:
                if token is not None:
                    detach(token)

        return boxed_call


def tracing_from(option: Any) -> Tracing | None:
    """``Pipeline(tracing=...)``: False/None (off), True (the global tracer provider's
    ``asyncnn`` tracer) or a tracer."""
    if option is None or option is False:
        return None
    if option is True:
        trace, _ = _otel()
        return Tracing(trace.get_tracer("asyncnn"))
    if not hasattr(option, "start_span"):
        raise TypeError(
            f"Pipeline: tracing={option!r}: use True (the global tracer provider), False, or an "
            "OpenTelemetry tracer (trace.get_tracer(...))"
        )
    return Tracing(option)
