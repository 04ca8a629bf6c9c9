"""A model factory for the bench CLI tests (--model tests.bench_models:tiny)."""

import torch


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())


def not_a_module() -> int:
    return 3


def broken() -> torch.nn.Module:
    raise RuntimeError("no weights")
