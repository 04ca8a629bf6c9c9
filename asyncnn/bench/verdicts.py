"""Verdicts that account for noise: from the spread of paired ratios, not one median against a
line. Sync: tests drive it with synthetic samples.

Each repeat runs every system once, back to back, so repeat ``i`` of ours and repeat ``i`` of the
baseline saw the same machine; their ratio cancels what the machine did that minute. Over the
repeats the ratios spread: the verdict is ``meets`` when even the worst of them reaches the
target (for a median of five, the second worst: one outlier is forgiven), ``misses`` when even
the best falls short, and ``within noise`` otherwise: the machine's noise is larger than the
distance to the target, and more repeats (or a quieter machine) are needed to decide.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MEETS", "MISSES", "NOISE", "Judgement", "both", "judge", "paired_ratios"]

MEETS, MISSES, NOISE = "meets", "MISSES", "within noise"


@dataclass(frozen=True)
class Judgement:
    """The median ratio, the range the verdict used (``low``–``high``), and the verdict."""

    ratio: float
    low: float
    high: float
    verdict: str

    @property
    def decided(self) -> bool:
        return self.verdict != NOISE


def paired_ratios(ours: Sequence[float], base: Sequence[float]) -> list[float]:
    """Repeat by repeat, ``ours[i] / base[i]`` (rates, or costs for a cost ratio)."""
    if len(ours) != len(base) or not ours:
        raise ValueError(f"paired ratios need as many runs on each side ({len(ours)}, {len(base)})")
    return [o / b for o, b in zip(ours, base, strict=True)]


def judge(ratios: Sequence[float], target: float, *, lower_is_better: bool = False) -> Judgement:
    """The verdict of ``ratios`` against ``target``: ``ratio >= target`` wins, or
    ``ratio <= target`` with ``lower_is_better`` (a cost)."""
    if not ratios:
        raise ValueError("judge: no ratios")
    ordered = sorted(ratios)
    trim = 1 if len(ordered) >= 5 else 0  # forgive one outlier on each side from five runs
    low, high = ordered[trim], ordered[-1 - trim]
    if lower_is_better:
        ok, bad = high <= target, low > target
    else:
        ok, bad = low >= target, high < target
    verdict = MEETS if ok else MISSES if bad else NOISE
    return Judgement(statistics.median(ordered), low, high, verdict)


def both(*judgements: Judgement) -> str:
    """One verdict for targets that must all be met: ``misses`` when any misses, ``meets``
    when all meet, else ``within noise``."""
    verdicts = [j.verdict for j in judgements]
    if MISSES in verdicts:
        return MISSES
    return MEETS if all(v == MEETS for v in verdicts) else NOISE
