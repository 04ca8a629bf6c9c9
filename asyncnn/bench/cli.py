"""Command line of the bench: pick workloads, run them with progress, print one table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._core import Context, Row, Workload, environment, format_stages
from .models import load_user_model
from .report import Progress, format_table
from .workloads_core import overhead, reqresp
from .workloads_devices import gpu, overlap
from .workloads_files import files
from .workloads_generate import generate
from .workloads_loader import loader
from .workloads_memory import memory
from .workloads_remote import remote
from .workloads_serving import serving
from .workloads_slo import slo
from .workloads_transformer import transformer

__all__ = ["WORKLOADS", "format_table", "main"]

MODEL_WORKLOADS = ("serving", "overlap")  # the workloads that run a user's --model
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "overhead",
            "8 async identity stages, 100k items streamed, vs asyncio.Queue chain",
            overhead,
        ),
        Workload(
            "reqresp",
            "1,024 clients awaiting send() through 4 stages, vs queues + futures",
            reqresp,
        ),
        Workload(
            "serving",
            "512 clients x 1 row into a batching MLP stage, vs offline ceiling and to_thread",
            serving,
        ),
        Workload(
            "overlap",
            "async read 5 ms -> MLP in a thread -> async write 2 ms, vs sequential, hand-written",
            overlap,
        ),
        Workload(
            "loader",
            "20k samples, 2 ms async fetch, batches of 64 into the MLP, vs DataLoader, torchdata",
            loader,
        ),
        Workload(
            "transformer",
            "64 callers x 1 sentence -> tokenizer -> batched MiniLM encoder, vs offline batches",
            transformer,
        ),
        Workload(
            "files",
            "20k local .npy/.pt files, sync __getitem__, batches of 64, +/- the MLP, vs "
            "DataLoader 0-4, torchdata",
            files,
            default=False,  # ~10 minutes on the 2-core VM: `make bench-loaders`
        ),
        Workload(
            "remote",
            "the files' samples over HTTP, 20 ms a read, batches of 64, +/- the MLP, vs "
            "DataLoader 0-4, torchdata",
            remote,
            default=False,  # ~3 minutes (DataLoader waits 20 ms a read): `make bench-loaders`
        ),
        Workload(
            "generate",
            "256 callers stream generations (mean ~40 tokens, long tail) from a KV-cache decoder: "
            "step-level batching vs static batching and per-request",
            generate,
            default=False,  # ~1 minute on the 2-core VM: `make bench-generate`
        ),
        Workload(
            "slo",
            "open-loop Poisson arrivals at 30-150% of capacity, 10% urgent: goodput within "
            "deadlines, max_delay='auto' vs fixed 0/1/5/20 ms",
            slo,
            default=False,  # ~1.5 minutes on the 2-core VM: `make bench-slo`
        ),
        Workload(
            "memory",
            "400k small items streamed through 4 stages: peak RSS growth stays under 50 MB",
            memory,
        ),
        Workload(
            "gpu",
            "pinned batches -> H2D -> MLP -> D2H on a CUDA stage, vs a sequential loop",
            gpu,
            needs_cuda=True,
        ),
    ]
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m asyncnn.bench",
        description=(
            "Measure asyncnn against what you would otherwise write, in the same run. Every "
            "figure is the median of --repeats runs after a warm-up, with its spread; ratios "
            "compare systems measured side by side."
        ),
    )
    p.add_argument("--quick", action="store_true", help="smaller runs (under a minute in all)")
    p.add_argument(
        "--workload",
        action="append",
        metavar="NAME",
        help="run this workload (repeatable); default: every CPU workload",
    )
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument(
        "--loop",
        default=None,
        metavar="asyncio|uvloop|all",
        help="event loop to run on (default: uvloop where installed); 'all' runs both",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per system (>= 1; default 3)"
    )
    p.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG: throughput per system per workload, and serving latency against "
        "offered load (a short sweep of client counts); needs matplotlib",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="add optional peers when installed: Ray Serve with @serve.batch for serving "
        "(torchdata.nodes joins the loader workload whenever it is installed)",
    )
    p.add_argument(
        "--model",
        metavar="MODULE:CALLABLE",
        help="your own model: a factory returning an nn.Module, run by the serving and overlap "
        "workloads (the only ones run with it)",
    )
    p.add_argument(
        "--input-shape",
        metavar="N,N,...",
        help="shape of one input row for --model (without the batch dim), e.g. 3,224,224",
    )
    return p


def _loops(arg: str | None) -> list[str]:
    try:
        import uvloop  # noqa: F401

        have_uv = True
    except ImportError:
        have_uv = False
    if arg is None:
        return ["uvloop" if have_uv else "asyncio"]
    loops = ["asyncio", "uvloop"] if arg == "all" else [arg]
    for lp in loops:
        if lp not in ("asyncio", "uvloop"):
            raise SystemExit(f"--loop {arg!r}: use asyncio, uvloop or all")
        if lp == "uvloop" and not have_uv:
            raise SystemExit("--loop uvloop: uvloop is not installed (pip install uvloop)")
    return loops


class _Usage(Exception):
    """A bad command line: the message says what to change (exit status 2)."""


def _plan(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The workloads to run and the options they share, from the command line."""
    if args.repeats is not None and args.repeats < 1:
        raise _Usage(f"--repeats {args.repeats}: must be >= 1")
    cuda = args.device.startswith("cuda")
    names = args.workload or [
        w.name for w in WORKLOADS.values() if w.default and (not w.needs_cuda or cuda)
    ]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise _Usage(f"unknown workload(s) {unknown}; --list shows {list(WORKLOADS)}")
    if not (args.device == "cpu" or cuda):
        raise _Usage(f"--device {args.device!r}: use cpu or cuda[:N]")
    options: dict[str, Any] = {"plot": bool(args.plot), "peers": args.peers}
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _Usage("--plot needs matplotlib: pip install matplotlib") from None
    if args.model:
        names = _with_model(args, names, options)
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise _Usage(f"--device {args.device}: CUDA is not available here")
    return names, options


