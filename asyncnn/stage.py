"""The user's declaration of one step of a pipeline: what runs, where, and how many at once."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from .batching import Batching
    from .stepping import Stepping

from .errors import keyword_options
from .executors import is_module

__all__ = ["Executor", "Stage", "is_module"]

Executor = Literal["auto", "inline", "thread", "ray"]
_EXECUTORS = ("auto", "inline", "thread", "ray")


def _is_async(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the bound method, not callable()
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def _is_async_gen(fn: object) -> bool:
    if inspect.isasyncgenfunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004
    return call is not None and not inspect.isfunction(fn) and inspect.isasyncgenfunction(call)


def _is_gen(fn: object) -> bool:
    if inspect.isgeneratorfunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004
    return call is not None and not inspect.isfunction(fn) and inspect.isgeneratorfunction(call)


def _default_name(fn: object) -> str:
    if is_module(fn):
        return type(fn).__name__
    name = getattr(fn, "__name__", None)
    if name is None:
        inner = getattr(fn, "func", None)  # functools.partial
        name = getattr(inner, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else str(name)


@keyword_options
@dataclass(frozen=True, kw_only=True, eq=False)
class Stage:
    """One step of a pipeline.

    Args:
        fn: an ``async def`` (runs on the event loop), a sync callable or an ``nn.Module`` (runs on
            the stage's own worker thread(s), under ``torch.inference_mode()``). A generator
            (``def`` with ``yield``, on the threads; ``async def`` with ``yield``, on the loop)
            yields 0..N parts for each input; each goes on through the graph as a part of the
            same request, in order (``pipe.send_stream(x)`` yields them as they come,
            ``await pipe.send(x)`` returns their list).
        name: unique name in the pipeline; defaults to the function's or module class's name, with
            a suffix (``f_2``) when two stages would share it.
        workers: how many calls of ``fn`` may run at once (tasks on the loop, or threads).
            ``"auto"`` for a stage on threads: the pipeline splits the cores between its
            compute stages (see ``Pipeline``'s ``torch_threads``): on 2 cores, a model stage
            runs as 2 workers of 1 torch thread each, which the event loop's work disturbs
            less than 1 worker of 2 (a parallel region waits for its slowest thread);
            ``stats()[name].workers`` says what was chosen.
        executor: ``"auto"`` (coroutines on the loop, everything else on dedicated threads),
            ``"inline"`` (a cheap sync function called on the loop itself), ``"thread"``, or
            ``"ray"``: the stage runs in ``replicas`` Ray actors (``pip install ray``).
            With ``"ray"``, ``fn`` is a zero-argument factory that builds the function or module
            on each replica (so the model is built there, not shipped per call), or a function
            or module, pickled once per replica.
        replicas: Ray actors for an ``executor="ray"`` stage (>= 1).
        resources: Ray resources per replica, e.g. ``{"num_cpus": 1, "num_gpus": 0}``.
        device: run the stage on this device (``"cpu"``, ``"cuda:0"``, a ``torch.device``): its
            module is moved there, its inputs are moved there on its thread, and on CUDA it
            owns streams so that copies overlap compute. ``None``: inputs are used as they come.
        max_inflight: on CUDA, how many batches may be queued on the stage's streams at once;
            on Ray, how many calls each replica may hold at once (>= 1; default 2, so the
            device never idles between batches while memory stays bounded).
        batch: a :class:`~asyncnn.Batching` to merge many requests into one call; without it
            the stage always receives one request's payload.
        step: a :class:`~asyncnn.Stepping`: ``fn`` is a step model (batched ``admit`` and
            ``step``, optional ``evict``; see ``asyncnn.stepping``) that the stage advances one
            step at a time over every active request, admitting new ones between steps; each
            step's output is a part of its request, streamed like a generator's. Runs on the
            stage's thread.
        inference_mode: run the stage's calls under ``torch.inference_mode()`` (default
            ``True``) wherever they run off the event loop: on its threads, on a device, on Ray
            replicas (and modules run inline). Set ``False`` for a stage that needs autograd
            (it then also accepts inference tensors only where torch allows it).

    Raises:
        TypeError: ``fn`` is not callable, does not fit ``executor``, or a generator or step
            model is declared with what it cannot do (batch=, device=, Ray).
        ValueError: ``workers`` is not a whole number >= 1, or ``executor`` is unknown.

    Example::

        Stage(model, workers=2)          # two threads run the model
        Stage(fetch)                     # async def: on the loop
        Stage(str.upper, executor="inline")
    """

    fn: Callable[..., Any] = field(kw_only=False)
    name: str = None  # type: ignore[assignment]  # filled in __post_init__
    workers: int | Literal["auto"] = 1
    executor: Executor = "auto"
    device: str | torch.device | None = None
    max_inflight: int = 2
    batch: Batching | None = None
    step: Stepping | None = None
    replicas: int = 1
    resources: Mapping[str, float] | None = None
    inference_mode: bool = True

    def __post_init__(self) -> None:
        fn = self.fn
        if not callable(fn) and self.step is None:  # a step model need not be callable
            raise TypeError(
                f"Stage(fn={fn!r}): fn must be an async def, a function or an nn.Module, "
                f"not {type(fn).__name__}"
            )
        if self.name is None:
            object.__setattr__(self, "name", _default_name(fn))
        elif not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Stage(name={self.name!r}): name must be a non-empty string")
        w = self.workers
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(
                f"stage {self.name!r}: workers={w!r} must be a whole number >= 1 or 'auto'"
            )
        if self.executor not in _EXECUTORS:
            raise ValueError(
                f"stage {self.name!r}: executor={self.executor!r} is unknown; "
                f"use one of {', '.join(map(repr, _EXECUTORS))}"
            )
        if self.is_async and self.executor == "thread":
            raise TypeError(
                f"stage {self.name!r}: an async def runs on the event loop; "
                "drop executor='thread' or pass a sync function"
            )
        if self.executor == "ray":
            self._check_ray()
        if self.step is not None:
            self._check_step()
        elif self.yields:
            self._check_generator()
        m = self.max_inflight
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"stage {self.name!r}: max_inflight={m!r} must be a whole number >= 1")
        if self.batch is not None:
            from .batching import Batching

            if not isinstance(self.batch, Batching):
                raise TypeError(
                    f"stage {self.name!r}: batch={self.batch!r} must be asyncnn.Batching(...)"
                )
        if self.device is not None:
            from .devices import parse_device

            dev = parse_device(self.device, f"stage {self.name!r}")
            if self.runs_on != "thread":
                raise TypeError(
                    f"stage {self.name!r}: device={str(dev)!r} needs a sync function or a module "
                    "(placed stages run on their own thread so that copies never block the "
                    "event loop); move the device work out of the async def or the inline stage"
                )
            object.__setattr__(self, "device", dev)

    def _check_step(self) -> None:
        from .stepping import Stepping, check_step_model

        if not isinstance(self.step, Stepping):
            raise TypeError(
                f"stage {self.name!r}: step={self.step!r} must be asyncnn.Stepping(...)"
            )
        check_step_model(self.name, self.fn)
        if self.workers not in (1, "auto"):
            raise ValueError(
                f"stage {self.name!r}: a step stage runs one step loop (workers=1); for more "
                "throughput raise Stepping(max_active=...), or add a second stage"
            )
        if self.batch is not None or self.device is not None or self.executor != "auto":
            raise TypeError(
                f"stage {self.name!r}: a step stage forms its own batches on its own thread; "
                "drop batch=, device= and executor= (place tensors on the device inside the "
                "model's admit and step)"
            )

    def _check_generator(self) -> None:
        kind = "an async generator" if _is_async_gen(self.fn) else "a generator"
        if self.batch is not None:
            raise TypeError(
                f"stage {self.name!r}: fn is {kind} (it yields parts of one request); it cannot "
                "also batch: drop batch=, or batch the parts in the next stage"
            )
        if self.device is not None or self.executor == "ray":
            raise TypeError(
                f"stage {self.name!r}: fn is {kind}; generator stages run on the loop or on "
                "local threads: drop device=/executor='ray' and place the model in a stage "
                "after it"
            )
        if _is_async_gen(self.fn) and self.executor in ("thread", "inline"):
            raise TypeError(
                f"stage {self.name!r}: an async generator runs on the event loop; drop "
                f"executor={self.executor!r} or pass a sync generator"
            )
        if self.executor == "inline":
            raise TypeError(
                f"stage {self.name!r}: a sync generator runs on the stage's threads; drop "
                "executor='inline' (or write an async generator to run it on the loop)"
            )

    def _check_ray(self) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ImportError(
                f'stage {self.name!r}: executor="ray" needs Ray: pip install "ray>=2.9"'
            ) from None
        r = self.replicas
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"stage {self.name!r}: replicas={r!r} must be a whole number >= 1")
        if self.is_async:
            raise TypeError(
                f"stage {self.name!r}: an async def cannot run on Ray replicas; pass a sync "
                "function, a module, or a factory that builds one"
            )
        if self.device is not None:
            raise TypeError(
                f"stage {self.name!r}: device= places local stages; for a Ray stage ask for "
                "resources={'num_gpus': 1} and build the model on 'cuda' in the factory"
            )
        if self.resources is not None and not isinstance(self.resources, Mapping):
            raise TypeError(
                f"stage {self.name!r}: resources must be a dict such as {{'num_cpus': 1}}"
            )

    @property
    def is_async(self) -> bool:
        """True when ``fn`` is a coroutine function (it runs on the event loop)."""
        return _is_async(self.fn)

    @property
    def yields(self) -> bool:
        """True when each input yields 0..N parts: ``fn`` is a generator (sync or async), or a
        step model (``step=``)."""
        return self.step is not None or _is_gen(self.fn) or _is_async_gen(self.fn)

    @property
    def runs_on(self) -> Literal["loop", "inline", "thread", "ray"]:
        """Where calls of ``fn`` run once ``"auto"`` is resolved."""
        if self.executor == "ray":
            return "ray"
        if self.is_async or _is_async_gen(self.fn):
            return "loop"
        return "inline" if self.executor == "inline" else "thread"

    def __repr__(self) -> str:
        extra = f", workers={self.workers!r}" if self.workers != 1 else ""
        if self.device is not None:
            extra += f", device={str(self.device)!r}"
        if self.batch is not None:
            extra += f", batch=<max_size={self.batch.max_size}, max_delay={self.batch.max_delay}>"
        return f"Stage({self.name!r}, runs_on={self.runs_on!r}{extra})"
