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


def load_user_model(spec: str) -> Any:
    """``module:callable`` → the nn.Module that the factory returns."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise SystemExit(f"--model {spec!r}: use module:callable, e.g. mypkg.models:make_net")
    factory = getattr(importlib.import_module(mod_name), attr)
    model = factory()
    if not isinstance(model, nn.Module):
        raise SystemExit(
            f"--model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return model.eval()
