"""The one exception tree of asyncnn.

Everything asyncnn raises on purpose derives from :class:`AsyncnnError`::

    AsyncnnError
    ├── GraphError      the graph or pipeline declaration is wrong (also a ValueError)
    ├── StageError      a user stage raised; ``.stage`` names it, the cause is chained
    ├── PipelineClosed  the pipeline is not running (never started, closing, closed)
    ├── PipelineFull    ``submit_nowait`` found the admission queue full
    │   └── Overloaded  admission control refused a request (``.retry_after`` seconds)
    ├── WorkerLost      the worker holding a call was lost (a dead Ray replica): never re-run
    └── LoaderError     an ``AsyncLoader`` could not fetch a sample; the cause is chained

Bad arguments to constructors raise the built-ins (``TypeError``/``ValueError``) with a message that
names the value and the fix; ``GraphError`` is also a ``ValueError`` so that either catch works.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, TypeVar

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "AsyncnnError",
    "GraphError",
    "LoaderError",
    "Overloaded",
    "PipelineClosed",
    "PipelineFull",
    "StageError",
    "WorkerLost",
    "check_whole",
    "describe",
    "first_of",
    "keyword_options",
    "text_of",
]


class AsyncnnError(Exception):
    """Root of every exception that asyncnn raises on purpose."""


class GraphError(AsyncnnError, ValueError):
    """A graph or pipeline declaration is invalid (cycle, dangling stage, no input or output)."""


class StageError(AsyncnnError):
    """A user stage raised while processing a request.

    ``stage`` is the stage's name; the original exception is ``__cause__``. Only the requests of the
    failing call get this error: the pipeline keeps serving.
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage

    def __reduce__(self) -> tuple[type[StageError], tuple[str, str]]:
        return (type(self), (self.stage, str(self)))


class PipelineClosed(AsyncnnError):
    """The pipeline does not accept or finish this request: it is not running, or it shut down."""


class PipelineFull(AsyncnnError):
    """``submit_nowait`` found the admission queue full; retry later or shed the load (HTTP 503)."""


class Overloaded(PipelineFull):
    """Admission control (``Pipeline(max_in_flight=...)``) refused a request at once: too many
    in flight, or it could not finish by its deadline behind the work already queued ahead of
    it. ``retry_after``: seconds after which trying again is expected to succeed (an HTTP 503's
    ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[Overloaded], tuple[str, float]]:
        return (Overloaded, (str(self), self.retry_after))


class LoaderError(AsyncnnError):
    """An ``AsyncLoader`` could not fetch a sample. ``index`` names it (the dataset index, or its
    position in an iterable source); the original exception is ``__cause__``."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self) -> tuple[type[LoaderError], tuple[str, int | None]]:
        return (type(self), (str(self), self.index))


class WorkerLost(AsyncnnError):
    """The worker that held a call was lost (a Ray replica died) after the call may have run.

    Such a call is never run again, by a retry or by bisecting its batch: it may have had
    effects. Its requests fail; the caller may resend."""


def text_of(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises: the runtime words a user's
    exception inside its own tasks, where a failure would end every request in flight."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<str() of this exception raised {type(inner).__name__}>"


def describe(exc: BaseException) -> str:
    """``"Type: message"`` of an exception (see ``text_of``)."""
    return f"{type(exc).__name__}: {text_of(exc)}"


def check_whole(value: object, label: str, low: int = 1) -> int:
    """``value`` when it is a whole number >= ``low`` (not a bool); else a ``ValueError`` that
    names it: ``"{label}={value!r} must be a whole number >= {low}"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{label}={value!r} must be a whole number >= {low}")
    return value


_Options = TypeVar("_Options", bound=type)


def keyword_options(cls: _Options) -> _Options:
    """For an options dataclass whose fields past the first positional ones are keyword-only:
    a call with too many positional arguments is a ``TypeError`` that writes the call with
    keywords (``Batching(64)``: "write Batching(max_size=64)") instead of Python's "takes 1
    positional argument but 2 were given"."""
    init: Any = getattr(cls, "__init__")  # noqa: B009
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    positional = sum(1 for f in dataclasses.fields(cls) if f.init and not f.kw_only)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        extra = args[positional:]
        if extra:
            named = zip(names[positional:], extra, strict=False)
            given = ", ".join(f"{k}={_short_repr(v)}" for k, v in named)
            if len(extra) > len(names) - positional:
                given += ", ..."
            call = ", ".join([*(f"<{n}>" for n in names[:positional]), given])
            takes = f"{names[0]} positionally and " if positional else ""
            raise TypeError(
                f"{cls.__name__} takes {takes}its options by keyword: write {cls.__name__}({call})"
            )
        init(self, *args, **kwargs)

    setattr(cls, "__init__", checked)  # noqa: B010
    return cls


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"<{type(value).__name__}>"


def first_of(
    group: BaseExceptionGroup[BaseException], kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of one of ``kinds`` in ``group``, searching nested groups."""
    for exc in group.exceptions:
        if isinstance(exc, kinds):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_of(exc, kinds)
            if found is not None:
                return found
    return None
