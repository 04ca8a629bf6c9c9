"""The Ray executor: a stage's function runs in Ray actors, awaited from the pipeline's loop.

A :class:`RayPool` holds ``replicas`` actors for one stage. Each call goes to the least-loaded
replica, at most ``max_inflight`` per replica (callers wait for a slot: backpressure reaches them
as usual). Results come back as Ray object references awaited on the pipeline's own event loop:
no helper thread per call, no second loop. Tensors travel through Ray's object store (CPU
tensors without a copy where Ray supports it); asyncnn itself never unpickles request data.

What is retried and what is not: a replica that dies (crash, ``ray.kill``, node lost) fails the
calls it held with ``ReplicaDied``; it is replaced by a new actor and the pipeline keeps
serving. Those calls are not retried, and a batch that held them is not bisected either (its
calls may have had effects); callers can resend.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from .batchrun import call_batch, collate
from .errors import AsyncnnError, WorkerLost

__all__ = ["RayPool", "ReplicaDied", "ensure_ray"]

log = logging.getLogger("asyncnn")


class ReplicaDied(WorkerLost):
    """A Ray replica died while it held this call; the replica has been replaced. The call is
    not run again (not even by bisecting its batch): it may have had effects."""


def _is_factory(fn: Any) -> bool:
    """A zero-argument callable builds the stage's function on the replica."""
    import torch

    if isinstance(fn, torch.nn.Module):
        return False
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return not required and not any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())


class _Replica:
    """The actor: builds the stage's callable once, then runs calls and batches."""

    def __init__(self, fn: Any, factory: bool, inference: bool = True) -> None:
        import torch

        self.fn = fn() if factory else fn
        if isinstance(self.fn, torch.nn.Module):
            self.fn.eval()
        self.inference = inference
        self.calls = 0

    def ready(self) -> int:
        return os.getpid()

    def _call(self, *args: Any) -> Any:
        import torch

        self.calls += 1
        if self.inference:
            with torch.inference_mode():
                return self.fn(*args)
        return self.fn(*args)

    def run(self, args: tuple[Any, ...]) -> Any:
        return self._call(*args)

    def run_traced(self, carrier: dict[str, str], args: tuple[Any, ...]) -> Any:
        """``run`` inside the caller's trace: ``carrier`` holds the stage span's context (W3C
        trace context), so spans the function makes here are children of that span."""
        return _in_trace(carrier, self.run, args)

    def run_batch(self, items: list[tuple[Any, int, int]], spec: Any) -> Any:
        """Collate and call one batch here; the caller checks rows and splits it."""
        payload, rows, _, _ = collate(items, spec)
        return call_batch(self._call, payload, rows, spec)

    def run_batch_traced(
        self, carrier: dict[str, str], items: list[tuple[Any, int, int]], spec: Any
    ) -> Any:
        """``run_batch`` inside the batch span's context (``carrier``, as in ``run_traced``)."""
        return _in_trace(carrier, self.run_batch, items, spec)

    def stats(self) -> dict[str, int]:
        return {"calls": self.calls, "pid": os.getpid()}


def _in_trace(carrier: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the W3C trace context in ``carrier`` current."""
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(carrier))
    try:
        return fn(*args)
    finally:
        context.detach(token)


def ensure_ray() -> bool:
    """Start a local Ray if none is running; True when this call started it. Blocking: run it
    on a thread. To use a cluster, call ``ray.init(address=...)`` before the pipeline starts."""
    import ray

    if ray.is_initialized():
        return False
    cpus = os.cpu_count() or 1
    log.warning(
        "Ray is not initialised: starting a local Ray with num_cpus=%d (call ray.init() "
        "yourself to choose the cluster and its resources)",
        cpus,
    )
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR)
    return True


class RayPool:
    """The replicas of one stage, with least-loaded dispatch and replacement of dead ones."""

    def __init__(
        self,
        name: str,
        fn: Any,
        replicas: int,
        resources: Mapping[str, float] | None,
        max_inflight: int,
        inference: bool = True,
    ) -> None:
        import ray

        self.name = name
        self._fn = fn
        self._inference = inference
        self._factory = _is_factory(fn)
        opts: dict[str, Any] = dict(resources if resources is not None else {"num_cpus": 1})
        remote: Any = ray.remote  # typed overloads do not take a dict of options
        self._actor_cls = remote(**opts)(_Replica) if opts else remote(_Replica)
        self._max = max_inflight
        self.actors: list[Any] = [self._new_actor() for _ in range(replicas)]
        self._load = [0] * replicas
        self._slot_free: asyncio.Event | None = None
        self.replaced = 0

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self._fn, self._factory, self._inference)

    async def ready(self, timeout: float = 120.0) -> None:
        """Wait until every replica has built its function (a factory error surfaces here)."""
        self._slot_free = asyncio.Event()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(a.ready.remote() for a in self.actors)), timeout
            )
        except asyncio.TimeoutError as exc:
            import ray

            raise AsyncnnError(
                f"stage {self.name!r}: {len(self.actors)} Ray replica(s) did not start within "
                f"{timeout:.0f} s; Ray has {ray.available_resources()} free: lower resources= "
                "or replicas=, or add nodes"
            ) from exc
        except Exception as exc:
            raise AsyncnnError(
                f"stage {self.name!r}: its Ray replicas did not start: {type(exc).__name__}: "
                f"{exc}; check that the factory builds the model on a worker (and its imports)"
            ) from exc

    @property
    def capacity(self) -> int:
        return len(self.actors) * self._max

    async def call(self, method: str, *args: Any) -> Any:
        """Run ``method(*args)`` on the least-loaded replica and await its result."""
        import ray

        assert self._slot_free is not None
        while min(self._load) >= self._max:
            self._slot_free.clear()
            await self._slot_free.wait()
        i = min(range(len(self._load)), key=self._load.__getitem__)
        actor = self.actors[i]
        self._load[i] += 1
        try:
            return await getattr(actor, method).remote(*args)
        except ray.exceptions.RayActorError as exc:
            if self.actors[i] is actor:  # replace once, whichever call noticed first
                self.actors[i] = self._new_actor()
                self.replaced += 1
                log.warning("a Ray replica of stage %r died; replaced it", self.name)
            raise ReplicaDied(
                f"stage {self.name!r}: the Ray replica running this call died ({exc}); it was "
                "replaced, and this call was not retried: send the request again"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise cause from None
        finally:
            self._load[i] -= 1
            self._slot_free.set()

    def stats(self) -> list[Any]:
        """Each replica's figures (calls, pid); a remote round trip per replica."""
        import ray

        return ray.get([a.stats.remote() for a in self.actors])

    def release(self) -> None:
        """Kill the replicas (after the drain)."""
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as exc:  # already gone: nothing to release
                log.debug("releasing a Ray replica of %r: %s", self.name, exc)
