"""Scale one stage out to Ray replicas: the heavy model runs on 2 actors, driven by concurrent
send() calls from this process's event loop.

Run: python examples/ray_scale_out.py          (needs, from a checkout: pip install -e ".[ray]")

On a real cluster only one line changes: call ray.init(address="ray://head:10001") (or
address="auto" on a cluster node) before the pipeline starts. The pipeline, its stages and the
callers stay as they are; resources= says what each replica needs ({"num_gpus": 1} for a GPU).
"""

from __future__ import annotations

import asyncio
import logging

import ray
import torch

import asyncnn


def make_model() -> torch.nn.Module:
    """Runs on each replica: the model is built there, not shipped with every call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))


def top1(scores: torch.Tensor) -> int:
    return int(scores.argmax())


async def serve(requests: int) -> list[int]:
    pipe = asyncnn.Pipeline(
        [
            asyncnn.Stage(
                make_model,
                name="model",
                executor="ray",
                replicas=2,
                resources={"num_cpus": 1},
                batch=asyncnn.Batching(max_size=32, max_delay=0.005),
            ),
            asyncnn.Stage(top1, executor="inline"),
        ],
        queue_size=256,
    )
    torch.manual_seed(1)
    xs = [torch.randn(1, 64) for _ in range(requests)]
    async with pipe:
        labels = await asyncio.gather(*(pipe.send(x) for x in xs))
        st = pipe.stats()["model"]
    print(
        f"{len(labels)} requests; {st.batches} remote calls (mean batch "
        f"{st.mean_batch_size:.1f}) over 2 replicas; p50 {st.latency_p50 * 1e3:.1f} ms per call"
    )
    return labels


def main(requests: int = 256) -> list[int]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)  # the one line
    try:
        return asyncio.run(serve(requests))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
