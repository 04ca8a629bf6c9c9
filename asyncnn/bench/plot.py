"""``--plot PATH``: throughput per system per workload, and serving latency against load."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._core import Row

__all__ = ["write_plot"]


def write_plot(path: str, rows: Sequence[Row], sweep: list[dict[str, Any]] | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc
    rows = [r for r in rows if r.verdict != "skipped"]
    workloads = list(dict.fromkeys(r.workload for r in rows))
    panels = len(workloads) + (1 if sweep else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.4 * panels), squeeze=False)
    for ax, name in zip(axes[:, 0], workloads, strict=False):
        mine = [r for r in rows if r.workload == name]
        labels = [f"{r.system} ({r.loop})" for r in mine]
        ax.barh(
            labels,
            [r.rate for r in mine],
            color=["#4c72b0" if "asyncnn" in r.system else "#aaaaaa" for r in mine],
        )
        ax.errorbar(
            [r.rate for r in mine],
            range(len(mine)),
            xerr=[[r.rate - r.rate_min for r in mine], [r.rate_max - r.rate for r in mine]],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
        ax.set_title(name)
        ax.set_xlabel(mine[0].unit)
    if sweep:
        ax = axes[-1, 0]
        clients = [p["clients"] for p in sweep]
        ax.plot(clients, [p["p50_ms"] for p in sweep], "o-", label="p50")
        ax.plot(clients, [p["p99_ms"] for p in sweep], "s-", label="p99")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (serving, asyncnn)")
        ax.set_ylabel("latency ms")
        ax2 = ax.twinx()
        ax2.plot(clients, [p["rate"] for p in sweep], "^--", color="gray", label="req/s")
        ax2.set_ylabel("req/s")
        ax.legend(loc="upper left")
        ax.set_title("serving: latency against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
