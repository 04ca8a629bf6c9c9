"""The ``generate`` workload: 256 callers each stream one generation from a small decoder with a
KV cache; step-level batching against static batching of the same size and per-request runs."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import torch

from ..pipeline import Pipeline
from ..stage import Stage
from ..stepping import Stepping
from ._core import (
    MOST_REPEATS,
    Context,
    Measure,
    Row,
    interleave,
    percentile,
    ratios_of,
    record_stages,
    run_on_loop,
)
from .decoder import Prompt, TinyDecoder, generate_alone, generate_static
from .verdicts import MISSES, Judgement, both, judge

__all__ = ["generate", "prompts"]

CALLERS = 256
ACTIVE = 128  # max_active of the step stage (the decoder's KV-cache rows), the static batch size
MEAN_NEW, MOST_NEW = 40, 256
PER_REQUEST = 32  # per-request generation is timed on this many (it is slow by design)
MODEL: dict[str, Any] = {"vocab": 256, "dim": 64, "heads": 4, "layers": 2}
VS_STATIC, VS_ALONE = 2.0, 5.0  # targets: tokens/s against static batching, per-request
NAMES = (f"static batching ({ACTIVE})", "per-request generation", "asyncnn step-level batching")


def prompts(n: int, seed: int = 0) -> list[Prompt]:
    """Prompts of 4-16 tokens; lengths to generate long-tailed (log-normal, mean ~40, capped at
    256), each request stopping at its own."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        new = min(MOST_NEW, max(1, round(rng.lognormvariate(3.25, 0.9))))
        tokens = tuple(rng.randrange(MODEL["vocab"]) for _ in range(rng.randint(4, 16)))
        out.append(Prompt(tokens, new))
    return out


def _measure(
    tokens: int, seconds: float, first: list[float], gaps: list[float], note: dict[str, float]
) -> Measure:
    m = Measure(tokens, seconds, first)  # latencies: time to first token
    m.extra.update(note)
    m.extra["gap_p99"] = percentile(gaps, 99) if gaps else 0.0
    return m


class _Systems:
    def __init__(self, ctx: Context, model: TinyDecoder, ps: list[Prompt]) -> None:
        self.ctx, self.model, self.ps = ctx, model, ps
        self.outputs: dict[int, list[int]] = {}

    async def stepped(self) -> Measure:
        pipe = Pipeline(
            [Stage(self.model, name="decode", step=Stepping(max_active=ACTIVE))], torch_threads=1
        )
        first: list[float] = []
        gaps: list[float] = []
        now = time.perf_counter

        async with pipe:
            t0 = now()

            async def caller(i: int) -> None:
                toks: list[int] = []
                last = t0
                async for tok in pipe.send_stream(self.ps[i]):
                    t = now()
                    (gaps if toks else first).append(t - last)
                    toks.append(tok)
                    last = t
                self.outputs[i] = toks

            await asyncio.gather(*(caller(i) for i in range(len(self.ps))))
            seconds = now() - t0
            stats = pipe.stats()
        record_stages(self.ctx, "generate", stats)
        step = stats["decode"].stepping
        assert step is not None
        made = sum(len(v) for v in self.outputs.values())
        return _measure(made, seconds, first, gaps, {"active": step.mean_active})

    def static(self) -> Measure:
        first: dict[int, float] = {}
        gaps: list[float] = []
        last: dict[int, float] = {}
        made = 0
        t0 = time.perf_counter()
        for start in range(0, len(self.ps), ACTIVE):

            def on_token(i: int, tok: int, start: int = start) -> None:
                nonlocal made
                t, k = time.perf_counter(), start + i
                if k in first:
                    gaps.append(t - last[k])
                else:
                    first[k] = t - t0
                last[k] = t
                made += 1

            generate_static(self.model, self.ps[start : start + ACTIVE], on_token)
        return _measure(made, time.perf_counter() - t0, list(first.values()), gaps, {})

    def per_request(self) -> Measure:
        t0, made, first = time.perf_counter(), 0, []
        for p in self.ps[:PER_REQUEST]:
            t1 = time.perf_counter()
            toks = generate_alone(self.model, p)
            first.append(t1 - t0 + (time.perf_counter() - t1) / len(toks))  # about one token in
            made += len(toks)
        return _measure(made, time.perf_counter() - t0, first, [], {})


