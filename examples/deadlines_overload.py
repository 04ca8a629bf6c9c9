"""Deadlines and priorities under overload, with a real transformer in a graph with a join.

Run:  python examples/deadlines_overload.py [requests] [load]
      (needs `transformers`: pip install -e ".[dev]"; a small BERT with random weights, offline)

- The graph: the request (token ids and mask of its own length, as a tokenizer gives them) goes
  to a BERT encoder batched with ``max_delay="auto"`` and padded per key, and, beside it, to a
  cheap step that counts its tokens; a join puts the two back together for the caller.
- Arrivals are open-loop (a fixed schedule, as users arrive, not callers that wait for an
  answer) at ``load`` times what the pipeline can serve. One request in ten is urgent
  (``priority=0``, a deadline of three full batches' calls); the rest are normal (``priority=1``,
  fifteen). ``max_in_flight`` turns admission control on: a request that could not finish by
  its deadline is refused at once with ``Overloaded`` and a ``retry_after``.
- Every request ends exactly once: answered, ``TimeoutError`` (its deadline passed, or it was
  hopeless before any compute was spent on it) or ``Overloaded``. Each answer is checked
  against the model on that request alone.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import time
from typing import Any

import torch

from asyncnn import Batching, Graph, Overloaded, Pipeline, Stage, latency_gc

MAX_SIZE = 16
URGENT_SHARE = 0.1
TIGHT, LOOSE = 3.0, 15.0  # deadlines, in full batches' calls


def make_model() -> torch.nn.Module:
    """A small BERT with random weights (no download), returning each row's [CLS] vector."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    torch.manual_seed(0)
    bert = BertModel(cfg).eval()

    class Cls(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.bert(**batch).last_hidden_state[:, 0]

    return Cls().eval()


def request(i: int) -> dict[str, torch.Tensor]:
    """Request ``i``: 8 to 40 token ids and their mask, one row."""
    n = 8 + (i * 7) % 33
    ids = torch.randint(1, 1000, (1, n), generator=torch.Generator().manual_seed(i))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def count_tokens(x: dict[str, torch.Tensor]) -> int:
    return int(x["attention_mask"].sum())


def answer(cls: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    return cls, tokens


def build(model: torch.nn.Module, max_in_flight: int = 1024) -> Pipeline:
    spec = Batching(max_size=MAX_SIZE, max_delay="auto", pad={"input_ids": 0, "attention_mask": 0})
    g = Graph()
    x = g.input()
    cls = g.add(Stage(model, name="bert", batch=spec, workers="auto"), x)
    tokens = g.add(Stage(count_tokens, executor="inline"), x)
    g.output(g.add(Stage(answer, name="answer", executor="inline"), cls, tokens))
    return Pipeline(g, queue_size=MAX_SIZE, max_in_flight=max_in_flight)


async def measure(pipe: Pipeline, seconds: float = 1.0) -> tuple[float, float]:
    """(requests per second, seconds of a full batch's call) with the pipeline kept busy by
    ``4 * MAX_SIZE`` callers that each wait for their answer: what it can serve here."""
    done, stop = 0, time.perf_counter() + seconds

    async def caller(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            await pipe.send(request(i))
            done, i = done + 1, i + 4 * MAX_SIZE

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(4 * MAX_SIZE)))
    return done / (time.perf_counter() - t0), pipe.stats()["bert"].latency_p50


async def main(requests: int = 3000, load: float = 1.5, seed: int = 0) -> dict[str, Any]:
    """Send ``requests`` at ``load`` times the pipeline's capacity; the outcomes by class."""
    model = make_model()
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    out: dict[str, collections.Counter[str]] = {
        "urgent": collections.Counter(),
        "normal": collections.Counter(),
    }
    answers: dict[int, tuple[torch.Tensor, int]] = {}
    latencies: dict[str, list[float]] = {"urgent": [], "normal": []}  # of the answered
    retry_after: list[float] = []
    pipe = build(model)
    async with pipe:
        capacity, call = await measure(pipe)
        with latency_gc():  # what a latency-minded service does once started (README)

            async def one(i: int, urgent: bool) -> None:
                cls = "urgent" if urgent else "normal"
                timeout = (TIGHT if urgent else LOOSE) * call
                start = loop.time()
                try:
                    answers[i] = await pipe.send(
                        request(i), timeout=timeout, priority=0 if urgent else 1
                    )
                except TimeoutError:
                    out[cls]["timed out"] += 1
                    return
                except Overloaded as exc:
                    out[cls]["refused"] += 1
                    retry_after.append(exc.retry_after)
                    return
                took = loop.time() - start
                latencies[cls].append(took)
                out[cls]["answered late" if took > timeout else "answered in time"] += 1

            t0, running = loop.time(), set()
            gap = 1.0 / (load * capacity)
            for i in range(requests):
                wait = t0 + i * gap - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                task = loop.create_task(one(i, rng.random() < URGENT_SHARE))
                running.add(task)  # held while it runs (the asyncio docs' pattern)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
        stats = pipe.stats()
    wrong = []
    with torch.inference_mode():  # after the run: the model on each answered request alone
        for i, (emb, tokens) in answers.items():
            x = request(i)
            if tokens != x["input_ids"].shape[1] or not torch.allclose(emb, model(x), atol=1e-4):
                wrong.append(i)
    return {
        "capacity": capacity,
        "full call": call,
        "load": load,
        "outcomes": {k: dict(v) for k, v in out.items()},
        "latencies": latencies,
        "answered": len(answers),
        "wrong": wrong,
        "retry_after": retry_after,
        "stats": stats,
    }


def report(result: dict[str, Any]) -> str:
    st, bert = result["stats"], result["stats"]["bert"]
    lines = [
        f"capacity {result['capacity']:.0f} requests/s (a full batch's call "
        f"{result['full call'] * 1e3:.1f} ms); sent at {result['load']:.0%} of it"
    ]
    for cls, counts in result["outcomes"].items():
        total = sum(counts.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        took = sorted(result["latencies"][cls])
        p50 = f"; answered in {took[len(took) // 2] * 1e3:.0f} ms (p50)" if took else ""
        lines.append(f"{cls}: {total} sent: {parts}{p50}")
    lines.append(
        f"pipeline: admitted {st.admitted}, completed {st.completed}, timed out {st.timed_out}, "
        f"refused {st.overloaded}, in flight {st.in_flight}; answers that differ from the "
        f"model alone: {len(result['wrong'])}"
    )
    lines.append(
        f"bert: {bert.batches} batches of {bert.mean_batch_size:.1f} rows; released "
        f"full {bert.released_full}, deadline {bert.released_deadline}, idle "
        f"{bert.released_idle}, delay {bert.released_delay}; deadline misses "
        f"{dict(bert.deadline_misses)}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    load = float(sys.argv[2]) if len(sys.argv) > 2 else 1.5
    print(report(asyncio.run(main(n, load))))
