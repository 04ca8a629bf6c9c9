"""The bench's models: the serving and overlap MLP, and a user's own model from ``--model``."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

__all__ = ["bench_mlp", "load_user_model"]


def bench_mlp(width: int = 512, hidden: int = 2048) -> nn.Module:
    """MLP 512→2048→2048→512 with ReLU, in eval mode (the serving and overlap workloads' model)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, width),
    ).eval()


def load_user_model(spec: str, shape: tuple[int, ...]) -> Any:
    """``module:callable`` → the nn.Module that the factory returns, checked on one row of
    ``shape``. Every mistake exits with a message that says what to fix."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise SystemExit(f"--model {spec!r}: use module:callable, e.g. mypkg.models:make_net")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SystemExit(f"--model {spec!r}: cannot import {mod_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"--model {spec!r}: {mod_name} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:
        raise SystemExit(
            f"--model {spec!r}: the factory raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise SystemExit(
            f"--model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    model = model.eval()
    try:
        with torch.inference_mode():
            model(torch.randn(2, *shape))
    except Exception as exc:
        raise SystemExit(
            f"--model {spec!r} fails on a batch of shape {(2, *shape)}: {type(exc).__name__}: "
            f"{exc} (check --input-shape: one row, without the batch dim)"
        ) from None
    return model