def generate(ctx: Context) -> list[Row]:
    # One torch thread for every system: the model's ops are small, and a second intra-op
    # thread only spins (measured: the step stage ran 1.6x faster with one).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generate(ctx)
    finally:
        torch.set_num_threads(saved)


def _generate(ctx: Context) -> list[Row]:
    torch.manual_seed(0)
    model = TinyDecoder(**MODEL)
    ps = prompts(64 if ctx.quick else CALLERS)
    sv = _Systems(ctx, model, ps)
    reference = [generate_alone(model, p) for p in ps[:PER_REQUEST]]
    run_on_loop(ctx.loop, sv.stepped)  # also the warm-up
    for i, want in enumerate(reference):
        if sv.outputs[i] != want:
            raise AssertionError(f"generate: request {i}'s tokens differ from its greedy run alone")
    names = NAMES
    runs = interleave(
        ctx.repeats,
        {
            names[0]: sv.static,
            names[1]: sv.per_request,
            names[2]: lambda: run_on_loop(ctx.loop, sv.stepped),
        },
        ctx.progress,
        warm_up=False,
        decided=lambda runs: all(j.decided for j in _paired(runs)),
        most=MOST_REPEATS,
    )
    return _rows(ctx, runs, names, len(ps))


def _paired(runs: dict[str, list[Measure]]) -> tuple[Judgement, Judgement]:
    """Repeat by repeat, asyncnn's tokens/s against static batching and against per-request."""
    static, alone, ours = NAMES
    return (
        judge(ratios_of(runs, ours, static, cost=False), VS_STATIC),
        judge(ratios_of(runs, ours, alone, cost=False), VS_ALONE),
    )


def verdict_of(vs_static: Judgement, vs_alone: Judgement, ttft_ok: bool) -> str:
    """Both paired verdicts, and the p99 time to first token no worse than static batching's."""
    return both(vs_static, vs_alone) if ttft_ok else MISSES


def _rows(
    ctx: Context, runs: dict[str, list[Measure]], names: tuple[str, ...], n: int
) -> list[Row]:
    from ._core import summarize

    rows = [summarize("generate", k, ctx.loop, runs[k], unit="tokens/s") for k in names]
    static, alone, ours = rows
    for row, k in zip(rows, names, strict=True):
        gap = statistics.median(m.extra["gap_p99"] for m in runs[k]) * 1e3
        row.note = f"TTFT p50/p99 in the columns; inter-token p99 {gap:.1f} ms"
    vs_static, vs_alone = _paired(runs)
    ours.ratio = vs_static.ratio
    ours.ratio_label = f"vs static batching (paired {vs_static.low:.2f}–{vs_static.high:.2f})"
    ttft_ok = (ours.p99_ms or 0.0) <= (static.p99_ms or float("inf"))
    ours.target = f">= {VS_STATIC:g}x static at <= its p99 TTFT, >= {VS_ALONE:g}x per-request"
    ours.verdict = verdict_of(vs_static, vs_alone, ttft_ok)
    active = statistics.median(m.extra["active"] for m in runs[names[2]])
    ours.note += (
        f"; {vs_alone.ratio:.1f}x per-request (paired {vs_alone.low:.1f}–{vs_alone.high:.1f})"
        f"; mean active {active:.0f} of {ACTIVE}"
    )
    static.note += f"; batches of {ACTIVE} in arrival order, each until its longest ends"
    alone.note += f"; the first {PER_REQUEST} requests, one at a time"
    for row in rows:
        row.note = f"{n} callers; " + row.note
    return rows
