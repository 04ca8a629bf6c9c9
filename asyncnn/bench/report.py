"""What the bench prints while and after it runs: a progress bar per workload (rich when
installed, plain lines otherwise) and the results table."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._core import Row

__all__ = ["Progress", "format_table"]


class Progress:
    """A rich progress bar when rich is installed, plain lines otherwise."""

    def __init__(self) -> None:
        try:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._rich: Any = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                transient=True,
                console=None,
            )
        except ImportError:
            self._rich = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def workload(self, name: str) -> Callable[..., None]:
        """A callback ``update(step, fraction=None)``: the step's name, and how far along."""
        if self._rich is not None:
            task = self._rich.add_task(name, total=1.0)

            def update(step: str, fraction: float | None = None) -> None:
                extra = {} if fraction is None else {"completed": fraction}
                self._rich.update(task, description=f"{name}: {step}", **extra)

            return update
        print(f"running {name} ...", file=sys.stderr, flush=True)
        return lambda step, fraction=None: None


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def format_table(rows: Sequence[Row]) -> str:
    header = [
        "workload",
        "loop",
        "system",
        "throughput",
        "spread",
        "p50 ms",
        "p99 ms",
        "ratio",
        "bound",
        "target",
        "verdict",
        "note",
    ]
    lines = [header]
    for r in rows:
        if r.verdict == "skipped":
            lines.append([r.workload, r.loop, r.system] + ["—"] * 7 + ["skipped", r.note])
            continue
        lines.append(
            [
                r.workload,
                r.loop,
                r.system,
                f"{r.rate:,.0f} {r.unit}",
                f"{r.rate_min:,.0f}–{r.rate_max:,.0f}",
                _fmt(r.p50_ms, ".2f"),
                _fmt(r.p99_ms, ".2f"),
                _fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else ""),
                _fmt(r.bound, ".2f"),
                r.target,
                r.verdict,
                r.note,
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        cells = (str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        out.append("| " + " | ".join(cells) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
