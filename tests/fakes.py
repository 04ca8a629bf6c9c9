"""Plain stand-ins for the runtime's collaborators, so sync pieces are tested without a loop."""

from __future__ import annotations

from typing import Any

from asyncnn.batching import Envelope, Request

_UNSET = object()


class FakeFuture:
    """What the ledger needs of a request's future: done/cancelled/set_result/set_exception."""

    def __init__(self) -> None:
        self._value: Any = _UNSET
        self._exc: BaseException | None = None
        self._cancelled = False
        self.settled = 0  # how many times an outcome was set: exactly once means 1

    def done(self) -> bool:
        return self._cancelled or self._exc is not None or self._value is not _UNSET

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        if self.done():
            return False
        self._cancelled = True
        return True

    def set_result(self, value: Any) -> None:
        assert not self.done(), "a request's outcome was set twice"
        self._value = value
        self.settled += 1

    def set_exception(self, exc: BaseException) -> None:
        assert not self.done(), "a request's outcome was set twice"
        self._exc = exc
        self.settled += 1

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._value

    def exception(self) -> BaseException | None:
        return self._exc


def request(rid: int) -> Request:
    return Request(rid, FakeFuture())  # type: ignore[arg-type]


def envelope(payload: Any, *reqs: Request, **kw: Any) -> Envelope:
    return Envelope(payload, list(reqs), **kw)


def break_worker_after_one_call(monkeypatch: Any, stage: str) -> None:
    """Simulate a bug in the runtime itself: ``stage``'s plain worker dies (TypeError "runtime
    bug") after its first call returns."""
    import asyncnn.runtime.kinds as kinds

    real = kinds.run_plain

    async def broken(ctx: Any, invoke: Any, sample: int, sync: bool, *rest: Any) -> None:
        if ctx.name != stage:
            return await real(ctx, invoke, sample, sync, *rest)
        env = await ctx.inbox.next()
        await invoke(env.payload)
        raise TypeError("runtime bug")

    monkeypatch.setattr(kinds, "run_plain", broken)


def load_example(name: str) -> Any:
    """Import ``examples/<name>.py`` as module ``name`` (pydantic resolves its annotations
    through ``sys.modules``)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
