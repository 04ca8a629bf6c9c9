"""``Pipeline.from_module``'s planning: an ``nn.Sequential`` cut into balanced stages. Sync."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .stage import Stage

__all__ = ["balance", "layer_stages", "layer_times"]


def layer_stages(
    module: Any,
    stages: int | None = None,
    devices: Sequence[Any] | None = None,
    sample: Any = None,
) -> list[Stage]:
    """One stage per top-level layer of ``module``, or ``stages`` groups of consecutive layers
    balanced by the time each takes on ``sample`` (else by parameter count), placed on
    ``devices`` in order. See ``Pipeline.from_module``."""
    import torch

    if not isinstance(module, torch.nn.Sequential):
        kind = type(module).__name__
        raise TypeError(
            f"Pipeline.from_module: {kind} is not an nn.Sequential, so its forward() cannot "
            "be split safely. Wrap the parts that run in order: "
            "nn.Sequential(model.backbone, model.head), or pass your own split: "
            "Pipeline([Stage(part1), Stage(part2)])"
        )
    named = list(module.named_children())
    if not named:
        raise ValueError("Pipeline.from_module: the nn.Sequential has no layers")
    if devices is not None:
        devices = list(devices)
        if stages is None:
            stages = len(devices)
        if len(devices) != stages:
            raise ValueError(
                f"Pipeline.from_module: {len(devices)} device(s) for {stages} stage(s): "
                "give one device per stage"
            )
    if stages is None:
        sizes = [1] * len(named)
    else:
        if isinstance(stages, bool) or not isinstance(stages, int):
            raise TypeError(f"Pipeline.from_module: stages={stages!r} must be an int")
        costs = (
            layer_times([m for _, m in named], sample)
            if sample is not None
            else [1.0 + sum(p.numel() for p in m.parameters()) for _, m in named]
        )
        sizes = balance(costs, stages)
    built: list[Stage] = []
    i = 0
    for g, size in enumerate(sizes):
        group = named[i : i + size]
        i += size
        fn = group[0][1] if size == 1 else torch.nn.Sequential(*(m for _, m in group))
        device = devices[g] if devices is not None else None
        built.append(Stage(fn, name=_group_name(group), executor="thread", device=device))
    return built


def _group_name(group: list[tuple[str, Any]]) -> str:
    if len(group) == 1:
        label, layer = group[0]
        return f"{label}:{type(layer).__name__}"
    return f"layers{group[0][0]}-{group[-1][0]}"


def layer_times(layers: list[Any], sample: Any, repeats: int = 3) -> list[float]:
    """Seconds each layer takes on the activations that reach it (median of ``repeats``)."""
    import torch

    times: list[float] = []
    x = sample
    with torch.inference_mode():
        for layer in layers:
            runs = []
            y = layer(x)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                y = layer(x)
                runs.append(time.perf_counter() - t0)
            times.append(sorted(runs)[len(runs) // 2] + 1e-9)
            x = y
    return times


def balance(costs: Sequence[float], groups: int) -> list[int]:
    """Sizes of ``groups`` runs of consecutive items whose largest total cost is smallest.

    The pipeline's throughput is set by its slowest stage, so this is what to minimise. Exact
    dynamic programming over split points (O(groups * n^2); n is a layer count).
    """
    n = len(costs)
    if not 1 <= groups <= n:
        raise ValueError(f"cannot split {n} layer(s) into {groups} group(s): use 1..{n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[g][i]: the smallest largest-group cost covering the first i items with g groups.
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for i in range(g, n + 1):
            for j in range(g - 1, i):
                cand = max(best[g - 1][j], prefix[i] - prefix[j])
                if cand < best[g][i]:
                    best[g][i], cut[g][i] = cand, j
    sizes: list[int] = []
    i = n
    for g in range(groups, 0, -1):
        j = cut[g][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]