def _with_model(args: argparse.Namespace, names: list[str], options: dict[str, Any]) -> list[str]:
    """Load ``--model`` into ``options``; the workloads that run it."""
    if not args.input_shape:
        raise _Usage("--model needs --input-shape (one row, without the batch dim)")
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        raise _Usage(f"--input-shape {args.input_shape!r}: use numbers like 3,224,224") from None
    other = [n for n in names if n not in MODEL_WORKLOADS]
    if args.workload and other:
        raise _Usage(
            f"--model runs in the {' and '.join(MODEL_WORKLOADS)} workloads only, not in "
            f"{', '.join(other)}: drop those --workload options"
        )
    options["model"] = load_user_model(args.model, shape)
    options["input_shape"] = shape
    return [n for n in names if n in MODEL_WORKLOADS]


def _run(
    args: argparse.Namespace, names: list[str], options: dict[str, Any], loops: list[str]
) -> tuple[list[Row], bool]:
    """Every workload on every loop; the rows, and whether a correctness check failed."""
    rows: list[Row] = []
    failed = False
    with Progress() as progress:
        for loop in loops:
            for name in names:
                ctx = Context(
                    args.quick,
                    args.repeats or 3,
                    loop,
                    args.device,
                    progress.workload(f"{name} ({loop})"),
                    options,  # shared: workloads leave figures here for --json and --plot
                )
                t0 = time.perf_counter()
                try:
                    rows.extend(WORKLOADS[name].run(ctx))
                except AssertionError as exc:
                    print(f"{name}: correctness check FAILED: {exc}", file=sys.stderr)
                    failed = True
                seconds = options.setdefault("seconds", {})
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    return rows, failed


def _report(
    args: argparse.Namespace, rows: list[Row], env: dict[str, Any], options: dict[str, Any]
) -> None:
    print(format_table(rows))
    if options.get("stage_stats"):
        print("\nPer-stage utilisation (last timed run of each):")
        print(format_stages(options["stage_stats"]))
    if args.json:
        with open(args.json, "w") as f:
            doc = {
                "schema": 1,
                "environment": env,
                "rows": [r.as_dict() for r in rows],
                "serving_sweep": options.get("sweep"),
                "stage_stats": options.get("stage_stats", {}),
            }
            json.dump(doc, f, indent=2, default=str)
    if args.plot:
        from .plot import write_plot

        write_plot(args.plot, rows, options.get("sweep"))
        print(f"plot written to {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for w in WORKLOADS.values():
            extra = "  [cuda]" if w.needs_cuda else "" if w.default else "  [opt-in]"
            print(f"{w.name:<10} {w.summary}{extra}")
        return 0
    try:
        names, options = _plan(args)
    except _Usage as exc:
        print(exc, file=sys.stderr)
        return 2
    loops = _loops(args.loop)
    env = environment(",".join(loops), args.device)
    print(
        f"asyncnn bench · Python {env['python']} · torch {env['torch']} "
        f"({env['torch_threads']} threads) · loop {env['loop']} · {env['cpus']} CPUs · "
        f"GPU {env['gpu'] or 'none'} · device {env['device']}",
        flush=True,
    )
    t0 = time.perf_counter()
    rows, failed = _run(args, names, options, loops)
    _report(args, rows, env, options)
    each = ", ".join(f"{k} {v:.0f} s" for k, v in options.get("seconds", {}).items())
    print(
        f"({time.perf_counter() - t0:.0f} s: {each}; ratios compare systems measured side by side)"
    )
    return 1 if failed else 0
