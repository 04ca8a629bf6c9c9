"""Step-level ("continuous") batching: the user's step model and the options of a step stage.

A step model advances many requests together, one step at a time (a token, an audio frame, a
denoising step). The user writes the batched parts; the runtime owns the rest (who joins and
leaves between steps, budgets, compatibility, streaming each step's outputs, failures)::

    class Decoder:
        def admit(self, prompts: list) -> list:        # prefill: one state per new request
            ...
        def step(self, states: list) -> tuple[list, list[bool]]:
            ...                                        # one output per state, and which are done
        def evict(self, states: list) -> None:         # optional: free what finished or left
            ...

    Stage(Decoder(), step=Stepping(max_active=64))

``step`` may update the states in place; when it raises it must leave them as they were (as a
batched tensor operation that fails does), because the runtime re-runs it on halves of the
active set to find the one request that fails it. Each step's output for a request is a part of
that request (``send_stream`` yields them; ``send`` returns their list); the output that comes
with ``done`` is its last.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import check_whole, keyword_options

__all__ = ["StepModel", "Stepping", "check_step_model"]


@runtime_checkable
class StepModel(Protocol):
    """What a step stage's function provides (``evict`` is optional)."""

    def admit(self, inputs: list[Any]) -> list[Any]: ...

    def step(self, states: list[Any]) -> tuple[list[Any], list[bool]]: ...


@keyword_options
@dataclass(frozen=True, kw_only=True)
class Stepping:
    """How a step stage forms its active set.

    Args:
        max_active: the most requests stepped together (>= 1).
        cost: ``cost(input) -> number``: what one request weighs against ``budget`` (e.g. its
            prompt length plus the tokens it may generate); default 1 each.
        budget: the most total cost of the active requests (``None``: no budget beyond
            ``max_active``). A request heavier than the budget runs alone.
        key: ``key(input) -> hashable``: requests with different keys never share a step (image
            size, adapter, sampling mode); the stage steps one key's group at a time, in turn.

    Requests join in arrival order between steps while the set has room; the first that does
    not fit waits (later ones do not overtake it).
    """

    max_active: int = 64
    cost: Callable[[Any], float] | None = None
    budget: float | None = None
    key: Callable[[Any], Hashable] | None = None

    def __post_init__(self) -> None:
        check_whole(self.max_active, "Stepping: max_active")
        if self.budget is not None and (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, int | float)
            or self.budget <= 0
        ):
            raise ValueError(f"Stepping: budget={self.budget!r} must be a number > 0 (or None)")
        for name in ("cost", "key"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"Stepping: {name}={fn!r} must be a function of one input")


def check_step_model(stage_name: str, fn: Any) -> None:
    """A step stage's function must have ``admit`` and ``step`` (and may have ``evict``)."""
    missing = [m for m in ("admit", "step") if not callable(getattr(fn, m, None))]
    if missing:
        raise TypeError(
            f"stage {stage_name!r}: step= needs an object with batched admit(inputs) -> states "
            f"and step(states) -> (outputs, done); {type(fn).__name__} has no "
            f"{' or '.join(missing)}"
        )
