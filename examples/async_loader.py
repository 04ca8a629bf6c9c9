"""An async data loader: samples read from files with async I/O, decoded by a pipeline, batched,
and fed to a model.

Run: python examples/async_loader.py [N_SAMPLES]

- Samples are files on disk, read with anyio's async file API (up to 64 reads in flight): the
  same shape of code serves an object store or an HTTP API.
- Decoding runs in a small pipeline used as the loader's transform (a pipeline inside a loader);
  on a GPU machine, place that stage on "cuda" to decode there.
- The loader feeds the model pipeline (a loader inside a pipeline's stream).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import anyio
import torch

import asyncnn

FEATURES = 32


def write_samples(folder: Path, n: int) -> list[Path]:
    for i in range(n):
        row = torch.full((FEATURES,), float(i), dtype=torch.float32)
        (folder / f"{i:06d}.bin").write_bytes(row.numpy().tobytes())
    return sorted(folder.iterdir())


def decode(raw: bytes) -> torch.Tensor:
    """bytes -> tensor, on the decode stage's thread (a GPU stage would do this on the device)."""
    return torch.frombuffer(bytearray(raw), dtype=torch.float32) / 100.0


async def main(n: int = 1000) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = await anyio.to_thread.run_sync(write_samples, Path(tmp), n)

        decoder = asyncnn.Pipeline([asyncnn.Stage(decode, workers=2)], queue_size=128)
        predictor = asyncnn.Pipeline([asyncnn.Stage(model, name="model")], queue_size=4)
        async with decoder, predictor:

            async def fetch(i: int) -> torch.Tensor:
                raw = await anyio.Path(files[i]).read_bytes()  # async file read
                return await decoder.send(raw)  # the pipeline as the loader's transform

            loader = asyncnn.AsyncLoader(files, batch_size=64, concurrency=64, fetch=fetch)
            outputs = [y async for y in predictor.stream(loader)]
            print(
                f"{sum(len(o) for o in outputs)} samples in {len(outputs)} batches "
                f"({predictor.stats()['model'].items} model calls); loader {loader.stats()}"
            )
        return outputs


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
